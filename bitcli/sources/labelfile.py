"""Label files: a CSV (header row) or JSONL (one object a line) with `path` and `label` columns and an optional
`split` column (train, val or test, or another name of bitcli.sources.splits: valid, dev ...), image paths
relative to the file's folder, or http(s) URLs (bitcli.urls: fetched when the image is decoded). A row may give
several labels (multi-label data): a JSON list in JSONL (`"label": ["cat", "dog"]`), `;`-separated in CSV
(`cat;dog`); one such row makes the whole file multi-label.

The file is read as a stream and each row checked as it is read (its columns, its split, that its image
exists), so the first bad row is reported when it is reached. Rows are kept packed: the paths as one UTF-8
blob with offsets, labels, splits and line numbers as numpy arrays (21 bytes a row beside the paths' text),
never a Python object per row, as a data set of rows keeps its (label, row) index.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import stat
from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np

from bitcli import urls
from bitcli.errors import BitError
from bitcli.labels import LIST_SEPARATOR, separator_error, with_separator
from bitcli.sources.examples import ImageFolder, class_order
from bitcli.sources.features import Columns
from bitcli.sources.rows import RowPath, RowPaths
from bitcli.sources.splits import SPLIT_KEYWORDS, canonical_split
from bitcli.ui import log, visible

SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
SPLIT_KEYS = (None, *SPLIT_KEYWORDS)  # a row's split code indexes this (None: no split column)
COLUMNS = ("path", "label", "split")
HEADER = "path,label[,split]"
DELIMITERS = (",", ";", "\t")  # tried in this order on the header row: the first that finds path and label
MISSING = object()  # a column a row does not have


class LabelFile:
    """A label file's rows, packed; a sources.rows.PathTable (RowPaths make each row's RowPath on demand)."""

    def __init__(self, path: Path, rows: _Packed) -> None:
        self.path, self.folder = path, path.parent
        self.csv = SUFFIXES[path.suffix.lower()] == "csv"  # `;` separates labels in CSV only (JSONL has lists)
        self.blob = rows.blob
        self.offsets = np.frombuffer(rows.ends, dtype=np.int64)
        self.labels = np.frombuffer(rows.labels, dtype=np.int32)
        self.split_codes = np.frombuffer(rows.splits, dtype=np.int8)
        self.lines = np.frombuffer(rows.lines, dtype=np.int64)
        self.names = list(rows.names)  # label values, in order of first appearance (a row's label indexes it)
        # Every row's labels (multi-label files): row r's are set_labels[set_ends[r]:set_ends[r + 1]]
        self.multi = rows.multi
        self.set_labels = np.frombuffer(rows.set_labels, dtype=np.int32)
        self.set_ends = np.frombuffer(rows.set_ends, dtype=np.int64)
        present = np.bincount(self.split_codes, minlength=len(SPLIT_KEYS))
        self.splits = {key for key, count in zip(SPLIT_KEYS, present) if count}  # {None}: no split column

    def key(self, split: str) -> str:
        """FILE:SPLIT's SPLIT (val, valid, ... as in the split column) -> its key, which some rows must have."""
        key = canonical_split(split)
        if None in self.splits:
            raise BitError(
                f"{self.path}: has no split column, so no split {split!r}; pass {self.path} to use every row"
            )
        if key is None or key not in self.splits:  # (None is not in it: refused above)
            listed = ", ".join(s for s in SPLIT_KEYS if s is not None and s in self.splits)
            raise BitError(f"{self.path}: no row has split {split!r} (splits: {listed})")
        return key

    def row(self, row: int) -> str:
        """`labels.csv:18`, for messages."""
        return f"{self.path}:{self.lines[row]}"

    def text(self, row: int) -> str:
        """The row's path as the file gives it."""
        return self.blob[self.offsets[row] : self.offsets[row + 1]].decode("utf-8")

    def row_path(self, row: int) -> RowPath:
        text = self.text(row)
        return RowPath(text if urls.is_url(text) else os.path.join(self.folder, text), self.row(row))

    def scan(self, split: str | None, classes: Sequence[str] | None) -> ImageFolder:
        """The rows of `split` (None: every row), grouped by class, in file order within a class. Classes: the
        labels in examples.class_order; with `classes` (training's) each label must be one of them."""
        if split is None:
            rows = np.arange(len(self.labels))
        else:
            rows = np.flatnonzero(self.split_codes == SPLIT_KEYS.index(split))
        labels = self.labels[rows]
        sets = [self.set_labels[self.set_ends[r] : self.set_ends[r + 1]] for r in rows] if self.multi else None
        every = np.concatenate(sets) if sets else labels
        present = np.flatnonzero(np.bincount(every, minlength=len(self.names)))
        if classes is None:
            classes = class_order(self.names[i] for i in present)
        index = {name: i for i, name in enumerate(classes)}
        mapping = np.asarray([index.get(name, -1) for name in self.names], dtype=np.int64)
        targets = mapping[labels]
        unknown = np.flatnonzero(targets < 0) if sets is None else np.flatnonzero([min(mapping[s]) < 0 for s in sets])
        if len(unknown):
            row = int(rows[unknown[0]])
            name = next(self.names[i] for i in (sets[unknown[0]] if sets else [self.labels[row]]) if mapping[i] < 0)
            raise BitError(
                f"{self.row(row)}: class {name!r} is not among the {len(classes)} training "
                "classes; validation rows must use the training labels"
            )
        source = str(self.path) if split is None else f"{self.path} (split {split})"
        multi_hot = None
        if sets is not None:
            multi_hot = np.zeros((len(rows), len(classes)), dtype=np.uint8)
            for i, s in enumerate(sets):
                multi_hot[i, mapping[s]] = 1
            targets = multi_hot.argmax(1)  # the lowest class: the order of the labels in a row changes nothing
        order = np.argsort(targets, kind="stable")  # grouped by (lowest) class, file order within a class
        return ImageFolder(self.folder, tuple(classes), RowPaths(self, rows[order]), targets[order], source=source,
                           multi_hot=None if multi_hot is None else multi_hot[order])  # fmt: skip


def read_label_file(path: Path, columns: Columns | None = None) -> LabelFile:
    """Every row, checked as it is read: its columns, its split value, and that its image exists; then
    repeated rows (a warning) and an image listed under two labels (an error). `columns`: --image-column and
    --label-column, the names of the path and label columns when they are not `path` and `label`."""
    kind = SUFFIXES[path.suffix.lower()]
    rows = _Packed(path)
    names = (
        (columns.image if columns and columns.image else "path").strip().lower(),
        (columns.label if columns and columns.label else "label").strip().lower(),
    )
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: a BOM (Excel's "CSV UTF-8") is dropped
            for row in _csv_records(f, path, names) if kind == "csv" else _jsonl_records(f, path, names):
                rows.add(*row)
    except FileNotFoundError:
        raise BitError(f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise BitError(f"{path}: not UTF-8 text; save the label file as UTF-8") from None
    except OSError as exc:
        raise BitError(f"{path}: cannot read ({exc.strerror})") from None
    if not len(rows.lines):
        raise BitError(f"{path}: holds no rows; list one image a row with its path and label")
    labels = LabelFile(path, rows)
    _check_repeats(labels, np.frombuffer(rows.keys, dtype=np.int64))
    _check_separators(labels)
    return labels


def _check_separators(labels: LabelFile) -> None:
    """A multi-label file's class may not hold the `;` that separates labels in CSV (bitcli.labels): one line
    naming the first row that gives it (a JSONL file's; in CSV `;` always separates)."""
    name = with_separator(labels.names) if labels.multi else None
    if name is None:
        return
    first = int(np.argmax(labels.set_labels == labels.names.index(name)))
    raise separator_error(labels.row(int(np.searchsorted(labels.set_ends, first, side="right")) - 1), name)


class _Packed:
    """The rows read so far, checked and packed. add() is the loop of a million-row file: cells are checked
    by the fast path first, and messages are formatted only for a bad row."""

    def __init__(self, path: Path) -> None:
        self.path, self.folder = path, path.parent
        self.csv = SUFFIXES[path.suffix.lower()] == "csv"  # `;` separates labels in CSV only (JSONL has lists)
        self.prefix = os.path.join(self.folder, "")  # what a relative path is joined to ("./", "data/")
        self.blob = bytearray()  # the paths as written, one after the other
        self.ends = array("q", [0])  # where each path starts in blob, then where the last one ends
        self.labels, self.splits, self.lines = array("i"), array("b"), array("q")
        self.keys = array("q")  # hash of each image's normalised path, to find repeated rows
        self.names: dict[str, int] = {}
        self.has_split: bool | None = None  # the first row decides: every row has a split, or none
        self.multi = False  # a row gave several labels (a list, or `;` in CSV)
        self.set_labels, self.set_ends = array("i"), array("q", [0])  # every row's labels, one after the other

    def add(self, line: int, image: object, label: object, split: object) -> None:
        image = image.strip() if type(image) is str else image
        if not image or type(image) is not str:
            image = _text(image, "path", f"{self.path}:{line}")
        label = label.strip() if type(label) is str else label
        several = _several(label, f"{self.path}:{line}", csv=self.csv)
        if several is not None:
            self.multi = True
            label = several[0]
        elif not label or type(label) is not str:
            label = _text(label, "label", f"{self.path}:{line}")
        if self.has_split is None:
            self.has_split = split is not MISSING
        code = 0
        if self.has_split:
            code = _SPLIT_CODES.get(split.strip().lower(), -1) if type(split) is str else -1
            if code < 0:
                raise self.bad_split(line, split)
        elif split is not MISSING:
            raise BitError(
                f"{self.path}:{line}: has a split, but line {self.lines[0]} has none; give every row a split, or none"
            )
        if urls.is_url(image):  # fetched when the example is decoded (sources.rows.load_example)
            full = image
            reason = urls.refusal(image)
            if reason is not None:
                raise BitError(f"{self.path}:{line}: {visible(image)}: {reason}")
        else:
            full = image if image.startswith("/") else self.prefix + image
            _check_exists(full, self, line)
        self.blob += image.encode("utf-8")
        self.ends.append(len(self.blob))
        self.labels.append(self.names.setdefault(label, len(self.names)))
        if several is None:
            self.set_labels.append(self.labels[-1])
        else:
            self.set_labels.extend(dict.fromkeys(self.names.setdefault(name, len(self.names)) for name in several))
        self.set_ends.append(len(self.set_labels))
        self.splits.append(code)
        self.lines.append(line)
        self.keys.append(hash(os.path.normpath(full)))  # repeats are looked for once every row is in

    def bad_split(self, line: int, split: object) -> BitError:
        """What is wrong with a split cell that is not a split's name."""
        value = _text(split, "split", f"{self.path}:{line}")
        return BitError(
            f"{self.path}:{line}: unknown split {value!r}; use train, val or test (or leave the split column out)"
        )


_SPLIT_CODES = {word: SPLIT_KEYS.index(key) for key, words in SPLIT_KEYWORDS.items() for word in words}


def _several(label: object, where: str, csv: bool) -> list[str] | None:
    """A multi-label cell's labels: a JSON list (each a string or whole number), or CSV text with `;` between
    labels; None for a single label (a JSON string is one label, `;` or not). An empty list, or an empty label
    in one, is one error line."""
    if isinstance(label, list):
        if not label:
            raise BitError(f"{where}: the label list is empty; give every row at least one label")
        if any(type(v) is str and not v.strip() for v in label):
            raise BitError(f"{where}: an empty label in the list; remove it or write the label")
        return [_text(v, "label", where) for v in label]
    if not (csv and type(label) is str and LIST_SEPARATOR in label):
        return None
    names = [part.strip() for part in label.split(LIST_SEPARATOR)]
    if not all(names):
        raise BitError(f"{where}: an empty label in the `;`-separated list; remove the extra `;` or write the label")
    return names


def _check_exists(full: str, rows: _Packed, line: int) -> None:
    """The image a row names must exist and not be a folder (a dangling link is listed, and named when it does
    not decode)."""
    try:
        mode = os.stat(full).st_mode
    except ValueError:  # a NUL character
        raise BitError(f"{rows.path}:{line}: the path holds a NUL character (\\0); fix the row or remove it") from None
    except OSError:
        if not os.path.islink(full):
            raise BitError(
                f"{rows.path}:{line}: {visible(full)}: no such file; fix the path (relative to {rows.folder}) or "
                "remove the row"
            ) from None
        return
    if stat.S_ISDIR(mode):
        raise BitError(
            f"{rows.path}:{line}: {visible(full)}: is a folder, not an image; list each image in a row of its own"
        )


_KINDS = {bool: "a boolean", int: "a whole number", list: "a list", dict: "an object"}


def _kind(value: object) -> str:
    """What a JSON value is, in words: the float 1e5 (100000.0) has no fraction, but it is no whole number as a
    label either (a CSV's "1e5" or "100000.0" is text; a class named "100000" would differ by the file type)."""
    if isinstance(value, float):
        if math.isnan(value):
            return "not a number"
        if math.isinf(value):
            return "an infinite number"
        return "a number with a fraction" if not value.is_integer() else "a number with a decimal point or exponent"
    return _KINDS.get(type(value), type(value).__name__)


def _text(value: object, column: str, where: str) -> str:
    """A cell as text: a string (trimmed), or for a label a whole number (JSONL labels: 3 is "3")."""
    if isinstance(value, str):
        if value.strip():
            return value.strip()
    elif type(value) is int and column == "label":
        return str(value)
    elif value is not MISSING and value is not None:
        found = json.dumps(value, ensure_ascii=False)
        found = found if len(found) <= 40 else found[:37] + "..."
        raise BitError(
            f"{where}: {column} {found} is {_kind(value)}; a {column} is a string"
            + (' or a whole number (e.g. "cat" or 3)' if column == "label" else "")
        )
    elif value is None:
        raise BitError(f"{where}: {column} is null; give every row a {column}")
    raise BitError(f"{where}: no {column} (each row needs path and label{', and split' if column == 'split' else ''})")


def _row_labels(labels: LabelFile, row: int) -> frozenset[str]:
    """The labels of a row (one, or a multi-label row's set: their order and repeats do not count)."""
    if not labels.multi:
        return frozenset([labels.names[labels.labels[row]]])
    return frozenset(labels.names[c] for c in labels.set_labels[labels.set_ends[row] : labels.set_ends[row + 1]])


def _check_repeats(labels: LabelFile, keys: np.ndarray) -> None:
    """An image listed twice under one label is a warning (each row counts, as listed); under two labels, an
    error naming both rows. Rows are matched by their normalised path (its hash, then the paths compared)."""
    order = np.argsort(keys, kind="stable")  # equal paths together, in file order
    ordered = keys[order]
    starts = np.ones(len(keys), dtype=bool)
    starts[1:] = ordered[1:] != ordered[:-1]
    if starts.all():
        return
    first = order[np.maximum.accumulate(np.where(starts, np.arange(len(keys)), 0))]  # each row's group's first
    repeats: list[tuple[int, int]] = []
    conflicts: list[tuple[int, int]] = []
    for row, earlier in zip(order[~starts].tolist(), first[~starts].tolist()):
        if os.path.normpath(labels.row_path(row)) != os.path.normpath(labels.row_path(earlier)):
            continue  # two paths with one hash
        (repeats if _row_labels(labels, row) == _row_labels(labels, earlier) else conflicts).append((row, earlier))
    if conflicts:
        row, earlier = min(conflicts)
        said, before = (", ".join(map(repr, sorted(_row_labels(labels, r)))) for r in (row, earlier))
        fix = (
            "list each image in one row, with all its labels in that row's list: merge the rows"
            if labels.multi
            else "an image has one label: fix one of the rows or remove it"
        )
        raise BitError(
            f"{labels.row(row)}: {visible(labels.text(row))} is labelled {said} here but {before} on line "
            f"{labels.lines[earlier]}; {fix}"
        )
    if repeats:
        row, earlier = min(repeats)
        log(visible(
            f"{labels.path}: {len(repeats)} row(s) repeat the image and label of an earlier row (first: line "
            f"{labels.lines[row]} repeats line {labels.lines[earlier]}); each row is used, so those images count "
            "more than once"
        ))  # fmt: skip
        across = [(r, e) for r, e in repeats if labels.split_codes[r] != labels.split_codes[e]]
        if across:
            row, earlier = min(across)
            log(visible(
                f"{labels.path}: {len(across)} of them repeat a row of another split (first: line {labels.lines[row]}, "
                f"split {SPLIT_KEYS[labels.split_codes[row]]}, repeats line {labels.lines[earlier]}, split "
                f"{SPLIT_KEYS[labels.split_codes[earlier]]}): those images are trained on and validated on"
            ))  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Records: (line, path, label, split) as the rows come


class _End:
    """The end of a CSV's lines: the csv module asks for another line after the last only when the file ended
    inside a quoted field (a quote opened on the last row and never closed); `reached` says it did."""

    reached = False

    def __iter__(self) -> _End:
        return self

    def __next__(self) -> str:
        self.reached = True
        raise StopIteration


def _csv_records(f, path: Path, names: tuple[str, str]) -> Iterator[tuple[int, object, object, object]]:
    """(line, path, label, split) of each row: a cell the row lacks is MISSING. `names`: of the path and label
    columns (lower case)."""
    header = f.readline()
    if not header:
        raise BitError(f"{path}: is empty; the first row must name the columns: {HEADER}")
    delimiter, columns = _header(header, path, names)
    at = [columns["path"], columns["label"], columns.get("split", -1)]
    width = max(at) + 1
    end = _End()
    reader = csv.reader(itertools.chain(f, end), delimiter=delimiter)
    start = 2  # the line the next record starts on (a quoted field may span lines)
    try:
        for cells in cast("Iterator[list[Any]]", reader):  # csv's strings, and MISSING for each cell a row lacks
            if cells:  # not a blank line
                if len(cells) < width:
                    cells += [MISSING] * (width - len(cells))
                row = start, cells[at[0]], cells[at[1]], cells[at[2]] if at[2] >= 0 else MISSING
                if reader.line_num + 2 - start > 1:  # the record spans lines: a quote left open?
                    _one_line(row, path)
                if end.reached:
                    raise BitError(
                        f'{path}:{start}: a quote (") opened in this row is not closed before the end of the file: '
                        "close or remove it"
                    )
                yield row
            start = reader.line_num + 2
    except csv.Error as exc:
        if "field limit" not in str(exc):
            raise BitError(f"{path}:{start}: not valid CSV ({exc})") from None
        if reader.line_num + 2 - start > 1:  # only a quoted field spans lines
            raise BitError(
                f'{path}:{start}: a field runs over {csv.field_size_limit():,} characters: a quote (") opened in '
                "this row and never closed swallows the lines after it; close or remove the quote"
            ) from None
        raise BitError(
            f"{path}:{start}: a field runs over {csv.field_size_limit():,} characters, far longer than a path or "
            "label; fix the row or remove it"
        ) from None


def _one_line(row: tuple, path: Path) -> None:
    """Paths, labels and splits hold no line break: one that does is what a quote left open reads as."""
    for column, value in zip(COLUMNS, row[1:]):
        if isinstance(value, str) and ("\n" in value or "\r" in value):
            raise BitError(
                f'{path}:{row[0]}: the {column} holds a line break; a quote (") opened in this row is not closed '
                "before the next line: close or remove it"
            )


def _header(line: str, path: Path, wanted: tuple[str, str]) -> tuple[str, dict[str, int]]:
    """The delimiter and {path|label|split: index} from the header row, the path and label columns named by
    `wanted`; names are matched without case or spaces."""
    tried = []
    want = dict(zip(COLUMNS, (*wanted, "split")))
    for delimiter in DELIMITERS:
        cells = next(csv.reader([line], delimiter=delimiter), [])
        names = [c.strip().lower() for c in cells]
        if wanted[0] in names and wanted[1] in names:
            return delimiter, {c: names.index(want[c]) for c in COLUMNS if want[c] in names}
        tried.append((len(cells), delimiter, cells))
    _, delimiter, cells = max(tried, key=lambda t: t[0])  # the cells as the likeliest delimiter splits them
    names = [c.strip().lower() for c in cells]
    flags = zip(wanted, ("path", "label"), ("--image-column", "--label-column"))
    missing = " or ".join(c if c == usual else f"{c!r} ({flag})" for c, usual, flag in flags if c not in names)
    found = ", ".join(repr(c.strip()) for c in cells) or "none"
    split = {",": "", ";": ", split at semicolons", "\t": ", split at tabs"}[delimiter]
    raise BitError(
        visible(
            f"{path}:1: the header has no {missing} column (its columns{split}: {found}); the first row must name "
            f"the columns: {HEADER}"
        )
    )


def _jsonl_records(f, path: Path, names: tuple[str, str]) -> Iterator[tuple[int, object, object, object]]:
    empty = True
    for line, text in enumerate(f, 1):
        empty = False
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
        if names[0] not in record or names[1] not in record:  # keys in another case: "Path", "Label"
            record = {str(k).strip().lower(): v for k, v in record.items()} | record
        yield line, record.get(names[0], MISSING), record.get(names[1], MISSING), record.get("split", MISSING)
    if empty:
        raise BitError(f'{path}: is empty; write one object a line, e.g. {{"path": "a.jpg", "label": "cat"}}')
