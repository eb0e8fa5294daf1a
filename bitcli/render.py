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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

from rich.console import Console
from rich.table import Table
from rich.text import Text

from bitcli.options import PredictFormat
from bitcli.ui import visible
from bitcli.writes import atomic_write


@dataclass(frozen=True)
class Row:
    """One row of `bit predict`'s report: an image's predictions, or why it has none."""

    path: str  # as the user gave it, made printable (ui.display)
    predictions: list[dict] | None = None  # [{"label": str, "index": int, "score": float}], best first
    error: str | None = None

    def to_dict(self) -> dict:
        if self.error is not None:
            return {"path": self.path, "error": self.error}
        return {"path": self.path, "predictions": self.predictions}


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
    """One line per (image, rank); a failed image is one line with only its path and error."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "rank", "label", "index", "score", "error"])
    for r in rows:
        if r.error is not None:
            writer.writerow([r.path, "", "", "", "", r.error])
            continue
        for rank, p in enumerate(r.predictions or [], 1):
            writer.writerow([r.path, rank, p["label"], p["index"], f"{p['score']:.6f}", ""])
    return buf.getvalue()


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
        labels = Text("\n").join(Text.assemble(visible(p["label"]), (f" ({p['index']})", "dim")) for p in predictions)
        scores = "\n".join(f"{p['score']:.4f}" for p in predictions)
        table.add_row(Text(visible(r.path)), labels, scores)
    buf = io.StringIO()
    console(buf, color).print(table)
    return buf.getvalue()


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
