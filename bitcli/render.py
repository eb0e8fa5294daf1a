"""Reports as text for people and programs: `bit predict`'s rows as JSON, JSON lines, CSV or a table, the rich
console every table is printed on, and writing a report to its file (atomically) or to stdout.

Paths, labels and error texts are data: tables show them literally (rich Text, never markup) and on one line
(ui.visible); the machine formats keep the exact strings.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

from rich.console import Console
from rich.table import Table
from rich.text import Text

from bitcli.labels import LIST_SEPARATOR
from bitcli.options import PredictFormat
from bitcli.ui import visible
from bitcli.writes import atomic_write

UNKNOWN = "unknown"  # how a table shows the label of an image whose top score is below --min-score


@dataclass(frozen=True)
class Row:
    """One row of `bit predict`'s report: an image's predictions, or why it has none. Its `label` is the top
    prediction's, or None (unknown) when `known` is False: its top score is below --min-score (open-set use)."""

    path: str  # as the user gave it, made printable (ui.display)
    predictions: list[dict] | None = None  # [{"label": str, "index": int, "score": float}], best first
    error: str | None = None
    known: bool = True
    labels: list[dict] | None = None  # a multi-label model's: every class at or above its threshold, best first

    @property
    def label(self) -> str | None:
        return self.predictions[0]["label"] if self.known and self.predictions else None

    def to_dict(self) -> dict:
        if self.error is not None:
            return {"path": self.path, "error": self.error}
        if self.labels is not None:
            return {"path": self.path, "labels": self.labels, "predictions": self.predictions}
        return {"path": self.path, "label": self.label, "predictions": self.predictions}


def row_maker(min_score: float | None) -> Callable[[str, list[dict] | dict | None, str | None], Row]:
    """pipeline.Report's make_row for predict: a top score (as reported, rounded) below `min_score` is unknown.
    A multi-label model's value is {"predictions": top-k, "labels": those above their thresholds}."""

    def make_row(path: str, value: list[dict] | dict | None, error: str | None) -> Row:
        labels, predictions = None, value
        if isinstance(value, dict):
            predictions, labels = value["predictions"], value["labels"]
        assert not isinstance(predictions, dict)
        known = min_score is None or not predictions or predictions[0]["score"] >= min_score
        return Row(path, predictions, error, known=known, labels=labels)

    return make_row


def predictions_text(rows: list[Row], fmt: PredictFormat, color: bool) -> str:
    """The whole report in `fmt`; `color` styles a table (for a terminal)."""
    if fmt == PredictFormat.json:
        return json.dumps([r.to_dict() for r in rows], ensure_ascii=False, indent=2) + "\n"
    if fmt == PredictFormat.jsonl:
        return json_lines(rows)
    if fmt == PredictFormat.csv:
        return _csv(rows)
    return _table(rows, color)


class _AsDict(Protocol):
    def to_dict(self) -> dict: ...


def json_lines(rows: Sequence[_AsDict]) -> str:
    return "".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in rows)


def _csv(rows: list[Row]) -> str:
    """One line per (image, rank); a failed image is one line with only its path and error. image_label: the
    image's label (the top prediction's) on each of its lines, empty when it is unknown (--min-score)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "rank", "label", "index", "score", "error", "image_label"])
    for r in rows:
        if r.error is not None:
            writer.writerow([r.path, "", "", "", "", r.error, ""])
            continue
        for rank, p in enumerate(r.predictions or [], 1):
            writer.writerow([r.path, rank, p["label"], p["index"], f"{p['score']:.6f}", "", _image_label(r)])
    return buf.getvalue()


def _image_label(r: Row) -> str:
    """CSV's image_label: the label (empty when unknown); a multi-label model's labels joined by ';' (a multi-label
    class name never holds it: bitcli.labels.LIST_SEPARATOR)."""
    if r.labels is not None:
        return LIST_SEPARATOR.join(p["label"] for p in r.labels)
    return r.label or ""


def _table(rows: list[Row], color: bool) -> str:
    table = Table(show_lines=True)
    table.add_column("image", overflow="fold")
    table.add_column("label", overflow="fold")
    table.add_column("score", justify="right")
    for r in rows:
        if r.error is not None:
            table.add_row(Text(visible(r.path)), Text.assemble(("error:", "red"), " ", visible(r.error)), "")
            continue
        predictions = r.predictions or []
        lines = [Text.assemble(visible(p["label"]), (f" ({p['index']})", "dim")) for p in predictions]
        scores = [f"{p['score']:.4f}" for p in predictions]
        if not r.known:  # below --min-score: the label is unknown, the top-k follow as usual
            lines, scores = [Text(UNKNOWN, style="bold yellow"), *lines], ["", *scores]
        if r.labels is not None:  # multi-label: the labels above their thresholds first, then the top-k
            above, above_scores = _label_lines(r.labels)
            lines, scores = [*above, *lines], [*above_scores, *scores]
        table.add_row(Text(visible(r.path)), Text("\n").join(lines), "\n".join(scores))
    buf = io.StringIO()
    console(buf, color).print(table)
    return buf.getvalue()


def _label_lines(labels: list[dict]) -> tuple[list[Text], list[str]]:
    """A multi-label row's labels in the table and their scores: a `labels:` line, then each label on its own line
    (a label may hold `, ` or `;`: joined on one line, two labels could not be told from one) with its score (a
    label outside the top-k has it nowhere else)."""
    if not labels:
        return [Text.assemble(("labels: ", "bold"), "(none above its threshold)")], [""]
    lines = [Text("labels:", style="bold"), *(Text.assemble("  ", visible(p["label"])) for p in labels)]
    return lines, ["", *(f"{p['score']:.4f}" for p in labels)]


def console(file: IO[str], color: bool, width: int | None = None) -> Console:
    """A console printing to `file`, styled only when `color`; nothing is highlighted (data is shown as is)."""
    width = width or max(60, shutil.get_terminal_size((120, 24)).columns)
    return Console(file=file, force_terminal=color, no_color=not color, width=width, highlight=False)


def write_text(text: str, output: Path | None) -> None:
    """`text` into `output` (renamed into place when complete: never half a report), or onto stdout."""
    if output is not None:
        atomic_write(output, lambda f: f.write(text.encode("utf-8")))
    else:
        sys.stdout.write(text)
        sys.stdout.flush()


def print_lines(rows: list) -> None:
    """Rows as JSON lines on stdout, flushed: a pipe sees each as soon as it is ready."""
    sys.stdout.write(json_lines(rows))
    sys.stdout.flush()
