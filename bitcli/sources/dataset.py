"""A split of a Hugging Face data set (parquet shards or save_to_disk Arrow files) as a data set of rows:
the scan reads the label column only, and an image cell is read when the image is decoded.

Memory at scan time is the index of (label, row), 8 + 8 bytes a row; image bytes are read a parquet row
group (or Arrow record batch) at a time, on demand, with a small cache, so a data set of millions of rows
starts as fast as its label column can be read.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from bitcli.errors import BitError
from bitcli.labels import separator_error, with_separator
from bitcli.sources.examples import ImageFolder, class_order
from bitcli.sources.features import Columns, choose_columns, image_cell
from bitcli.sources.rows import Rows
from bitcli.sources.splits import (
    MissingSplit,
    canonical_split,  # noqa: F401 -- sources.locate imports it from here
    evaluation_split,
    training_splits,
)

CACHE_BLOCKS = 8  # row groups kept (of the image column): threads decoding neighbouring rows share them
CACHE_BYTES = 64 << 20


class Shard(Protocol):
    name: str  # for messages: "data.parquet", "hf://datasets/o/n/data/train-00000-of-00001.parquet"
    folder: Path  # relative image paths in cells are relative to it
    num_rows: int
    size: int  # bytes on disk, for the fingerprint
    schema: Any  # pyarrow.Schema
    features: dict | None  # the Hugging Face features, if stated

    def label_batches(self, column: str) -> Iterator[Any]: ...  # the column in row order, batch by batch
    def block_starts(self) -> np.ndarray: ...  # first row of each block (row group or record batch), then num_rows
    def read_block(self, block: int, column: str) -> Any: ...  # that block of the column (a pyarrow Array)


class DatasetSplit:
    """The rows of one split, over its shards in order; a sources.rows.RowTable."""

    def __init__(self, name: str, root: Path, shards: Sequence[Shard]) -> None:
        if not shards:
            raise BitError(f"{name}: holds no rows")
        self.name, self.root, self.shards = name, root, list(shards)
        self.starts = np.cumsum([0] + [s.num_rows for s in self.shards])
        self._blocks = [s.block_starts() for s in self.shards]
        self._cache: OrderedDict[tuple[int, int], Any] = OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.Lock()  # readers are not thread-safe; decoding happens outside the lock
        self.columns: Columns | None = None

    def __getstate__(self) -> dict:
        """Sent to the other processes (distributed.from_main) without the cache and lock; the shards reopen
        their files (see their __reduce__), so nothing is read twice."""
        state = dict(self.__dict__)
        state.update(_cache=OrderedDict(), _cached_bytes=0, _lock=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    def _locate(self, row: int) -> tuple[int, int]:
        shard = int(np.searchsorted(self.starts, row, side="right")) - 1
        return shard, row - int(self.starts[shard])

    def row_name(self, row: int) -> str:
        shard, local = self._locate(row)
        return f"{self.shards[shard].name} row {local}"

    def identity(self) -> str:
        """The files the rows come from (name and size) and the columns: part of the run's fingerprint."""
        files = "".join(f"{s.name}\t{s.size}\n" for s in self.shards)
        return f"{files}{self.columns}\n"

    def image_cell(self, row: int) -> bytes | str:
        shard, local = self._locate(row)
        starts = self._blocks[shard]
        block = int(np.searchsorted(starts, local, side="right")) - 1
        column = self._block(shard, block)
        return image_cell(column[local - int(starts[block])].as_py(), self.shards[shard].folder, self.row_name(row))

    def _block(self, shard: int, block: int) -> Any:
        key = (shard, block)
        with self._lock:
            column = self._cache.get(key)
            if column is not None:
                self._cache.move_to_end(key)
                return column
            assert self.columns is not None and self.columns.image is not None  # chosen before a row is read
            column = self.shards[shard].read_block(block, self.columns.image)
            self._cache[key] = column
            self._cached_bytes += column.nbytes
            while len(self._cache) > 1 and (len(self._cache) > CACHE_BLOCKS or self._cached_bytes > CACHE_BYTES):
                self._cached_bytes -= self._cache.popitem(last=False)[1].nbytes
            return column

    def scan(self, classes: Sequence[str] | None, image: str | None, label: str | None) -> ImageFolder:
        """The rows grouped by class, in row order within a class. Classes: the ClassLabel's names in index
        order, else the label values in examples.class_order (by number when all are integers, else by name); with
        `classes` (training's) the rows' labels are mapped to them by name."""
        first = self.shards[0]
        self.columns = columns = choose_columns(first.schema, first.features, image=image, label=label, where=self.name)
        for shard in self.shards[1:]:
            for column in (columns.image, columns.label):
                if column not in shard.schema.names:
                    raise BitError(
                        f"{shard.name}: has no column {column!r}, which {first.name} has; all shards need the same columns"
                    )
        multi_hot = None
        if columns.multi:
            codes, names, multi_hot = self._label_lists(columns)
        else:
            codes, names = self._label_codes(columns)
        if classes is None:
            counts = multi_hot.sum(0) if multi_hot is not None else np.bincount(codes, minlength=len(names))
            empty = np.flatnonzero(counts == 0)
            if len(empty):
                raise BitError(
                    f"{self.name}: class {names[empty[0]]!r} (ClassLabel index {empty[0]}) has no rows; every class "
                    "needs examples: add rows of it, or name another label column with --label-column"
                )
            classes, targets = tuple(names), codes
        else:
            index = {name: i for i, name in enumerate(classes)}
            unknown = [c for c, name in enumerate(names) if name not in index]
            present = multi_hot[:, unknown].any(1) if multi_hot is not None else np.isin(codes, unknown)
            if present.any():
                row = int(np.argmax(present))
                name = names[codes[row]] if multi_hot is None else names[next(c for c in unknown if multi_hot[row, c])]
                raise BitError(
                    f"{self.row_name(row)}: class {name!r} is not among the {len(classes)} training classes; "
                    "validation data must use the training class names"
                )
            mapping = np.asarray([index.get(name, -1) for name in names], dtype=np.int64)
            targets = mapping[codes]
            if multi_hot is not None:  # the training classes' columns, in their order
                remapped = np.zeros((len(codes), len(classes)), dtype=np.uint8)
                remapped[:, mapping[mapping >= 0]] = multi_hot[:, mapping >= 0]
                multi_hot = remapped
            classes = tuple(classes)
        if multi_hot is not None:
            targets = multi_hot.argmax(1)  # the lowest class: the order of the labels in a row changes nothing
        order = np.argsort(targets, kind="stable")  # grouped by class, rows in order within each
        return ImageFolder(self.root, classes, Rows(self, order), targets[order], source=self.name,
                           multi_hot=None if multi_hot is None else multi_hot[order])  # fmt: skip

    def _label_lists(self, columns: Columns) -> tuple[np.ndarray, list[str], np.ndarray]:
        """A Sequence(ClassLabel) column: each row's first class (it groups the rows), the names, and the
        multi-hot [rows, classes] matrix of every row's classes."""
        assert columns.label is not None
        names = list(columns.names) if columns.names is not None else self._list_values(columns.label)
        index = {name: i for i, name in enumerate(names)}
        total = int(self.starts[-1])
        codes = np.empty(total, dtype=np.int64)
        multi_hot = np.zeros((total, len(names)), dtype=np.uint8)
        row = 0
        for shard in self.shards:
            for batch in shard.label_batches(columns.label):
                lengths = np.asarray(batch.value_lengths().fill_null(0), dtype=np.int64)
                if columns.names is None:  # values: their index among the names (-1: an empty one)
                    flat = [_value_name(v) for v in batch.flatten().to_pylist()]
                    values = np.asarray([index.get(v, -1) if v else -1 for v in flat], dtype=np.int64)
                else:
                    values = np.asarray(batch.flatten().fill_null(-1), dtype=np.int64)
                empty = np.flatnonzero(lengths == 0)
                if len(empty):
                    raise BitError(f"{self.row_name(row + int(empty[0]))}: label list is empty; give every row a label")
                wrong = (values < 0) | (values >= len(names))
                if wrong.any():
                    at = int(np.searchsorted(np.cumsum(lengths), int(np.argmax(wrong)), side="right"))
                    if columns.names is None:
                        raise BitError(
                            f"{self.row_name(row + at)}: an empty label in the list; remove it or write the label"
                        )
                    raise BitError(
                        f"{self.row_name(row + at)}: a label is not one of the {len(names)} ClassLabel classes "
                        f"(0-{len(names) - 1}); drop the row or fix its labels"
                    )
                rows = row + np.repeat(np.arange(len(lengths)), lengths)
                multi_hot[rows, values] = 1
                codes[row : row + len(lengths)] = values[np.cumsum(lengths) - lengths]
                row += len(lengths)
        bad = with_separator(names)
        if bad is not None:  # (bitcli.labels: `;` separates labels in CSV) named at its first row, if it has one
            rows = np.flatnonzero(multi_hot[:, names.index(bad)])
            raise separator_error(self.row_name(int(rows[0])) if len(rows) else f"{self.name} (its ClassLabel)", bad)
        return codes, names, multi_hot

    def _list_values(self, label: str) -> list[str]:
        """A column of plain lists' class names: every value that occurs (integers as text), in class order."""
        import pyarrow.compute as pc

        seen: set[str] = set()
        for shard in self.shards:
            for batch in shard.label_batches(label):
                seen.update(_value_name(v) for v in pc.unique(batch.flatten()).to_pylist())
        seen.discard("")
        return list(class_order(seen))

    def _label_codes(self, columns: Columns) -> tuple[np.ndarray, list[str]]:
        """Each row's index into the list of names (the ClassLabel's, or the values in examples.class_order)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        assert columns.label is not None  # choose_columns names it
        codes = np.empty(int(self.starts[-1]), dtype=np.int64)
        seen: dict[str, int] = {}  # value labels: name -> code in order of appearance
        row = 0
        for shard in self.shards:
            for batch in shard.label_batches(columns.label):
                if batch.null_count:
                    bad = row + int(np.argmax(np.asarray(batch.is_null())))
                    raise BitError(f"{self.row_name(bad)}: label is empty; give every row a label")
                if columns.names is not None:
                    values = np.asarray(batch.to_numpy(zero_copy_only=False), dtype=np.int64)
                    wrong = (values < 0) | (values >= len(columns.names))
                    if wrong.any():
                        at = int(np.argmax(wrong))
                        raise BitError(
                            f"{self.row_name(row + at)}: label {values[at]} is not one of the {len(columns.names)} "
                            f"ClassLabel classes (0-{len(columns.names) - 1}); drop the row or fix its label"
                        )
                else:
                    encoded = pc.dictionary_encode(pc.cast(batch, pa.string()))
                    local = [seen.setdefault(name, len(seen)) for name in encoded.dictionary.to_pylist()]
                    values = np.asarray(local, dtype=np.int64)[np.asarray(encoded.indices, dtype=np.int64)]
                codes[row : row + len(values)] = values
                row += len(values)
        if columns.names is not None:
            return codes, list(columns.names)
        names = list(class_order(seen))
        rank = np.empty(len(seen), dtype=np.int64)
        rank[[seen[n] for n in names]] = np.arange(len(names))
        return rank[codes], names


def training_keys(splits: Sequence[str | None], label: str, hint: str) -> tuple[str | None, str | None]:
    """The splits a run trains and validates on (splits.training_splits), or one line saying what is missing."""
    try:
        return training_splits(splits)
    except MissingSplit:
        raise BitError(f"{label}: {_has(splits)} but no train split; {hint}") from None


def evaluation_key(splits: Sequence[str | None], label: str, hint: str) -> str | None:
    """The split `bit eval` evaluates (splits.evaluation_split), or one line saying what is missing."""
    try:
        return evaluation_split(splits)
    except MissingSplit:
        raise BitError(f"{label}: {_has(splits)} but no validation split; {hint}") from None


def _has(splits: Sequence[str | None]) -> str:
    return f"has split(s) {', '.join(map(str, splits))}" if splits else "has no splits"


def _value_name(value: object) -> str:
    """A label in a list column as a class name: text trimmed, an integer as its digits ("" for none)."""
    return "" if value is None else str(value).strip()
