"""DATA (and --val) -> the source that holds it and the parts used, mirroring the train/ + val/ folder layout:
training uses the train part and validates on the validation part; `bit eval` evaluates the validation part,
or the whole data set when it has no train part.

DATA is a class folder, a label file (.csv, .jsonl), a parquet file or folder of parquet shards, a folder
written by save_to_disk, or hf://datasets/OWNER/NAME[@REVISION][:SPLIT].
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bitcli.data import ImageFolder
from bitcli.errors import BitError
from bitcli.options import HUB_DATA_PREFIX
from bitcli.preprocess import IMAGE_EXTENSIONS
from bitcli.sources import folder
from bitcli.sources.labelfile import SUFFIXES as LABEL_SUFFIXES
from bitcli.ui import log, visible

INSTALL = "pip install 'bitcli[datasets]'"
LOCAL_HINT = "pass the split's own file or folder"


@dataclass(frozen=True)
class Part:
    """A part of DATA (all of it, or a split) and how to scan it, given the training classes (None: its own)."""

    name: str  # for messages: a folder, "labels.csv (split validation)", "hf://datasets/o/n:validation"
    scan: Callable[[Sequence[str] | None], ImageFolder]


@dataclass(frozen=True)
class Columns:
    """--image-column and --label-column as given (None: found from the data set's features)."""

    image: str | None = None
    label: str | None = None


def training_parts(data: str | Path, columns: Columns) -> tuple[Part, Part | None]:
    """(training part, validation part or None) of DATA."""
    kind, where = _kind(data)
    if kind == "folder":
        train, val = folder.find_splits(where)
        return _folder_part(train), _folder_part(val) if val is not None else None
    if kind == "labels":
        from bitcli.sources.labelfile import read_label_file

        labels = read_label_file(where)
        train_key, val_key = (None, None) if None in labels.splits else ("train", "validation")
        if train_key not in labels.splits:
            raise BitError(f"{where}: no row has split train; mark the rows to train on with split train")
        val = _label_part(labels, val_key) if val_key in labels.splits else None
        return _label_part(labels, train_key), val
    from bitcli.sources.dataset import training_keys

    splits, label, hint = _dataset_splits(kind, where, columns, "train")
    train_key, val_key = (
        (_explicit(where), None) if _explicit(where) is not None else training_keys(list(splits), label, hint)
    )
    val = _dataset_part(splits, val_key, label, columns) if val_key is not None and val_key in splits else None
    return _dataset_part(splits, train_key, label, columns), val


def evaluation_part(data: str | Path, columns: Columns, say: bool = True) -> Part:
    """What `bit eval DATA` evaluates: DATA itself, or its validation part when it has a train part
    (said on stderr when `say`)."""
    kind, where = _kind(data)
    if kind == "folder":
        train, val = folder.find_splits(where)
        if train == where:
            return _folder_part(where)
        if val is None:
            raise BitError(f"{where}: has train/ but no val/, valid/ or validation/; pass the folder to evaluate")
        part = _folder_part(val)
    elif kind == "labels":
        from bitcli.sources.labelfile import LabelFile, read_label_file

        labels = read_label_file(where)
        if None in labels.splits:
            return _label_part(labels, None)
        if "train" not in labels.splits:  # a split column without train rows: all of it, as a folder without train/
            return _label_part(LabelFile(where, {None: [r for rows in labels.splits.values() for r in rows]}), None)
        if "validation" not in labels.splits:
            raise BitError(f"{where}: has train rows but no val rows; mark the rows to evaluate with split val")
        part = _label_part(labels, "validation")
    else:
        from bitcli.sources.dataset import evaluation_key

        splits, label, hint = _dataset_splits(kind, where, columns, "eval")
        key = _explicit(where) if _explicit(where) is not None else evaluation_key(list(splits), label, hint)
        part = _dataset_part(splits, key, label, columns)
        if key in (None, _explicit(where)) or len(splits) == 1:
            return part
    if say:
        log(f"evaluating the validation split {visible(part.name)}")
    return part


def validation_part(data: str | Path, columns: Columns) -> Part:
    """--val: a class folder as it is; another source as `bit eval` would take it."""
    kind, where = _kind(data)
    if kind == "folder":
        return _folder_part(where)
    return evaluation_part(data, columns, say=False)


# ----------------------------------------------------------------------------------------------------------
# Which source


def _kind(data: str | Path) -> tuple[str, Path | str]:
    """("folder" | "labels" | "parquet" | "saved" | "hub", the path or spec)."""
    if isinstance(data, str) and data.startswith(HUB_DATA_PREFIX):  # (bitcli.sources.hub imports torch via bitcli.hub)
        return "hub", str(data)
    path = Path(data)
    suffix = path.suffix.lower()
    if suffix in LABEL_SUFFIXES and not path.is_dir():
        return "labels", path
    if suffix == ".parquet" and not path.is_dir():
        if not path.exists():
            raise BitError(f"{path}: no such file")
        return "parquet", path
    if path.is_dir():
        from bitcli.sources.arrow import is_saved_dataset

        if is_saved_dataset(path):
            return "saved", path
        if _parquet_folder(path):
            return "parquet", path
    elif path.exists():
        raise BitError(
            f"{path}: is a file; pass a class folder, a label file (.csv, .jsonl), a .parquet file or hf://datasets/OWNER/NAME"
        )
    return "folder", path


def _parquet_folder(path: Path) -> bool:
    """A folder of .parquet files and no images (the walk stops at the first image: a class folder's cost)."""
    found = False
    for _, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            suffix = os.path.splitext(name)[1].lower()
            if suffix in IMAGE_EXTENSIONS:
                return False
            found = found or suffix == ".parquet"
    return found


def _explicit(where: Path | str) -> str | None:
    """The split a hub spec names after ':', as its key."""
    if isinstance(where, str):
        from bitcli.sources.hub import parse

        return parse(where).key
    return None


# ----------------------------------------------------------------------------------------------------------
# Parts of each kind


def _folder_part(root: Path) -> Part:
    return Part(str(root), functools.partial(folder.scan, root))


def _label_part(labels, split: str | None) -> Part:
    name = str(labels.path) if split is None else f"{labels.path} (split {split})"
    return Part(name, functools.partial(labels.scan, split))


def _dataset_splits(kind: str, where: Path | str, columns: Columns, purpose: str):
    """({split: shards}, label for messages, hint naming how to choose a split)."""
    if importlib.util.find_spec("pyarrow") is None:
        raise BitError(f"reading {visible(str(where))} needs pyarrow, which is not installed: {INSTALL}")
    if kind == "hub":
        from bitcli.sources.hub import hub_splits, parse

        ds = parse(str(where))
        return hub_splits(ds, purpose), ds.label, ds.hint
    if kind == "saved":
        from bitcli.sources.arrow import saved_splits
        from bitcli.sources.dataset import canonical_split

        found = saved_splits(Path(where), str(where))
        return {canonical_split(k) or k if k is not None else None: v for k, v in found.items()}, str(where), LOCAL_HINT
    from bitcli.sources.parquet import parquet_files, shard_splits

    path = Path(where)
    if path.is_dir():
        return shard_splits(path, parquet_files(path), str(path)), str(path), LOCAL_HINT
    from bitcli.sources.parquet import ParquetShard

    return {None: [ParquetShard(path, str(path))]}, str(path), LOCAL_HINT


def _dataset_part(splits: dict, key: str | None, label: str, columns: Columns) -> Part:
    from bitcli.sources.dataset import DatasetSplit

    if key not in splits:
        raise BitError(f"{label}: has no split {key!r} (splits: {', '.join(map(str, splits))})")
    name = label if key is None else f"{label}:{key}"
    root = Path(label) if not label.startswith("hf://") else splits[key][0].folder
    table = DatasetSplit(name, root, splits[key])
    return Part(name, lambda classes: table.scan(classes, columns.image, columns.label))
