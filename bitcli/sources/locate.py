"""DATA (and --val) -> the source that holds it and the parts used, mirroring the train/ + val/ folder layout:
training uses the train part and validates on the validation part; `bit eval` evaluates the validation part,
or the whole data set when it is unsplit or has one split (the rule of every source: bitcli.sources.splits).

DATA is a class folder, a label file (.csv, .jsonl), a parquet file or folder of parquet shards, a folder
written by save_to_disk (each of the last four optionally with :SPLIT), or hf://datasets/OWNER/NAME[@REVISION][:SPLIT].
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bitcli import extras
from bitcli.errors import BitError
from bitcli.options import HUB_DATA_PREFIX
from bitcli.preprocess import IMAGE_EXTENSIONS
from bitcli.sources import folder
from bitcli.sources.examples import ImageFolder
from bitcli.sources.features import Columns
from bitcli.sources.labelfile import SUFFIXES as LABEL_SUFFIXES
from bitcli.sources.splits import MissingSplit, canonical_split, evaluation_split, training_splits
from bitcli.ui import log, visible

LOCAL_HINT = "pass the split's own file or folder"


@dataclass(frozen=True)
class Part:
    """A part of DATA (all of it, or a split) and how to scan it, given the training classes (None: its own)."""

    name: str  # for messages: a folder, "labels.csv (split validation)", "hf://datasets/o/n:validation"
    scan: Callable[[Sequence[str] | None], ImageFolder]
    rows: tuple[str, str | None]  # what it reads, for same_rows: (the real path or Hub data set, the split)

    def same_rows(self, other: Part) -> bool:
        """Whether both parts read the same rows (the same file or folder, however named, and split)."""
        return self.rows == other.rows


def training_parts(data: str | Path, columns: Columns) -> tuple[Part, Part | None]:
    """(training part, validation part or None) of DATA. A named split (FILE:SPLIT, hf://...:SPLIT) is all
    training data, as an unsplit source is."""
    src = _source(data)
    if src.kind == "folder":
        train, val_folder = folder.find_splits(Path(src.where))
        return _folder_part(train), _folder_part(val_folder) if val_folder is not None else None
    if src.kind == "labels":
        from bitcli.sources.labelfile import read_label_file

        labels = read_label_file(Path(src.where), columns)
        if src.split is not None:
            return _label_part(labels, labels.key(src.split)), None
        try:
            train_key, val_key = training_splits(labels.splits)
        except MissingSplit:
            raise BitError(
                f"{src.where}: no row has split train; mark the rows to train on with split train, or name the "
                f"split to train on ({src.where}:SPLIT)"
            ) from None
        return _label_part(labels, train_key), _label_part(labels, val_key) if val_key is not None else None
    from bitcli.sources.dataset import training_keys

    splits, label, hint = _dataset_splits(src, columns, "train")
    key = _key(src)
    train_key, val_key = (key, None) if key is not None else training_keys(list(splits), label, hint)
    val = _dataset_part(splits, val_key, label, columns) if val_key is not None and val_key in splits else None
    return _dataset_part(splits, train_key, label, columns), val


def evaluation_part(data: str | Path, columns: Columns, say: bool = True) -> Part:
    """What `bit eval DATA` evaluates: DATA itself, its named split, or the part that splits.evaluation_split
    picks (its validation part when it has one); said on stderr when `say` and that is only part of DATA."""
    src = _source(data)
    if src.kind == "folder":
        train, val = folder.find_splits(Path(src.where))
        if train == src.where:
            return _folder_part(Path(src.where))
        if val is None:
            raise BitError(f"{src.where}: has train/ but no val/, valid/ or validation/; pass the folder to evaluate")
        part, whole = _folder_part(val), False
    elif src.kind == "labels":
        from bitcli.sources.labelfile import read_label_file

        labels = read_label_file(Path(src.where), columns)
        if src.split is not None:
            return _label_part(labels, labels.key(src.split))
        try:
            key = evaluation_split(labels.splits)
        except MissingSplit:
            others = [s for s in labels.splits if s not in ("train", None)]
            raise BitError(
                f"{src.where}: has train rows but no val rows; mark the rows to evaluate with split val"
                + (f", or name the split to evaluate ({src.where}:{others[0]})" if others else "")
            ) from None
        part, whole = _label_part(labels, key), len(labels.splits) == 1
    else:
        from bitcli.sources.dataset import evaluation_key

        splits, label, hint = _dataset_splits(src, columns, "eval")
        key = _key(src)
        part = _dataset_part(
            splits, key if key is not None else evaluation_key(list(splits), label, hint), label, columns
        )
        whole = key is not None or len(splits) == 1
    if say and not whole:
        log(f"evaluating the validation split {visible(part.name)}")
    return part


def validation_part(data: str | Path, columns: Columns) -> Part:
    """--val: a class folder as it is; another source as `bit eval` would take it."""
    src = _source(data)
    if src.kind == "folder":
        return _folder_part(Path(src.where))
    return evaluation_part(data, columns, say=False)


# ----------------------------------------------------------------------------------------------------------
# Which source


def data_path(data: str | Path) -> Path | None:
    """The file or folder on disk that DATA names (without a `:SPLIT`), or None for a Hub data set."""
    src = _source(data)
    return None if src.kind == "hub" else Path(src.where)


@dataclass(frozen=True)
class Source:
    kind: str  # "folder" | "labels" | "parquet" | "saved" | "hub"
    where: Path | str  # the path, or the hub spec as typed
    split: str | None = None  # FILE:SPLIT's SPLIT (a hub spec's is parsed from `where`)


def _source(data: str | Path) -> Source:
    """DATA's source. `FILE:SPLIT` names a split of a label file, a parquet file or folder, or a save_to_disk
    folder: a path that exists is taken as it is, and a trailing `:NAME` is a split only when the part before it
    is such a source (a path may itself hold ':')."""
    if isinstance(data, str) and data.startswith(HUB_DATA_PREFIX):  # (bitcli.sources.hub imports torch via bitcli.hub)
        return Source("hub", str(data))
    path = Path(data)
    base, colon, split = str(data).rpartition(":")
    names_split = bool(colon and base and split and "/" not in split)
    if names_split and not os.path.lexists(path):
        before = Path(base)
        kind = _kind(before) if _splittable(before) else None
        if kind is not None and kind != "folder":
            return Source(kind, before, split)
    try:
        return Source(_kind(path), path)
    except BitError:
        hint = _literal_file_hint(path, base, split) if names_split else None
        if hint is None:
            raise
        raise BitError(hint) from None


def _literal_file_hint(path: Path, base: str, split: str) -> str | None:
    """When FILE:SPLIT is also the name of a file (which is no data source), and FILE is one: what happened and
    how to name the split instead. None when `path` is not such a file."""
    try:
        kind = _kind(Path(base)) if path.is_file() and _splittable(Path(base)) else None
    except BitError:
        return None
    if kind in (None, "folder"):
        return None
    other_case = f"{base}:{split.upper()}" if split.upper() != split else f"{base}:{split.lower()}"
    spelled = (
        f", or spell the split in another case ({other_case})"
        if canonical_split(split) is not None and not os.path.lexists(other_case)
        else ""
    )
    return (
        f"{path}: is a file of that whole name, so it is not read as split {split!r} of {base} (a path that "
        f"exists is taken as it is), and it is no data source; to use that split, rename or move {path}{spelled}"
    )


def _splittable(path: Path) -> bool:
    """Could hold splits: a label or parquet file (named so: one that is missing is reported as such), or a folder."""
    suffix = path.suffix.lower()
    return path.is_dir() or suffix in LABEL_SUFFIXES or suffix == ".parquet"


def _kind(path: Path) -> str:
    """The kind of source a path is: folder, labels, parquet or saved (a save_to_disk folder)."""
    suffix = path.suffix.lower()
    if suffix in LABEL_SUFFIXES and not path.is_dir():
        return "labels"
    if suffix == ".parquet" and not path.is_dir():
        if not path.exists():
            raise BitError(f"{path}: no such file")
        return "parquet"
    if path.is_dir():
        from bitcli.sources.arrow import is_saved_dataset

        if is_saved_dataset(path):
            return "saved"
        if _parquet_folder(path):
            return "parquet"
    elif path.exists():
        raise BitError(
            f"{path}: is a file; pass a class folder, a label file (.csv, .jsonl), a .parquet file or hf://datasets/OWNER/NAME"
        )
    return "folder"


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


def _key(src: Source) -> str | None:
    """The split named (FILE:SPLIT, or a hub spec's ':SPLIT'), as its key among the data set's splits."""
    if src.kind == "hub":
        from bitcli.sources.hub import parse

        return parse(str(src.where)).key
    if src.split is None:
        return None
    from bitcli.sources.dataset import canonical_split

    return canonical_split(src.split) or src.split


# ----------------------------------------------------------------------------------------------------------
# Parts of each kind


def _folder_part(root: Path) -> Part:
    return Part(str(root), functools.partial(folder.scan, root), rows=(os.path.realpath(root), None))


def _label_part(labels, split: str | None) -> Part:
    name = str(labels.path) if split is None else f"{labels.path} (split {split})"
    return Part(name, functools.partial(labels.scan, split), rows=(os.path.realpath(labels.path), split))


def _dataset_splits(src: Source, columns: Columns, purpose: str):
    """({split: shards}, label for messages, hint naming how to choose a split)."""
    extras.require("datasets", f"reading {visible(str(src.where))}")
    if src.kind == "hub":
        from bitcli.sources.hub import hub_splits, parse

        ds = parse(str(src.where))
        return hub_splits(ds, purpose), ds.label, ds.hint
    path = Path(src.where)
    hint = f"name the split to use ({path}:SPLIT), or {LOCAL_HINT}"
    if src.kind == "saved":
        from bitcli.sources.arrow import saved_splits
        from bitcli.sources.dataset import canonical_split

        found = saved_splits(path, str(path))
        return {canonical_split(k) or k if k is not None else None: v for k, v in found.items()}, str(path), hint
    from bitcli.sources.parquet import parquet_files, shard_splits

    if path.is_dir():
        return shard_splits(path, parquet_files(path), str(path), src.split), str(path), hint
    from bitcli.sources.parquet import ParquetShard

    return {None: [ParquetShard(path, str(path))]}, str(path), hint


def _dataset_part(splits: dict, key: str | None, label: str, columns: Columns) -> Part:
    from bitcli.sources.dataset import DatasetSplit

    if key not in splits:
        if list(splits) == [None]:
            raise BitError(
                f"{label}: has no splits (shard names or a DatasetDict give them), so no split {key!r}; "
                f"pass {label} to use every row"
            )
        raise BitError(f"{label}: has no split {key!r} (splits: {', '.join(map(str, splits))})")
    name = label if key is None else f"{label}:{key}"
    root = Path(label) if not label.startswith("hf://") else splits[key][0].folder
    table = DatasetSplit(name, root, splits[key])
    where = label if label.startswith(HUB_DATA_PREFIX) else os.path.realpath(label)
    return Part(name, lambda classes: table.scan(classes, columns.image, columns.label), rows=(where, key))
