"""The labelled data set every source gives (bitcli.sources): examples with class indices, grouped by class in
class order, and the one class order of names. bitcli.data (sampling, few-shot, decoding for training) and
every source module build on it; it imports nothing above the sources."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bitcli.sources.rows import RowPath, Rows, RowView, example_name

_INTEGER = re.compile(r"-?[0-9]+")


@dataclass(frozen=True)
class ImageFolder:
    """Examples with class indices, from any source (bitcli.sources), grouped by class in class order.

    `paths` holds each example's reference: an image file's path (a class folder), or for the rows of a label
    file or data set a sources.rows view (RowPaths, Rows: row numbers, with `targets` a numpy array).
    `classes` are the sub-folder names or label values in class_order, or a ClassLabel's names.
    `source` names a label file or data set in messages (None: `root` is the class folder).
    """

    root: Path
    classes: tuple[str, ...]
    paths: Sequence[str] | Rows
    targets: Sequence[int] | np.ndarray
    source: str | None = None
    # Multi-label data (a label file with a list of labels a row): each example's classes as a multi-hot
    # uint8 [N, classes] matrix, in the order of `paths`; `targets` then holds each example's lowest class index
    # (it only groups the examples: whatever the order of the labels in a row, the same order). counts() and
    # by_class() count every class of an example. None: single-label data.
    multi_hot: np.ndarray | None = None

    @property
    def multi_label(self) -> bool:
        return self.multi_hot is not None

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices: Iterable[int]) -> ImageFolder:
        idx = sorted(int(i) for i in indices)
        multi_hot = None if self.multi_hot is None else self.multi_hot[idx]
        if isinstance(self.paths, RowView):
            return dataclasses.replace(
                self, paths=self.paths.take(idx), targets=np.asarray(self.targets)[idx], multi_hot=multi_hot
            )
        return dataclasses.replace(
            self, paths=tuple(self.paths[i] for i in idx), targets=tuple(self.targets[i] for i in idx),
            multi_hot=multi_hot,
        )  # fmt: skip

    def name(self, index: int) -> str:
        """Example `index` for messages: its file, or `data.parquet row 17`."""
        return example_name(self.paths[index])

    def where(self, c: int | None = None) -> str:
        """The data set (or class c of it) for messages: the folder (class folder), or the label file or data set."""
        if self.source is not None:
            return self.source
        return str(self.root if c is None else self.root / self.classes[c])

    def first_row(self, c: int) -> str | None:
        """Where class c's first example is, for messages (`labels.csv:18`, `data.parquet row 17`); None for a
        class folder (the folder is named) or a class without examples."""
        if not isinstance(self.paths, RowView):
            return None
        targets = np.asarray(self.targets, dtype=np.int64)
        first = int(np.searchsorted(targets, c))  # grouped by class, in class order
        if first == len(targets) or targets[first] != c:
            return None
        ref = self.paths[first]
        return ref.row if isinstance(ref, RowPath) else example_name(ref)

    def counts(self) -> list[int]:
        """Examples of each class (multi-label: every example that carries it)."""
        if self.multi_hot is not None:
            return self.multi_hot.sum(0, dtype=np.int64).tolist()
        return np.bincount(np.asarray(self.targets, dtype=np.int64), minlength=len(self.classes)).tolist()

    def by_class(self) -> list[np.ndarray]:
        """Each class's example indices (multi-label: an example is in the list of each of its classes)."""
        if self.multi_hot is not None:
            return [np.flatnonzero(self.multi_hot[:, c]) for c in range(len(self.classes))]
        targets = np.asarray(self.targets, dtype=np.int64)
        return [np.flatnonzero(targets == c) for c in range(len(self.classes))]

    def source_rank(self) -> np.ndarray:
        """Each example's position in the order its source lists it: a label file's or a data set's rows in row
        order (the examples themselves are grouped by class); a class folder's as they are (its classes in class
        order, each folder's files in the order it lists them: the examples' own order)."""
        rank = np.arange(len(self.paths), dtype=np.int64)
        if isinstance(self.paths, RowView):
            rank[np.argsort(self.paths.rows, kind="stable")] = rank.copy()
        return rank

    def relative(self, index: int) -> str:
        """Image `index`'s path relative to the root (as found under it), or its row's name."""
        if isinstance(self.paths, Rows):
            return str(self.paths[index])
        path, prefix = self.paths[index], str(self.root) + os.sep
        return path[len(prefix) :] if path.startswith(prefix) else path

    def fingerprint(self) -> str:
        """Names, classes and sizes of the files (for rows: the data set's files, then each row and class): a
        resumed run must see the same data. Taken over the images a run uses, so skipping an undecodable file
        or deleting it gives the same fingerprint."""
        h = hashlib.sha256()
        if isinstance(self.paths, Rows):
            h.update(self.paths.table.identity().encode("utf-8", "surrogateescape"))
        for i, target in enumerate(self.targets):
            try:
                size = -1 if isinstance(self.paths, Rows) else os.stat(self.paths[i]).st_size
            except OSError:
                size = -1
            label = self.classes[target]
            if self.multi_hot is not None:  # every class of the example
                label = ";".join(self.classes[c] for c in np.flatnonzero(self.multi_hot[i]))
            h.update(f"{self.relative(i)}\t{label}\t{size}\n".encode("utf-8", "surrogateescape"))
        return h.hexdigest()


def class_order(names: Iterable[str]) -> tuple[str, ...]:
    """Class names (folder names, label values) in class order: by number when every one is an integer ("2"
    before "10"), else by name. Every source orders its classes this way, so the same rows make the same
    classifier whatever holds them (a ClassLabel keeps its own index order)."""
    ordered = sorted(set(names))
    if ordered and all(_INTEGER.fullmatch(name) for name in ordered):
        ordered.sort(key=int)  # stable: "01" and "1" keep their order by name
    return tuple(ordered)
