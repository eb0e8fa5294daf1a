"""`bit report RUN_DIR`: a fine-tuning run from its files alone (its plan, how far it got or its final metrics,
where its files are), with its pictures redrawn from metrics.jsonl and validation.json (the same bytes that
training draws). Works on a finished run, on one still going (its lock is held) and on an interrupted one.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

from bitcli import plots
from bitcli.errors import BitError
from bitcli.finetune import tensorboard
from bitcli.finetune.rundir import (
    CONFIG_FILE,
    LOCK_FILE,
    METRICS_FILE,
    MODEL_FILES,
    STATE_FILE,
    SUMMARY_FILE,
    VALIDATION_FILE,
    read_saved_plan,
)
from bitcli.finetune.state import read_state
from bitcli.finetune.watch import draw_pictures, read_records
from bitcli.formats import read_json
from bitcli.options import ReportOptions
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


def run(opts: ReportOptions) -> None:
    folder = opts.run
    if not (folder / CONFIG_FILE).is_file():
        raise BitError(
            f"{visible(display(folder))}: holds no bit finetune run ({CONFIG_FILE}); pass the --output folder of a run"
        )
    plan = read_saved_plan(folder)
    with_validation = bool(plan.get("validation"))
    if with_validation:
        plots.require("bit report")  # before anything is printed: one line
    records = read_records(folder)
    lines = plan_lines(plan) + progress_lines(folder, plan, records) + file_lines(folder)
    if not with_validation:
        lines.append("pictures    none: the run has no validation set")
    else:
        drawn = draw_pictures(folder)
        shown = ", ".join(visible(display(p)) for p in drawn) or "none yet (drawn at the first validation)"
        lines.append(f"pictures    {shown}")
    sys.stdout.write("".join(line + "\n" for line in lines))
    sys.stdout.flush()


def plan_lines(plan: dict[str, Any]) -> list[str]:
    source = f"random {plan['model']}" if plan.get("random_init") else plan["model"]
    validation = f"{plan['val_examples']:,} images ({plan['validation']})" if plan.get("validation") else "none"
    mixup = f"mixup {plan['mixup']:g}" if plan.get("mixup") else "no mixup"
    return [
        f"model       {visible(str(source))} -> {len(plan['classes'])} classes",
        f"train       {plan['train_examples']:,} images from {visible(str(plan['train_folder']))}",
        f"validation  {visible(validation)}",
        f"schedule    {plan['steps']} steps of {plan['batch_size']} images, lr {plan['lr']:g}, crop {plan['crop']}, "
        f"{mixup}; {plan['device']}, {plan['precision']}",
    ]


def progress_lines(folder: Path, plan: dict[str, Any], records: list[dict[str, Any]]) -> list[str]:
    """Status (finished, running, interrupted), the last step and the last validation."""
    steps = int(plan["steps"])
    done = records[-1]["step"] + 1 if records else 0
    if (folder / SUMMARY_FILE).is_file():
        status = "finished"
    elif lock_held(folder):
        status = f"running: {done} of {steps} steps done"
    else:
        saved = checkpoint_step(folder)
        status = f"interrupted after {done} of {steps} steps; " + (
            f"--resume continues from the checkpoint of step {saved}"
            if saved
            else "--resume starts it again (no checkpoint yet)"
        )
    lines = [f"status      {status}"]
    if records:
        last = records[-1]
        lines.append(
            f"last step   {last['step']}: loss {last['loss']:.4f}, lr {last['lr']:.3g}, {last['images_per_s']:.1f} images/s"
        )
    validations = [r for r in records if r.get("val_top1") is not None]
    if validations:
        last, best = validations[-1], max(validations, key=lambda r: r["val_top1"])
        top5 = "n/a" if last.get("val_top5") is None else f"{last['val_top5']:.4f}"
        lines.append(f"validation  step {last['step']}: top-1 {last['val_top1']:.4f}, top-5 {top5}, loss {last['val_loss']:.4f}"
                     f"; best top-1 {best['val_top1']:.4f} at step {best['step']}")  # fmt: skip
    if (folder / VALIDATION_FILE).is_file():
        stored = read_json(folder / VALIDATION_FILE)
        lines.append(f"macro F1    {stored['macro_f1']:.4f} at step {stored['step']} ({stored['count']:,} images)")
    return lines


def file_lines(folder: Path) -> list[str]:
    lines = ["files"]
    for name, note in FILE_NOTES.items():
        if (folder / name).is_file():
            lines.append(f"  {visible(display(folder / name))}  {note}")
    board = folder / tensorboard.FOLDER
    if board.is_dir():
        lines.append(f"  {visible(display(board))}  TensorBoard events: tensorboard --logdir {visible(display(board))}")
    return lines


def lock_held(folder: Path) -> bool:
    """Whether a bit finetune holds the run's lock now (see rundir.lock_output). A shared, non-blocking try
    that is released at once, on the file only if it exists (a report never creates it)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: runs take no lock
        return False
    try:
        handle = open(folder / LOCK_FILE, "rb")
    except OSError:
        return False
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def checkpoint_step(folder: Path) -> int | None:
    """The step the checkpoint continues from; None without a readable one (only its header is read)."""
    if not (folder / STATE_FILE).is_file():
        return None
    with contextlib.suppress(BitError):
        return read_state(folder / STATE_FILE)[2]
    return None
