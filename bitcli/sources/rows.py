"""Examples that are rows of a table (a parquet or Arrow data set) rather than files, and the one function
that opens any example as an image.

An example's reference is a file path (str) or a RowRef: (table, row). A data set of rows holds its
references as a Rows view over a numpy array of row numbers, so memory grows by 8 bytes a row, never by a
Python object per row; RowRef objects exist only while an image is being read.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, overload

import numpy as np
from PIL import Image

from bitcli.preprocess import image_size, load_image


class RowTable(Protocol):
    """A split of a data set whose rows hold images (bitcli.sources.dataset.DatasetSplit)."""

    def row_name(self, row: int) -> str: ...  # "data.parquet row 17", for messages
    def image_cell(self, row: int) -> bytes | str: ...  # the encoded image, or the path of its file


@dataclass(frozen=True, slots=True)
class RowRef:
    table: RowTable
    row: int

    def __str__(self) -> str:
        return self.table.row_name(self.row)


class Rows(Sequence[RowRef]):
    """Row numbers of one table, as a sequence of RowRefs made on demand."""

    def __init__(self, table: RowTable, rows: np.ndarray) -> None:
        self.table, self.rows = table, np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    @overload
    def __getitem__(self, index: int) -> RowRef: ...
    @overload
    def __getitem__(self, index: slice) -> Rows: ...
    def __getitem__(self, index):
        if isinstance(index, slice):
            return Rows(self.table, self.rows[index])
        return RowRef(self.table, int(self.rows[index]))

    def take(self, indices: Sequence[int] | np.ndarray) -> Rows:
        return Rows(self.table, self.rows[np.asarray(indices, dtype=np.int64)])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Rows) and other.table is self.table and np.array_equal(other.rows, self.rows)

    __hash__ = None  # type: ignore[assignment]


class Chain(Sequence):
    """Sequences one after the other, indexed without copying them (training then validation examples)."""

    def __init__(self, *parts: Sequence) -> None:
        self.parts = parts
        self.ends = np.cumsum([len(p) for p in parts])

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, index: int):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        part = int(np.searchsorted(self.ends, index, side="right"))
        if part >= len(self.parts):
            raise IndexError(index)
        return self.parts[part][index - (int(self.ends[part - 1]) if part else 0)]


def example_name(ref: str | os.PathLike[str] | RowRef) -> str:
    """The example's printable name: its file's path, or `data.parquet row 17`."""
    if isinstance(ref, RowRef):
        return str(ref)
    return os.fsencode(ref).decode("utf-8", "replace")


def load_example(ref: str | os.PathLike[str] | RowRef) -> Image.Image:
    """Any example as an RGB image, with preprocess.load_image's checks (pixel limits, EXIF, modes) and its
    one-line errors, which name the row for a table's cell."""
    if not isinstance(ref, RowRef):
        return load_image(ref)
    cell = ref.table.image_cell(ref.row)
    if isinstance(cell, str):  # an Image feature that points at a file instead of holding its bytes
        return load_image(cell)
    return load_image(io.BytesIO(cell), name=str(ref))


def example_size(ref: str | os.PathLike[str] | RowRef) -> tuple[int, int]:
    """(width, height) from the header alone, as preprocess.image_size reads a file's."""
    if not isinstance(ref, RowRef):
        return image_size(ref)
    cell = ref.table.image_cell(ref.row)
    if isinstance(cell, str):
        return image_size(cell)
    return image_size(io.BytesIO(cell), name=str(ref))
