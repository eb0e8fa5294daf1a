"""The run folder (--output): which folders may be used and how, its lock, the files a run writes there
(plan, metrics log, summary, the final model; their names are in bitcli.finetune.runfiles) and the clean-up
of interrupted writes.

A run only ever writes RUN_FILES (under temporary names first) and only ever removes those and its own
temporary files: the folder may hold the user's files too.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bitcli.errors import BitError, UsageError
from bitcli.finetune import tensorboard as board
from bitcli.finetune.runfiles import (
    BEST_FOLDER,
    CONFIG_FILE,
    LOCK_FILE,
    MODEL_FILES,
    REPORT_FOLDER,
    RUN_FILES,
    SUMMARY_FILE,
    raw_lines,
    step_record,
)
from bitcli.formats import Checkpoint, TensorRef
from bitcli.formats.hf import write as write_hf
from bitcli.multilabel import Evaluation, MultiLabelResult
from bitcli.options import FinetuneOptions
from bitcli.pages.folder import remove_page_folder
from bitcli.preprocess import Preprocess
from bitcli.ui import log, visible
from bitcli.writes import atomic_write, move_files_into, within

if TYPE_CHECKING:
    from bitcli.finetune.plan import Plan

# Temporary names of bitcli's own writes into DIR (atomic_write: .NAME.XXXXXXXX.tmp; the final model's
# staging folder .final and its own temporary ..final.XXXXXXXX.tmp; best/ written for the first time:
# .best.XXXXXXXX.tmp). Only these are cleaned up.
LEFTOVER = re.compile(
    r"\.(?:{}|\.final|{})\.[a-z0-9_]{{8}}\.tmp".format("|".join(re.escape(n) for n in RUN_FILES), BEST_FOLDER)
)
WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES}  # disk full, read-only...


def check_output_location(opts: FinetuneOptions) -> None:
    """DIR must be outside the image folders: inside DATA its files would be a class folder of the next run
    and of `bit eval DATA` ("class folder 'myrun' holds no images")."""
    for flag, folder in (("DATA", opts.data), ("--val", opts.val)):
        if folder is None or isinstance(folder, str):  # a Hub data set (hf://...) is no folder
            continue
        if within(opts.output, folder):
            same = opts.output.resolve() == folder.resolve()
            raise UsageError(
                f"--output {visible(str(opts.output))}: is {'the' if same else 'inside the'} image folder "
                f"{visible(str(folder))} ({flag}), where the run's files would be taken for a class of images; "
                "choose a folder outside it"
            )


def output_mode(output: Path, resume: bool, overwrite: bool) -> str:
    """fresh | overwrite | resume | finished (--resume of a finished run: nothing to do), or a BitError
    saying why this folder cannot be used."""
    if resume and overwrite:
        raise UsageError("--resume continues a run and --overwrite starts it again; pass only one")
    if output.exists() and not output.is_dir():
        raise BitError(f"--output {output}: is a file; pass a folder")
    is_run = (output / CONFIG_FILE).is_file()
    finished = (output / SUMMARY_FILE).is_file()
    if resume:
        if not is_run:
            raise BitError(f"--resume: {output} holds no bit finetune run ({CONFIG_FILE}); run without --resume")
        return "finished" if finished else "resume"
    if not output.exists() or not [p for p in output.iterdir() if p.name != LOCK_FILE]:
        return "fresh"
    if not is_run:
        raise BitError(
            f"--output {output}: folder is not empty and holds no bit finetune run; choose a new or empty folder"
        )
    if not overwrite:
        if finished:
            raise BitError(
                f"--output {output}: holds a finished run; pass --overwrite to replace it, or choose another folder"
            )
        raise BitError(
            f"--output {output}: holds an unfinished run; pass --resume to continue it or --overwrite to start again"
        )
    return "overwrite"


def remove_leftovers(output: Path, run_files: bool) -> None:
    """Temporary files of bitcli's writes that a kill interrupted (never read: every write is renamed into
    place), and with `run_files` the previous run's files (its report's too). Nothing else: DIR may hold the
    user's files."""
    report = output / REPORT_FOLDER
    if run_files and report.is_dir() and not report.is_symlink():  # first: if a file of it cannot be removed,
        remove_page_folder(report)  # the run's own files are all still there (--report's files, marker-listed)
    for p in output.iterdir() if output.is_dir() else ():
        if p.is_symlink():
            continue
        if p.name == ".final" and p.is_dir():
            shutil.rmtree(p)
        elif LEFTOVER.fullmatch(p.name):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        elif run_files and p.name in RUN_FILES and p.is_file():
            p.unlink()
        elif run_files and p.name == board.FOLDER and p.is_dir():
            board.remove_events(p)  # --tensorboard's event files, and the folder if nothing else is in it
        elif run_files and p.name == BEST_FOLDER and p.is_dir():
            _remove_model_folder(p)


def _remove_model_folder(folder: Path) -> None:
    """best/'s model files and bitcli's staging folders in it, and the folder if nothing else is in it."""
    for p in folder.iterdir():
        if p.is_symlink():
            continue
        if p.name in MODEL_FILES and p.is_file():
            p.unlink()
        elif p.name.startswith(".bitcli-staging.") and p.name.endswith(".tmp") and p.is_dir():
            shutil.rmtree(p)
    with contextlib.suppress(OSError):
        folder.rmdir()  # only when empty: the user's own files stay, and so does the folder


@contextlib.contextmanager
def lock_output(output: Path) -> Iterator[None]:
    """An exclusive lock on DIR/.lock while the run writes, so that two runs never write the same folder.

    The file is removed at the end, while still locked. A run that opened it just before then finds, once
    it holds the lock, that the name no longer leads to its file, and opens the new one instead.
    """
    path = output / LOCK_FILE
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        fcntl = None  # type: ignore[assignment]  # mypy checks for this platform, which has fcntl
    while True:
        handle = open(path, "a")
        if fcntl is None:
            break
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise BitError(
                f"--output {output}: another bit finetune is writing to this folder; wait for it or choose another"
            ) from None
        try:
            if os.path.samestat(os.fstat(handle.fileno()), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        handle.close()
    try:
        yield
    finally:
        with contextlib.suppress(OSError):  # (an open file cannot be removed on Windows: it stays there)
            path.unlink(missing_ok=True)
        handle.close()


def write_json(path: Path, data: dict[str, Any]) -> None:
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


class MetricsLog:
    """metrics.jsonl: one JSON object per optimizer step, flushed as it is written. On resume the lines of
    steps that the checkpoint does not cover (written after it, before the kill) are dropped; a line that is
    no step record (a torn line, garbage: bit report skips it too) is left out and counted, and every step
    record before the checkpoint's step is kept, those after a bad line too."""

    def __init__(self, path: Path, keep_before: int | None) -> None:
        if keep_before is not None and path.is_file():
            atomic_write(path, lambda f: self._keep(path, keep_before, f))  # read while the new file is written
        else:
            atomic_write(path, lambda f: None)
        self.file = open(path, "a", encoding="utf-8")

    @staticmethod
    def _keep(path: Path, before: int, out) -> None:
        bad, first = 0, 0
        for number, line in raw_lines(path):
            record = step_record(line, sys.maxsize) if line is not None else None
            if line is None or record is None:  # (line None: a line too long to hold, passed over)
                bad, first = bad + 1, first or number
            elif record["step"] < before:
                out.write(line if line.endswith(b"\n") else line + b"\n")
        if bad:
            log(visible(
                f"{path}: left out {bad:,} line(s) that are no step record (the first: line {first:,}); the "
                f"records of steps before {before:,} are kept"
            ))  # fmt: skip

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def write_final_model(ckpt: Checkpoint, output: Path) -> None:
    """The transformers layout directly in DIR, beside the run's other files (write_hf replaces whole
    folders, so it writes to a staging folder whose files are then renamed in, config.json last)."""
    staging = output / ".final"
    shutil.rmtree(staging, ignore_errors=True)
    write_hf(ckpt, staging)
    move_files_into(staging, output, MODEL_FILES)
    staging.rmdir()


def model_checkpoint(model, plan: Plan, transform: Preprocess, source: Path, *, temperature: float,
                     thresholds: list[float] | None = None) -> Checkpoint:  # fmt: skip
    """The model as the run writes it: fp32, with the evaluation preprocessing, the class names and the
    temperature of its scores (a multi-label model: its thresholds)."""
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    tensors = {k: TensorRef(tuple(t.shape), t.dtype, (lambda t=t: t)) for k, t in state.items()}  # type: ignore[misc]  # python/mypy#15459: a default-argument lambda
    return Checkpoint(config=model.config, labels=list(plan.classes), preprocess=transform, tensors=tensors,
                      source=str(source), format="hf", temperature=temperature, thresholds=thresholds)  # fmt: skip


def write_best_model(model, plan: Plan, transform: Preprocess, output: Path, *, temperature: float,
                     thresholds: list[float] | None = None) -> None:  # fmt: skip
    """--keep-best: the model in DIR/best/, the same files as the final model (a new folder appears whole; an
    existing one has its files replaced, config.json last); a multi-label model with the thresholds chosen on
    the validation that made it the best."""
    best = model_checkpoint(model, plan, transform, output / BEST_FOLDER, temperature=temperature,
                            thresholds=thresholds)  # fmt: skip
    write_hf(best, output / BEST_FOLDER)


@dataclass(frozen=True)
class Selection:
    """What the run kept of its validations (bitcli.finetune.selection), for summary.json."""

    temperature: float = 1.0
    calibration: dict[str, Any] | None = None  # Calibration.to_dict()
    best: dict[str, Any] | None = None  # Best.to_dict()
    thresholds: list[float] | None = None  # a multi-label model's, chosen on the last validation


def write_outputs(output: Path, model, plan: Plan, transform: Preprocess, *, last_eval: Evaluation | None,
                  last_loss: float, step_times: list[float], start: int, started: float,
                  selection: Selection = Selection()) -> None:  # fmt: skip
    """The fine-tuned model (fp32, with the evaluation preprocessing, the class names and the temperature) and
    summary.json."""
    final = model_checkpoint(model, plan, transform, output, temperature=selection.temperature,
                             thresholds=selection.thresholds)  # fmt: skip
    write_final_model(final, output)
    trained = sum(step_times)
    head = {
        "steps": plan.steps,
        "train_examples": plan.train_examples,
        "val_examples": plan.val_examples,
        "skipped": list(plan.skipped),  # images that do not decode, left out of training and validation
    }
    run = {
        "final_loss": last_loss if math.isfinite(last_loss) else None,  # None: no step left after resuming
        "resumed_from_step": start or None,  # the checkpoint's step: the steps done before this invocation
        "wall_time_s": round(time.monotonic() - started, 2),  # this invocation
        "images_per_s": round(plan.batch_size * len(step_times) / trained, 2) if trained else None,
    }
    if plan.multi_label:  # no top-1 or balanced accuracy: they count one label an image
        ml = last_eval if isinstance(last_eval, MultiLabelResult) else None
        summary = {**head, "val_mAP": ml.mAP if ml else None, "val_ap": dict(zip(ml.classes, ml.ap)) if ml else None,
                   "val_loss": ml.loss if ml else None, "val_macro_f1": ml.macro_f1 if ml else None, **run}  # fmt: skip
    else:
        summary = {
            **head,
            "val_top1": last_eval.top1 if last_eval else None,
            "val_top5": last_eval.top5 if last_eval else None,
            "val_loss": last_eval.loss if last_eval else None,
            "val_per_class": last_eval.per_class if last_eval else None,
            **run,
            "val_balanced_accuracy": last_eval.balanced_accuracy if last_eval else None,
            "val_macro_f1": last_eval.macro_f1 if last_eval else None,
        }
    summary |= {
        "calibration": selection.calibration,  # the temperature fitted on the last validation, ECE/NLL before, after
        "best": selection.best,  # --keep-best: the validation whose model is in best/
        "thresholds": selection.thresholds,  # a multi-label model's, by class
    }
    write_json(output / SUMMARY_FILE, summary)
    if last_eval:
        log(f"done: val {measures_text(last_eval, ', ')} on {plan.val_examples:,} images")
    log(f"model, metrics.jsonl and summary.json in {output} ({summary['wall_time_s']:.0f} s)")


def validation_fields(result: Evaluation) -> dict[str, Any]:
    """What a validation step adds to its metrics.jsonl record. Single-label: top-1, top-5, loss, macro F1 and
    balanced accuracy. Multi-label: mAP (bit eval's `mAP` of the same model and images), the loss (binary
    cross-entropy) and macro F1 at the thresholds chosen on this validation (those the model stores when it is
    the last one); no top-1, top-5 or balanced accuracy, which count one label an image."""
    if isinstance(result, MultiLabelResult):
        return {"val_mAP": result.mAP, "val_loss": result.loss, "val_macro_f1": result.macro_f1}
    return {"val_top1": result.top1, "val_top5": result.top5, "val_loss": result.loss, "val_macro_f1": result.macro_f1,
            "val_balanced_accuracy": result.balanced_accuracy}  # fmt: skip


def measures_text(result: Evaluation, sep: str = "  ") -> str:
    """A validation's headline measures for people: top-1 and top-5, or a multi-label run's mAP and macro F1."""
    if isinstance(result, MultiLabelResult):
        return f"mAP {result.mAP:.4f}{sep}macro F1 {result.macro_f1:.4f}"
    return f"top-1 {result.top1:.4f}{sep}top-5 {top5_text(result)}"


def top5_text(result: Evaluation) -> str:
    """Top-5 accuracy for people: n/a for a model of 5 classes or fewer (the top five always hold the answer)."""
    return "n/a" if result.top5 is None else f"{result.top5:.4f}"
