"""`bit finetune --tensorboard`: the metrics.jsonl records as TensorBoard scalars under DIR/tensorboard, with
torch's SummaryWriter (the `tensorboard` extra). Each scalar has the step and value of metrics.jsonl (stored as
float32, TensorBoard's scalar type). Only the main process writes.

A resumed run opens its writer with purge_step = the checkpoint's step: the events an interrupted run wrote from
that step on are hidden (TensorBoard drops them on reading), so the curves continue without duplicated steps.
The writer is flushed before every checkpoint, so every step before a checkpoint's is on disk when it is.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

FOLDER = "tensorboard"  # under the run folder
EVENT_PREFIX = "events.out.tfevents."  # the names SummaryWriter gives its files
# TensorBoard tag -> metrics.jsonl key
TAGS = {
    "train/loss": "loss",
    "train/lr": "lr",
    "train/images_per_s": "images_per_s",
    "val/top1": "val_top1",
    "val/top5": "val_top5",
    "val/loss": "val_loss",
    "val/mAP": "val_mAP",  # a multi-label run's (which has no val_top1 or val_top5)
}


def remove_events(folder: Path) -> None:
    """--overwrite: the previous run's event files (only those), then the folder if that leaves it empty."""
    for p in folder.iterdir():
        if p.name.startswith(EVENT_PREFIX) and p.is_file() and not p.is_symlink():
            p.unlink()
    if not any(folder.iterdir()):
        folder.rmdir()


def _created_second(name: str) -> int | None:
    """The second an event file was created, from its name (events.out.tfevents.SECONDS.HOST.PID.N)."""
    field = name.removeprefix(EVENT_PREFIX).split(".", 1)[0]
    return int(field) if name.startswith(EVENT_PREFIX) and field.isdigit() else None


def _wait_past_existing(folder: Path) -> None:
    """TensorBoard reads a folder's event files in name order, and a name starts with the second the file was
    created: a resumed run's file must sort after the interrupted run's, so a resume in the same second as
    the newest file waits for the next second (then its purge applies to the older files' events)."""
    seconds = [_created_second(p.name) for p in folder.iterdir()] if folder.is_dir() else []
    newest = max((s for s in seconds if s is not None), default=None)
    while newest is not None and int(time.time()) <= newest:
        time.sleep(0.05)


class Board:
    """One SummaryWriter over a run's records, from step `start` on."""

    def __init__(self, run: Path, start: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        _wait_past_existing(run / FOLDER)
        self.writer = SummaryWriter(log_dir=str(run / FOLDER), purge_step=start)

    def add(self, record: Mapping[str, Any]) -> None:
        for tag, key in TAGS.items():
            value = record.get(key)
            if value is not None:  # val_* on validation steps only, of the run's kind; val_top5 None for <= 5 classes
                self.writer.add_scalar(tag, value, global_step=record["step"])

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
