"""What a run shows while it goes (main process only): TensorBoard scalars at every step (--tensorboard), and
at every validation the stored validation (DIR/validation.json: metrics, labels, confusion matrix) and the
pictures, curves.png and confusion.png, redrawn from the run's files.

The pictures are drawn from the files alone (metrics.jsonl, validation.json, finetune_config.json): the same
files give the same bytes. Only training draws them (`bit report` lists them, it never writes into a run). A
picture is a side product: a missing matplotlib (the plan said so) or a failed drawing never stops training.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from bitcli import extras, plots
from bitcli.errors import one_line
from bitcli.finetune.rundir import write_json
from bitcli.finetune.runfiles import METRICS_FILE, PICTURE_FILES, VALIDATION_FILE, metrics_lines, read_saved_plan
from bitcli.finetune.tensorboard import Board
from bitcli.metrics import OTHER  # the catch-all column of a validation.json written before it said its name
from bitcli.reads import read_json
from bitcli.ui import log

if TYPE_CHECKING:
    from bitcli.multilabel import Evaluation

CURVES, CONFUSION = PICTURE_FILES


def read_records(run: Path, steps: int) -> list[dict[str, Any]]:
    """metrics.jsonl's step records; a line that is none (a torn last line of a killed run) is left out."""
    return [record for _, record in metrics_lines(run / METRICS_FILE, steps) if record is not None]


def draw_pictures(run: Path) -> list[Path]:
    """curves.png and confusion.png from the run's files; returns those written (none before the first
    validation). Raises BitError without matplotlib."""
    extras.require("plots", "drawing a run's pictures")
    plan = read_saved_plan(run)
    records = read_records(run, int(plan["steps"]))
    written = []
    if records:
        title = f"training curves: {records[-1]['step'] + 1} of {plan['steps']} steps"
        plots.write_png(run / CURVES, plots.curves_png(records, int(plan["steps"]), title))
        written.append(run / CURVES)
    if (run / VALIDATION_FILE).is_file():
        validation = read_json(run / VALIDATION_FILE)
        heading = f"validation after {validation['step'] + 1} of {plan['steps']} steps"
        if validation.get("multi_label"):  # no confusion matrix: each class's AP and F1 (bitcli.multilabel)
            plots.write_png(run / CONFUSION, plots.ap_png(validation, heading))
        else:
            plots.write_png(run / CONFUSION, plots.evaluation_png(validation, heading, validation.get("other", OTHER)))
        written.append(run / CONFUSION)
    return written


def record_validation(run: Path, step: int, result: Evaluation, pictures: bool) -> None:
    """After validating at `step` (its metrics.jsonl line written): validation.json, then the pictures."""
    write_json(run / VALIDATION_FILE, {"step": step, **result.to_dict()})
    if not pictures:
        return
    try:
        draw_pictures(run)
    except Exception as exc:  # noqa: BLE001 -- a picture never stops training
        log(f"could not draw the pictures ({one_line(exc)}); training goes on, the next validation tries again")


class Watch:
    """The per-step hook of the training loop's main process."""

    def __init__(self, run: Path, start: int, tensorboard: bool) -> None:
        self.run = run
        self.pictures = extras.available("plots")
        self.board = Board(run, start) if tensorboard else None

    def step(self, record: dict[str, Any], validation: Evaluation | None) -> None:
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
