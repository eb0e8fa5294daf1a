"""The files of a run folder by name, and what reads them with the standard library alone: the saved plan,
metrics.jsonl's step records, the checkpoint's state (from its header). `bit report` reads a run with this
module and no other part of the training stack, so it answers in a fraction of a second without torch.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bitcli.errors import BitError
from bitcli.reads import bounded_lines, open_regular, read_json, safetensors_header

CONFIG_FILE = "finetune_config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
STATE_FILE = "checkpoint.safetensors"
LOCK_FILE = ".lock"  # held by the writing process while a run is in progress; removed when it ends
MODEL_FILES = ("model.safetensors", "preprocessor_config.json", "config.json")  # config.json last
VALIDATION_FILE = "validation.json"  # the last validation: metrics, labels and confusion matrix (bitcli.finetune.watch)
PICTURE_FILES = ("curves.png", "confusion.png")  # bitcli.finetune.watch draws them at every validation
REPORT_FOLDER = "report"  # --report: the last validation's HTML report (bitcli.gallery), REPORT_FOLDER/index.html
RUN_FILES = (*MODEL_FILES, METRICS_FILE, SUMMARY_FILE, STATE_FILE, CONFIG_FILE, VALIDATION_FILE, *PICTURE_FILES)
BEST_FOLDER = "best"  # --keep-best: the best validated model, MODEL_FILES in their own folder

STATE_FORMAT = "bitcli-finetune-state/1"  # the checkpoint's metadata "format" (bitcli.finetune.state)
# metrics.jsonl: the numbers of every step's record, and those a validation step adds: a single-label run's
# val_top1, val_top5 (null for a model of 5 classes or fewer), val_loss (and val_macro_f1, val_balanced_accuracy),
# a multi-label run's val_mAP, val_loss (and val_macro_f1). `step` is the step's index, from 0: people are shown
# step + 1, the number of the progress line ("k/N steps").
STEP_NUMBERS = ("lr", "loss", "images_per_s")
VALIDATION_NUMBERS = ("val_top1", "val_top5", "val_mAP", "val_loss")
HEADLINES = ("val_top1", "val_mAP")  # a validation's headline measure: top-1, or a multi-label run's mAP


def headline(record: dict[str, Any]) -> str | None:
    """The key of a step record's headline validation measure (val_top1; a multi-label run's val_mAP), None for
    a step without validation."""
    return next((key for key in HEADLINES if record.get(key) is not None), None)


def read_saved_plan(output: Path) -> dict[str, Any]:
    return read_json(output / CONFIG_FILE)


def checkpoint_state(path: Path, metadata: dict[str, str]) -> tuple[dict[str, Any], int]:
    """(the state, the step to continue from) in a checkpoint's metadata; one line when it is not a bit
    finetune checkpoint or its state is damaged."""
    if metadata.get("format") != STATE_FORMAT:
        raise BitError(f"{path}: not a bit finetune checkpoint; remove it or use --overwrite")
    try:
        state = json.loads(metadata["state"])
        return state, int(state["next_step"])
    except (KeyError, ValueError, TypeError):
        raise BitError(f"{path}: checkpoint state is damaged; use --overwrite to start again") from None


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint continues from, read from its header alone (no tensor, no torch)."""
    return read_checkpoint_state(path)[1]


def read_checkpoint_state(path: Path) -> tuple[dict[str, Any], int]:
    """(the state, the step to continue from) of a checkpoint, read from its header alone (JSON metadata: no
    tensor, no torch, nothing unpickled)."""
    return checkpoint_state(path, safetensors_header(path)[1])


def metrics_lines(path: Path, steps: int) -> Iterator[tuple[int, dict[str, Any] | None]]:
    """(line number from 1, its record) for each line of metrics.jsonl, read as it is streamed (a run of a
    million steps is not held in memory); the record is None for a line that is no step record of this run
    of `steps` steps: not JSON (a torn last line, garbage, a line of over reads.MAX_LINE bytes), a field
    missing or of another type. Numbers come back as floats. No file: no lines; one that is not a regular
    file (a FIFO, /dev/zero): one line saying so."""
    for number, line in raw_lines(path):
        yield number, step_record(line, steps) if line is not None else None


def raw_lines(path: Path) -> Iterator[tuple[int, bytes | None]]:
    """(line number from 1, the line's bytes, None for an over-long one) of a text file; none if it is missing."""
    try:
        file = open_regular(path)
    except FileNotFoundError:
        return
    with file:
        yield from enumerate(bounded_lines(file), 1)


def step_record(line: bytes, steps: int) -> dict[str, Any] | None:
    try:
        record = json.loads(line.decode("utf-8"))
    except (ValueError, RecursionError):  # not UTF-8, not JSON, an integer of over 4300 digits; deep nesting
        return None
    if not isinstance(record, dict):
        return None
    step = record.get("step")
    if type(step) is not int or not 0 <= step < steps:  # type(): True is an int too
        return None
    for key in STEP_NUMBERS + VALIDATION_NUMBERS:
        value = record.get(key)
        if value is None and key in VALIDATION_NUMBERS:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool):  # JSON's numbers, not true/false
            return None
        try:
            record[key] = float(value)
        except OverflowError:  # an integer beyond any float
            return None
    if headline(record) is not None and record.get("val_loss") is None:
        return None
    return record
