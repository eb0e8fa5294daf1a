"""Examples that are rows of a table (a parquet or Arrow data set, or a label file) rather than files found in
a folder, and the one function that opens any example as an image.

An example's reference is a file path (str), a RowPath (a file path that a label file's row lists) or a
RowRef: (table, row). A data set of rows holds its references as a view (Rows, RowPaths) over a numpy array
of row numbers, so memory grows by a few bytes a row, never by a Python object per row; RowRef and RowPath
objects exist only while an image is being read.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar, overload

import numpy as np
from PIL import Image

from bitcli import urls
from bitcli.preprocess import image_size, load_image


class RowTable(Protocol):
    """A split of a data set whose rows hold images (bitcli.sources.dataset.DatasetSplit)."""

    def row_name(self, row: int) -> str: ...  # "data.parquet row 17", for messages
    def image_cell(self, row: int) -> bytes | str: ...  # the encoded image, or the path of its file
    def identity(self) -> str: ...  # the files the rows come from: part of a run's fingerprint


@dataclass(frozen=True, slots=True)
class RowRef:
    table: RowTable
    row: int

    def __str__(self) -> str:
        return self.table.row_name(self.row)


class RowPath(str):
    """An image file's path, as a label file's row lists it; `row` names the row ("labels.csv:18"), so that an
    error decoding the image names the row as every other error about it does."""

    row: str

    def __new__(cls, path: str, row: str) -> RowPath:
        self = super().__new__(cls, path)
        self.row = row
        return self

    def __reduce__(self):
        return RowPath, (str(self), self.row)


class PathTable(Protocol):
    """A label file's rows (bitcli.sources.labelfile.LabelFile)."""

    def row_path(self, row: int) -> RowPath: ...


Ref = TypeVar("Ref")


class RowView(Sequence[Ref], Generic[Ref]):
    """Row numbers of one table, as a sequence of references made on demand."""

    def __init__(self, table, rows: np.ndarray) -> None:
        self.table, self.rows = table, np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return type(self)(self.table, self.rows[index])
        return self._ref(int(self.rows[index]))

    def _ref(self, row: int):
        raise NotImplementedError

    def take(self, indices: Sequence[int] | np.ndarray):
        return type(self)(self.table, self.rows[np.asarray(indices, dtype=np.int64)])

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.table is self.table and np.array_equal(other.rows, self.rows)

    __hash__ = None  # type: ignore[assignment]  # unhashable, as a list: mypy wants a method here


class Rows(RowView[RowRef]):
    """Rows of a data set's split: RowRefs."""

    table: RowTable

    @overload
    def __getitem__(self, index: int) -> RowRef: ...
    @overload
    def __getitem__(self, index: slice) -> Rows: ...
    def __getitem__(self, index):
        return super().__getitem__(index)

    def _ref(self, row: int) -> RowRef:
        return RowRef(self.table, row)


class RowPaths(RowView[str]):
    """Rows of a label file: the RowPaths of their images."""

    table: PathTable

    def _ref(self, row: int) -> RowPath:
        return self.table.row_path(row)


class Chain(Sequence):
    """Sequences one after the other, indexed without copying them (training then validation examples)."""

    def __init__(self, *parts: Sequence) -> None:
        self.parts = parts
        self.ends = np.cumsum([len(p) for p in parts])

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, index: int):  # type: ignore[override]  # a slice is handled too, without Sequence's overloads
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
    one-line errors, which name the row for a table's cell. A URL (a label file may list them) is fetched."""
    if isinstance(ref, str) and urls.is_url(ref):
        return urls.open_image(ref, name=_row_name(ref) if isinstance(ref, RowPath) else None)
    if isinstance(ref, RowPath):
        return load_image(ref, name=_row_name(ref))
    if not isinstance(ref, RowRef):
        return load_image(ref)
    cell = ref.table.image_cell(ref.row)
    if isinstance(cell, str):  # an Image feature that points at a file instead of holding its bytes
        return load_image(cell)
    return load_image(io.BytesIO(cell), name=str(ref))


def example_size(ref: str | os.PathLike[str] | RowRef) -> tuple[int, int]:
    """(width, height) from the header alone, as preprocess.image_size reads a file's (a URL is fetched)."""
    if isinstance(ref, str) and urls.is_url(ref):
        return urls.url_image_size(ref, name=_row_name(ref) if isinstance(ref, RowPath) else None)
    if isinstance(ref, RowPath):
        return image_size(ref, name=_row_name(ref))
    if not isinstance(ref, RowRef):
        return image_size(ref)
    cell = ref.table.image_cell(ref.row)
    if isinstance(cell, str):
        return image_size(cell)
    return image_size(io.BytesIO(cell), name=str(ref))


def _row_name(ref: RowPath) -> str:
    """`labels.csv:18: data/cat/0042.jpg`: how errors about a label file's image name it."""
    return f"{ref.row}: {example_name(str(ref))}"
