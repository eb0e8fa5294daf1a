"""Label files: a CSV (header row) or JSONL (one object a line) with `path` and `label` columns and an optional
`split` column (train, val, valid, validation or test), image paths relative to the file's folder."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from bitcli.data import ImageFolder
from bitcli.errors import BitError

SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
SPLITS = {"train": "train", "val": "validation", "valid": "validation", "validation": "validation", "test": "test"}


@dataclass(frozen=True)
class Row:
    where: str  # "labels.csv:18", for messages
    path: str  # the image's path (relative ones joined to the label file's folder)
    label: str


@dataclass(frozen=True)
class LabelFile:
    path: Path
    splits: dict[str | None, list[Row]]  # {None: rows} without a split column

    def scan(self, split: str | None, classes: Sequence[str] | None) -> ImageFolder:
        """The rows of `split`, grouped by class (classes sorted by name), in file order within a class. With
        `classes` (training's) each label must be one of them."""
        rows = self.splits.get(split, [])
        if classes is None:
            classes = tuple(sorted({r.label for r in rows}))
        index = {name: i for i, name in enumerate(classes)}
        for r in rows:
            if r.label not in index:
                raise BitError(
                    f"{r.where}: class {r.label!r} is not among the {len(classes)} training classes; "
                    "validation rows must use the training labels"
                )
        ordered = sorted(rows, key=lambda r: index[r.label])  # stable: file order within a class
        source = str(self.path) if split is None else f"{self.path} (split {split})"
        return ImageFolder(self.path.parent, tuple(classes), tuple(r.path for r in ordered),
                           tuple(index[r.label] for r in ordered), source=source)  # fmt: skip


def read_label_file(path: Path) -> LabelFile:
    """Every row, checked: its columns, its split value, and that its image exists."""
    kind = SUFFIXES[path.suffix.lower()]
    try:
        with open(path, encoding="utf-8", newline="") as f:
            records = list(_csv_records(f, path) if kind == "csv" else _jsonl_records(f, path))
    except FileNotFoundError:
        raise BitError(f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise BitError(f"{path}: not UTF-8 text; save the label file as UTF-8") from None
    except OSError as exc:
        raise BitError(f"{path}: cannot read ({exc.strerror})") from None
    if not records:
        raise BitError(f"{path}: holds no rows; list one image a row with its path and label")
    has_split = any("split" in record for _, record in records)
    splits: dict[str | None, list[Row]] = {}
    for line, record in records:
        where = f"{path}:{line}"
        image, label = _field(record, "path", where), _field(record, "label", where)
        split = None
        if has_split:
            value = _field(record, "split", where)
            split = SPLITS.get(value.lower())
            if split is None:
                raise BitError(
                    f"{where}: unknown split {value!r}; use train, val or test (or leave the split column out)"
                )
        full = os.path.join(path.parent, image)
        if not os.path.lexists(full):  # a dangling link or a pipe is listed, and named when it does not decode
            raise BitError(f"{where}: {full}: no such file; fix the path (relative to {path.parent}) or remove the row")
        splits.setdefault(split, []).append(Row(where, full, label))
    return LabelFile(path, splits)


def _field(record: dict, column: str, where: str) -> str:
    value = record.get(column)
    if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value).strip() == "":
        raise BitError(
            f"{where}: no {column} (each row needs path and label{', and split' if column == 'split' else ''})"
        )
    return str(value).strip()


def _csv_records(f, path: Path) -> Iterator[tuple[int, dict]]:
    reader = csv.DictReader(f)
    missing = [c for c in ("path", "label") if c not in (reader.fieldnames or [])]
    if missing:
        raise BitError(
            f"{path}:1: the header has no {' or '.join(missing)} column; the first row must name the columns: path,label[,split]"
        )
    start = 2
    for record in reader:
        yield start, record
        start = reader.line_num + 1  # a quoted field may span lines


def _jsonl_records(f, path: Path) -> Iterator[tuple[int, dict]]:
    for line, text in enumerate(f, 1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except ValueError as exc:
            raise BitError(f"{path}:{line}: not valid JSON ({exc}); write one object a line") from None
        if not isinstance(record, dict):
            raise BitError(
                f'{path}:{line}: not a JSON object; write one object a line, e.g. {{"path": "a.jpg", "label": "cat"}}'
            )
        yield line, record
