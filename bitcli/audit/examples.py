"""The splits an audit looks at (DATA's train and validation parts, --val, --test, DATA's test part), and every
example of them as one table: split, index in its split, printable name and label (multi-label data: every
label, as a multi-hot row), with one class list (the label names of every split, in class order), so that
labels compare across splits by name."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bitcli.errors import BitError
from bitcli.sources import folder
from bitcli.sources.examples import ImageFolder, class_order
from bitcli.sources.labelfile import LabelFile
from bitcli.sources.locate import Columns, Part, evaluation_part, training_parts, validation_part
from bitcli.sources.rows import RowPaths, Rows
from bitcli.ui import log, visible

DataSpec = Path | str


@dataclass(frozen=True)
class Examples:
    """Every example of every split, in split order then each split's own order."""

    splits: list[str]  # "train", "validation", "test" (or "data": DATA without splits)
    parts: list[ImageFolder]
    classes: tuple[str, ...]  # every split's label names, in class order
    split: np.ndarray  # [N] index into splits
    index: np.ndarray  # [N] index into its part
    labels: np.ndarray  # [N] index into classes (multi-label: the example's lowest class)
    names: list[str]  # as the source gives them: the file's path, or "data.parquet row 17"
    # [N, classes] uint8, every class of each example, when a split is multi-label (a single-label split's rows
    # then have one class each); None: every split is single-label
    multi_hot: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.names)

    def ref(self, i: int):
        return self.parts[int(self.split[i])].paths[int(self.index[i])]

    def split_name(self, i: int) -> str:
        return self.splits[int(self.split[i])]

    def label(self, i: int) -> str:
        return self.classes[int(self.labels[i])]

    @property
    def multi_label(self) -> bool:
        return self.multi_hot is not None

    def label_set(self, i: int) -> list[str]:
        """Every class of example i, in class order (single-label data: its one class)."""
        if self.multi_hot is None:
            return [self.label(i)]
        return [self.classes[c] for c in np.flatnonzero(self.multi_hot[i])]

    def same_labels(self, a: int, b: int) -> bool:
        """Examples a and b carry the same classes (multi-label: the same set)."""
        if self.multi_hot is None:
            return bool(self.labels[a] == self.labels[b])
        return bool(np.array_equal(self.multi_hot[a], self.multi_hot[b]))

    def members(self, c: int) -> np.ndarray:
        """Whether each example carries class c ([N] bool)."""
        return self.labels == c if self.multi_hot is None else self.multi_hot[:, c].astype(bool)

    def source_order(self) -> np.ndarray:
        """Every example number in the order its sources list them: each source in the order the splits first
        name it, a source's examples in its own order (ImageFolder.source_rank: a label file's rows in row
        order, not grouped by class); the splits of one label file (its split column) interleaved as its rows
        are."""
        source, position = np.zeros(len(self), dtype=np.int64), np.zeros(len(self), dtype=np.int64)
        first: dict[object, int] = {}
        for s, part in enumerate(self.parts):
            members = np.flatnonzero(self.split == s)
            index = self.index[members]
            if isinstance(part.paths, RowPaths) and isinstance(part.paths.table, LabelFile):
                key: object = ("file", str(part.paths.table.path))  # a label file's splits share its row numbers
                position[members] = part.paths.rows[index]
            else:
                key = ("split", s)
                position[members] = part.source_rank()[index]
            source[members] = first.setdefault(key, len(first))
        return np.lexsort((position, source))

    def files_only(self) -> bool:
        """Every example is an image file (a class folder or a label file), not a row holding the image."""
        return not any(isinstance(p.paths, Rows) for p in self.parts)


def audit_parts(data: DataSpec, val: DataSpec | None, test: DataSpec | None, columns: Columns) -> dict[str, Part]:
    """{split: part}: DATA's training part and its validation part (or --val), and --test or DATA's test part.
    DATA without splits is one split, "data"."""
    train, own_val = training_parts(data, columns)
    parts = {"train": train}
    if val is not None:
        parts["validation"] = _given(val, "--val", train, columns)
    elif own_val is not None:
        parts["validation"] = own_val
    found_test = _own_test(data, columns) if test is None else _given(test, "--test", train, columns)
    if found_test is not None:
        parts["test"] = found_test
    if len(parts) == 1:
        return {"data": train}
    return parts


def _given(spec: DataSpec, flag: str, train: Part, columns: Columns) -> Part:
    """--val or --test's part; a warning when it reads DATA's training rows (bit finetune --val's warning)."""
    part = validation_part(spec, columns)
    if part.same_rows(train):  # allowed, but every image is then reported as a leak of itself
        log(visible(
            f"warning: {flag} {spec}: is the training data ({train.name}), so every image is a leak of itself; "
            "pass the rows held out for it"
        ))  # fmt: skip
    return part


def _own_test(data: DataSpec, columns: Columns) -> Part | None:
    """DATA's test split, when it has one (a test/ folder beside train/, rows or a split named test)."""
    if isinstance(data, Path) and data.is_dir():
        found = folder.test_split(data)
        if found is not None:
            return validation_part(found, columns)
    try:
        return evaluation_part(f"{data}:test", columns, say=False)
    except BitError:  # no test split (or no splits at all): nothing to add
        return None


def gather(parts: dict[str, Part]) -> Examples:
    """Every part scanned with its own classes, as one table."""
    return table({name: part.scan(None) for name, part in parts.items()})


def table(scanned: dict[str, ImageFolder]) -> Examples:
    """Scanned splits as one table of examples."""
    classes = class_order(c for ds in scanned.values() for c in ds.classes)
    position = {c: i for i, c in enumerate(classes)}
    split, index, labels, names, hot = [], [], [], [], []
    for s, ds in enumerate(scanned.values()):
        to_global = np.asarray([position[c] for c in ds.classes], dtype=np.int64)
        targets = np.asarray(ds.targets, dtype=np.int64)
        split.append(np.full(len(ds), s, dtype=np.int64))
        index.append(np.arange(len(ds), dtype=np.int64))
        labels.append(to_global[targets] if len(ds) else targets)
        names += [ds.name(i) for i in range(len(ds))]
        rows = np.zeros((len(ds), len(classes)), dtype=np.uint8)
        if ds.multi_hot is not None:
            rows[:, to_global] = ds.multi_hot
        elif len(ds):
            rows[np.arange(len(ds)), to_global[targets]] = 1
        hot.append(rows)
    multi = any(ds.multi_hot is not None for ds in scanned.values())
    return Examples(
        splits=list(scanned),
        parts=list(scanned.values()),
        classes=classes,
        split=np.concatenate(split),
        index=np.concatenate(index),
        labels=np.concatenate(labels),
        names=names,
        multi_hot=np.concatenate(hot) if multi else None,
    )
