"""`bit audit --write-clean FILE`: a label file of every image no finding drops, in the order the sources list
them (a label file's rows in row order, a class folder's classes in class order), that bitcli reads back with
the same labels: FILE.csv (path,label[,split]) or FILE.jsonl (one object a row, "label" a string, or for
multi-label data a JSON list of every label of the image). Multi-label data is refused as CSV: a CSV whose
kept rows each have one label would read back as single-label data (bitcli.sources.labelfile: only a `;` in a
cell makes a CSV multi-label), so JSONL, whose lists say so, is the format for it; so is a single-label class
holding `;`, which a CSV would split into several."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from bitcli.audit.examples import Examples
from bitcli.audit.findings import Findings
from bitcli.errors import UsageError
from bitcli.labels import LIST_SEPARATOR
from bitcli.ui import display


def check_format(target: Path, examples: Examples) -> None:
    """Refuse (exit 2, once the labels are read, before the embedding pass) FILE.csv for data it would not
    read back as: multi-label data, or a single-label class holding `;` (CSV's label separator)."""
    if target.suffix.lower() != ".csv":
        return
    jsonl = display(target.with_suffix(".jsonl"))
    if examples.multi_label:
        raise UsageError(
            f"--write-clean {display(target)}: the data is multi-label, and a CSV whose rows each keep one label "
            f"reads back as single-label; name {jsonl} (a JSON list of labels a row)"
        )
    held = next((c for c in examples.classes if LIST_SEPARATOR in c), None)
    if held is not None:
        raise UsageError(
            f"--write-clean {display(target)}: class {held!r} holds ';', which separates labels in a "
            f"CSV label file, so it would read back as several labels; name {jsonl}"
        )


def clean_label_file(findings: Findings, target: Path) -> tuple[bytes, int]:
    """The label file (CSV or JSONL by `target`'s suffix; paths relative to its folder where they can be) of
    every example that no finding drops, in source order, and how many it keeps."""
    ex = findings.examples
    drop = findings.dropped()
    keep = [int(i) for i in ex.source_order() if int(i) not in drop]
    with_split = ex.splits != ["data"]
    folder = os.path.abspath(target.parent)
    rows = []
    for i in keep:
        path = os.fspath(ex.ref(i))
        try:
            path = os.path.relpath(os.path.abspath(path), folder)
        except ValueError:  # another drive (Windows): keep it absolute
            path = os.path.abspath(path)
        rows.append((i, path, _split_word(ex.split_name(i)) if with_split else None))
    data = _jsonl(ex, rows) if target.suffix.lower() == ".jsonl" else _csv(ex, rows, with_split=with_split)
    return data.encode("utf-8", "surrogateescape"), len(keep)


def _csv(ex: Examples, rows: list[tuple[int, str, str | None]], *, with_split: bool) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(("path", "label", "split") if with_split else ("path", "label"))
    for i, path, split in rows:
        writer.writerow((path, ex.label(i)) if split is None else (path, ex.label(i), split))
    return buf.getvalue()


def _jsonl(ex: Examples, rows: list[tuple[int, str, str | None]]) -> str:
    lines = []
    for i, path, split in rows:
        record: dict[str, object] = {"path": path, "label": ex.label_set(i) if ex.multi_label else ex.label(i)}
        if split is not None:
            record["split"] = split
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    return "".join(lines)


def _split_word(split: str) -> str:
    return {"validation": "val"}.get(split, split)
