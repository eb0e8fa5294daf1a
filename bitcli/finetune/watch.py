"""What a run shows while it goes (main process only): TensorBoard scalars at every step (--tensorboard), and
at every validation the stored validation (DIR/validation.json: metrics, labels, confusion matrix) and the
pictures, curves.png and confusion.png, redrawn from the run's files.

The pictures are drawn from the files alone (metrics.jsonl, validation.json, finetune_config.json), so
`bit report DIR` draws the same bytes at any time. A picture is a side product: a missing matplotlib (the plan
said so) or a failed drawing never stops training.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bitcli import plots
from bitcli.errors import one_line
from bitcli.finetune.rundir import METRICS_FILE, PICTURE_FILES, VALIDATION_FILE, read_saved_plan, write_json
from bitcli.finetune.tensorboard import Board
from bitcli.formats import read_json
from bitcli.metrics import OTHER
from bitcli.ui import log, visible

if TYPE_CHECKING:
    from bitcli.metrics import EvalResult

CURVES, CONFUSION = PICTURE_FILES


def read_records(run: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's records, up to a torn last line (a run killed while writing it)."""
    records = []
    path = run / METRICS_FILE
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else ():
        try:
            records.append(json.loads(line))
        except ValueError:
            break
    return records


def draw_pictures(run: Path) -> list[Path]:
    """curves.png and confusion.png from the run's files; returns those written (none before the first
    validation). Raises BitError without matplotlib."""
    plots.require("drawing a run's pictures")
    plan = read_saved_plan(run)
    records = read_records(run)
    written = []
    if records:
        title = f"training curves: {records[-1]['step'] + 1} of {plan['steps']} steps"
        plots.write_png(run / CURVES, plots.curves_png(records, int(plan["steps"]), title))
        written.append(run / CURVES)
    if (run / VALIDATION_FILE).is_file():
        validation = read_json(run / VALIDATION_FILE)
        heading = f"validation after {validation['step'] + 1} of {plan['steps']} steps"
        plots.write_png(run / CONFUSION, plots.evaluation_png(validation, heading, OTHER))
        written.append(run / CONFUSION)
    return written


def record_validation(run: Path, step: int, result: EvalResult, pictures: bool) -> None:
    """After validating at `step` (its metrics.jsonl line written): validation.json, then the pictures."""
    write_json(run / VALIDATION_FILE, {"step": step, **result.to_dict()})
    if not pictures:
        return
    try:
        draw_pictures(run)
    except Exception as exc:  # noqa: BLE001 -- a picture never stops training; `bit report` draws it again
        log(f"could not draw the pictures ({one_line(exc)}); `bit report {visible(str(run))}` draws them later")


class Watch:
    """The per-step hook of the training loop's main process."""

    def __init__(self, run: Path, start: int, tensorboard: bool) -> None:
        self.run = run
        self.pictures = plots.available()
        self.board = Board(run, start) if tensorboard else None

    def step(self, record: dict[str, Any], validation: EvalResult | None) -> None:
        """After metrics.jsonl got `record`; `validation`: the result of this step's validation, if any."""
        if self.board is not None:
            self.board.add(record)
        if validation is not None:
            if self.board is not None:
                self.board.flush()  # the validation shows in TensorBoard now, not minutes later
            record_validation(self.run, record["step"], validation, self.pictures)

    def before_checkpoint(self) -> None:
        """Every step before the checkpoint's is on disk before the checkpoint is (resume purges the rest)."""
        if self.board is not None:
            self.board.flush()

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


def pictures_line(has_validation: bool) -> str:
    """The plan's line about the pictures."""
    if not has_validation:
        return "none: no validation set"
    if not plots.available():
        return f"none: matplotlib is not installed ({plots.INSTALL})"
    return f"{CURVES}, {CONFUSION}: redrawn at every validation"
