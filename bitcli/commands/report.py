"""`bit report RUN_DIR`: a fine-tuning run from its files alone: its plan, whether it finished (and what a run
that says so lacks), how far it got, its last step and validation, where its files and pictures are. Works on
a finished run, on one still going (its lock is held) and on an interrupted one.

It only reads. It never writes into the run folder (training draws the pictures, at every validation), so a
read-only run is reported like any other, and it imports nothing of the training stack (no torch, numpy or
matplotlib: bitcli.finetune.runfiles reads the files), so it answers in a fraction of a second. Lines of
metrics.jsonl that are no step record of the run (a torn last line, garbage, a line of over a MiB) are skipped
and counted; absurd numbers (a loss of 1e308, NaN, a 40-digit step) print as short words. Only regular files
are read (bitcli.reads): a run file that is a FIFO or a device is refused or reported, never waited on.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bitcli import extras, hyperrule
from bitcli.errors import BitError, one_line
from bitcli.finetune import tensorboard
from bitcli.finetune.runfiles import (
    BEST_FOLDER,
    CONFIG_FILE,
    LOCK_FILE,
    METRICS_FILE,
    MODEL_FILES,
    PICTURE_FILES,
    REPORT_FOLDER,
    STATE_FILE,
    SUMMARY_FILE,
    VALIDATION_FILE,
    checkpoint_step,
    headline,
    metrics_lines,
    read_checkpoint_state,
    read_saved_plan,
)
from bitcli.options import ReportOptions
from bitcli.reads import inside, open_regular, read_json
from bitcli.ui import display, visible

# What each file of a run holds, in the order listed.
FILE_NOTES = {
    MODEL_FILES[0]: "the fine-tuned model (with config.json, preprocessor_config.json): --model for predict and eval",
    METRICS_FILE: "one line per step",
    VALIDATION_FILE: "the last validation, with its confusion matrix",
    SUMMARY_FILE: "final metrics",
    STATE_FILE: "resumable checkpoint",
    CONFIG_FILE: "the plan",
}
MAX_DIGITS = 15  # a whole number longer than this prints in e-notation


def run(opts: ReportOptions) -> None:
    folder = opts.run
    if not folder.exists():  # (a symlink to nothing too)
        raise BitError(f"{visible(display(folder))}: no such folder; pass the --output folder of a bit finetune run")
    if not folder.is_dir():
        raise BitError(f"{visible(display(folder))}: is a file, not a run folder; pass the --output folder of a run")
    if not (folder / CONFIG_FILE).is_file():
        raise BitError(
            f"{visible(display(folder))}: holds no bit finetune run ({CONFIG_FILE}); pass the --output folder of a run"
        )
    plan = read_saved_plan(folder)
    try:
        steps = planned_steps(plan)
        head = plan_lines(plan)
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise BitError(
            f"{visible(display(folder / CONFIG_FILE))}: not the plan bit finetune writes ({one_line(exc)}); restore it"
        ) from None
    try:
        metrics = Metrics.read(folder / METRICS_FILE, steps)
    except BitError as exc:  # not a regular file: a FIFO would block the read, /dev/zero never end it
        raise BitError(f"{visible(str(exc))}; restore the run's {METRICS_FILE} (or remove it)") from None
    kind, status = run_status(folder, steps, metrics)
    lines = [*head, f"status      {status}", *step_lines(metrics)]
    lines += [*validation_lines(folder), *selection_lines(folder, plan)]
    lines += file_lines(folder, bool(plan.get("multi_label")))
    lines += [*best_file_lines(folder, plan), pictures_line(folder, plan, kind)]
    sys.stdout.write("".join(line + "\n" for line in lines))
    sys.stdout.flush()


def whole(n: int, grouped: bool = False) -> str:
    """A step or a count as people read it: its digits (grouped by thousands), or e-notation beyond
    MAX_DIGITS of them (a hand-edited 300-digit step stays one short word)."""
    digits = str(abs(n))
    if len(digits) > MAX_DIGITS:
        return f"{'-' if n < 0 else ''}{digits[0]}.{digits[1:3]}e+{len(digits) - 1}"
    return f"{n:,}" if grouped else str(n)


def decimal(x: float, places: int) -> str:
    """A metric with `places` decimals; from a million on in e-notation (a diverged loss of 1e308 is not 309
    digits); nan and inf as such."""
    if not math.isfinite(x):
        return str(x)
    return f"{x:.{places}f}" if abs(x) < 1e6 else f"{x:.4g}"


def planned_steps(plan: dict[str, Any]) -> int:
    steps = plan["steps"]
    if type(steps) is not int or steps < 1:
        raise ValueError("steps is not a whole number of at least 1")
    return steps


def crop_words(plan: dict[str, Any]) -> str:
    if plan.get("cache_features"):
        return "cached features (no crop or flip)"
    return f"crop {whole(plan['crop'])}{'' if hyperrule.mirrors(plan) else ', no flip'}"


def plan_lines(plan: dict[str, Any]) -> list[str]:
    source = f"random {plan['model']}" if plan.get("random_init") else plan["model"]
    validation = (
        f"{whole(plan['val_examples'], grouped=True)} images ({plan['validation']})"
        if plan.get("validation")
        else "none"
    )
    mixup = f"mixup {plan['mixup']:g}" if plan.get("mixup") else "no mixup"
    return [
        f"model       {visible(str(source))} -> {whole(len(plan['classes']))} classes",
        f"train       {whole(plan['train_examples'], grouped=True)} images from {visible(str(plan['train_folder']))}",
        f"validation  {visible(validation)}",
        f"schedule    {whole(plan['steps'])} steps of {whole(plan['batch_size'])} images, lr {plan['lr']:g}, "
        f"{crop_words(plan)}, {mixup}; {plan['device']}, {plan['precision']}",
    ]


@dataclass
class Metrics:
    """What the report shows of metrics.jsonl, gathered in one pass over its lines (none is kept)."""

    lines: int = 0
    skipped: int = 0  # lines that are no step record of the run
    first_skipped: int = 0  # the first one's line number
    last: dict[str, Any] | None = None
    last_validation: dict[str, Any] | None = None
    # the highest headline measure: top-1, a multi-label run's mAP (the first of equals; NaN counts lowest)
    best_validation: dict[str, Any] | None = None

    @classmethod
    def read(cls, path: Path, steps: int) -> Metrics:
        metrics = cls()
        for number, record in metrics_lines(path, steps):
            metrics.lines = number
            if record is None:
                metrics.skipped += 1
                metrics.first_skipped = metrics.first_skipped or number
                continue
            metrics.last = record
            if (key := headline(record)) is not None:
                metrics.last_validation = record
                best = metrics.best_validation
                if best is None or _rank(record, key) > _rank(best, key):
                    metrics.best_validation = record
        return metrics


def _rank(record: dict[str, Any], key: str) -> float:
    value = record.get(key)
    return -math.inf if value is None or math.isnan(value) else value


def run_status(folder: Path, steps: int, metrics: Metrics) -> tuple[str, str]:
    """(finished | running | incomplete | interrupted, the status line's text). Finished means the summary and
    every model file are there: a run that lacks one has no model to use."""
    done = metrics.last["step"] + 1 if metrics.last else 0
    missing = [name for name in MODEL_FILES if not (folder / name).is_file()]
    damaged = summary_problem(folder)
    ended = (folder / SUMMARY_FILE).is_file() and damaged is None
    if ended and not missing:
        return "finished", "finished"
    if lock_held(folder):
        return "running", f"running: {whole(done)} of {whole(steps)} steps done"
    if damaged is not None:
        return "incomplete", (
            f"not finished cleanly: {damaged}; the run's end is not recorded, so its model is not known to be "
            "whole: train again with --overwrite"
        )
    if ended:
        return "incomplete", (
            f"not finished: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing "
            f"(training ended, {SUMMARY_FILE} is there: moved or deleted since?)"
        )
    saved = saved_step(folder)
    return "interrupted", f"interrupted after {whole(done)} of {whole(steps)} steps; " + (
        f"--resume continues from the checkpoint of step {whole(saved)}"
        if saved
        else "--resume starts it again (no checkpoint yet)"
    )


def summary_problem(folder: Path) -> str | None:
    """Why summary.json, which training writes last (once the model is in place), cannot be read; None when it
    reads as a JSON object or is not there."""
    path = folder / SUMMARY_FILE
    if not os.path.lexists(path):
        return None
    try:
        read_json(path)
    except BitError as exc:
        return visible(str(exc))
    return None


def step_lines(metrics: Metrics) -> list[str]:
    """The skipped lines (how many, the first), the last step and the last and best validation."""
    lines = []
    if metrics.skipped:
        lines.append(
            f"skipped     {metrics.skipped:,} of {metrics.lines:,} lines of {METRICS_FILE}: not a step record of "
            f"this run (the first: line {metrics.first_skipped:,})"
        )
    # metrics.jsonl's `step` is the index from 0; people are shown step + 1, the progress line's "k/N steps"
    if last := metrics.last:
        lines.append(
            f"last step   {whole(last['step'] + 1)}: loss {decimal(last['loss'], 4)}, lr {last['lr']:.3g}, "
            f"{decimal(last['images_per_s'], 1)} images/s"
        )
    if (last := metrics.last_validation) and (best := metrics.best_validation):
        if headline(last) == "val_mAP":  # a multi-label run: no top-1 or top-5
            measures, name, key = f"mAP {decimal(last['val_mAP'], 4)}", "mAP", "val_mAP"
        else:
            top5 = "n/a" if last.get("val_top5") is None else decimal(last["val_top5"], 4)
            measures, name, key = f"top-1 {decimal(last['val_top1'], 4)}, top-5 {top5}", "top-1", "val_top1"
        best_value = decimal(best[key], 4) if best.get(key) is not None else "n/a"
        lines.append(
            f"validation  step {whole(last['step'] + 1)}: {measures}, loss {decimal(last['val_loss'], 4)}; "
            f"best {name} {best_value} at step {whole(best['step'] + 1)}"
        )
    return lines


def validation_lines(folder: Path) -> list[str]:
    """The macro F1 of the stored last validation (validation.json), or why it cannot be read."""
    path = folder / VALIDATION_FILE
    if not path.is_file():
        return []
    try:
        stored = read_json(path)
        f1, step, count = stored["macro_f1"], stored["step"], stored["count"]
        if type(f1) not in (int, float) or type(step) is not int or type(count) is not int:
            raise TypeError("macro_f1, step or count is not a number")
        return [f"macro F1    {decimal(float(f1), 4)} at step {whole(step + 1)} ({whole(count, grouped=True)} images)"]
    except BitError as exc:
        return [f"macro F1    unreadable: {visible(str(exc))}"]
    except (KeyError, TypeError, OverflowError) as exc:
        return [f"macro F1    unreadable: {visible(display(path))}: not as bit finetune writes it ({one_line(exc)})"]


def selection_lines(folder: Path, plan: dict[str, Any]) -> list[str]:
    """What a finished run kept of its validations (summary.json): the fitted temperature with the validation
    ECE and NLL before and after, or why the model is not calibrated, and --keep-best's model; a summary that
    says otherwise shows nothing. An unfinished run: --keep-best's model as its checkpoint records it."""
    if not (folder / SUMMARY_FILE).is_file():
        return checkpoint_best_lines(folder, plan)
    try:
        summary = read_json(folder / SUMMARY_FILE)
    except BitError:
        return []
    lines = []
    try:
        cal = summary.get("calibration")
        if isinstance(cal, dict) and cal.get("skipped"):  # the fit was tried and skipped: the temperature is 1
            lines.append(f"calibration none: {visible(str(cal['skipped']))}; scores at temperature 1")
        elif isinstance(cal, dict):
            lines.append(f"calibrated  temperature {_number(cal['temperature'], 4)}: validation ECE "
                         f"{_number(cal['val_ece_before'], 4)} -> {_number(cal['val_ece_after'], 4)}, NLL "
                         f"{_number(cal['val_nll_before'], 4)} -> {_number(cal['val_nll_after'], 4)}"
                         f"{_calibration_note(cal, ' (', ')')}")  # fmt: skip
        elif _calibration_off(plan):
            lines.append("calibration none: --no-calibrate; scores at temperature 1")
        if isinstance(best := summary.get("best"), dict) and best.get("step") is not None:
            lines.append(_best_line(folder, best, plan))
    except (KeyError, TypeError, ValueError, OverflowError):
        return lines  # a hand-edited summary: what could be read
    return lines


def _best_line(folder: Path, best: dict[str, Any], plan: dict[str, Any]) -> str:
    """--keep-best's record (selection.Best.to_dict(): its `step` is the index from 0) as one line."""
    return (f"best        {visible(str(best['metric']))} {_number(best['value'], 4)} after step "
            f"{whole(int(best['step']) + 1)} ({_best_temperature(best, plan)}): "
            f"{visible(display(folder / BEST_FOLDER))}")  # fmt: skip


def checkpoint_best_lines(folder: Path, plan: dict[str, Any]) -> list[str]:
    """An unfinished run's best/ as its checkpoint of step j records it (read from the header alone); a
    validation after step j may have replaced best/ since, which the line says by naming the checkpoint."""
    if not (folder / BEST_FOLDER / MODEL_FILES[0]).is_file() or not (folder / STATE_FILE).is_file():
        return []
    try:
        state, saved = read_checkpoint_state(folder / STATE_FILE)
        best = state.get("best")
        if not isinstance(best, dict) or best.get("step") is None:
            return []
        return [f"{_best_line(folder, best, plan)} (as the checkpoint of step {whole(saved)} records it)"]
    except (BitError, KeyError, TypeError, ValueError, OverflowError):
        return []  # a damaged checkpoint: the status line says what --resume makes of it


def _calibration_off(plan: dict[str, Any]) -> bool:
    """A single-label run with a validation set that fitted no temperature because of --no-calibrate (a
    multi-label run has thresholds instead; plans before the flag lack `calibrate`)."""
    return bool(plan.get("validation")) and not plan.get("multi_label") and plan.get("calibrate") is False


def _best_temperature(best: dict[str, Any], plan: dict[str, Any]) -> str:
    """best/'s temperature as the run recorded it: fitted (with a bound's note), or why there is none."""
    cal = best.get("calibration")
    if isinstance(cal, dict) and cal.get("skipped"):
        return f"not calibrated: {visible(str(cal['skipped']))}"
    if cal is None and _calibration_off(plan):
        return "not calibrated: --no-calibrate"
    if cal is None and plan.get("multi_label"):
        return "with the thresholds chosen on that validation"
    return f"temperature {_number(best['temperature'], 4)}{_calibration_note(cal, ', ', '')}"


def _calibration_note(cal: Any, before: str, after: str) -> str:
    """What the run said of a fitted temperature beside it (bitcli.finetune.selection.describe): that the fit
    ended at a bound of the temperature's range; empty otherwise (or when not recorded)."""
    if not isinstance(cal, dict):
        return ""
    if cal.get("at_bound") is not None:
        bound = _number(cal["at_bound"], 2)
        return (
            f"{before}at the bound {bound} of its range: the validation set is too small or too easy to fit it{after}"
        )
    return ""


def _number(value: Any, places: int) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError("not a number")
    return decimal(float(value), places)


def best_file_lines(folder: Path, plan: dict[str, Any]) -> list[str]:
    """--keep-best's folder, listed with the run's files."""
    if not (folder / BEST_FOLDER / MODEL_FILES[0]).is_file():
        return []
    metric = visible(str(plan.get("keep_best") or "its metric"))
    return [f"  {visible(display(folder / BEST_FOLDER))}  the best validated model by {metric} (--keep-best): "
            "--model for predict and eval"]  # fmt: skip


def file_lines(folder: Path, multi_label: bool = False) -> list[str]:
    lines = ["files"]
    for name, note in FILE_NOTES.items():
        if (folder / name).is_file():
            if name == SUMMARY_FILE and summary_problem(folder) is not None:
                note = "cannot be read (see status)"
            elif name == VALIDATION_FILE and multi_label:  # no confusion matrix: per-class AP (bitcli.multilabel)
                note = "the last validation, with each class's AP, threshold and F1"
            lines.append(f"  {visible(display(folder / name))}  {note}")
    try:
        page = shown_file(folder, f"{REPORT_FOLDER}/index.html")
    except BitError as exc:
        lines.append(f"  not shown: {visible(str(exc))}")
        page = None
    if page is not None:
        shows = "per-class AP, each class's worst false positives and negatives" if multi_label else \
            "confusion matrix, the misclassified images"  # fmt: skip
        lines.append(f"  {visible(display(page))}  the last validation's report: metrics, {shows} with Grad-CAM "
                     f"(open in a browser: {visible(page.resolve().as_uri())})")  # fmt: skip
    board = folder / tensorboard.FOLDER
    if board.is_dir():
        lines.append(f"  {visible(display(board))}  TensorBoard events: tensorboard --logdir {visible(display(board))}")
    return lines


def pictures_line(folder: Path, plan: dict[str, Any], kind: str) -> str:
    """The pictures the run has; training draws them (report never does), so without them: how to get them."""
    if not plan.get("validation"):
        return "pictures    none: the run has no validation set"
    drawn: list[str] = []
    refused: list[str] = []
    for name in PICTURE_FILES:
        try:
            picture = shown_file(folder, name)
        except BitError as exc:
            refused.append(visible(str(exc)))
            continue
        if picture is not None:
            drawn.append(visible(display(picture)))
    if drawn or refused:
        parts = ([", ".join(drawn)] if drawn else []) + [f"not shown: {reason}" for reason in refused]
        return "pictures    " + "; ".join(parts)
    if not (folder / VALIDATION_FILE).is_file():
        return "pictures    none yet (training draws them at the first validation)"
    how = f"none: training draws them at every validation when matplotlib is installed ({extras.install('plots')})"
    if kind == "interrupted":
        how += "; then --resume draws them at its next validation"
    elif kind == "finished":
        how += f"; `bit eval DATA --model {visible(display(folder))} --plot confusion.png` draws a confusion matrix"
    return f"pictures    {how}"


def shown_file(folder: Path, name: str) -> Path | None:
    """`folder/name` if it is a file of the run to show or link (a picture, the report page): `bit push`'s rule
    (modelcard.read_picture), a regular file inside the run (a symlink to another file of the run is fine);
    None when there is none; one line (a BitError) saying why one that is there is not shown. It is opened (a
    FIFO is refused unread), never read."""
    path = folder / name
    if not os.path.lexists(path):
        return None
    try:
        open_regular(inside(folder, name)).close()
    except FileNotFoundError:  # a symlink inside the run that leads nowhere: no picture
        return None
    return path


def lock_held(folder: Path) -> bool:
    """Whether a bit finetune holds the run's lock now (see rundir.lock_output). A shared, non-blocking try
    that is released at once, on the file only if it exists (a report never creates it)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: runs take no lock
        return False
    try:
        handle = open_regular(folder / LOCK_FILE)  # bit finetune's lock is a regular file; a FIFO would block
    except (OSError, BitError):
        return False
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def saved_step(folder: Path) -> int | None:
    """The step the checkpoint continues from; None without a readable one (only its header is read)."""
    if not (folder / STATE_FILE).is_file():
        return None
    try:
        return checkpoint_step(folder / STATE_FILE)
    except BitError:
        return None
