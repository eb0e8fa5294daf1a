"""Parquet files: one file, or a folder of shards (a Hub data set's layout: data/train-00000-of-00002.parquet,
train/0000.parquet ...), read with pyarrow a row group at a time."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bitcli.errors import BitError, one_line
from bitcli.sources.features import schema_features
from bitcli.sources.splits import SPLIT_KEYWORDS, canonical_split

LABEL_BATCH = 1 << 16  # label values read at a time while scanning


class ParquetShard:
    """One parquet file: its label column read in batches, its image column a row group at a time."""

    def __init__(self, path: Path, name: str) -> None:
        import pyarrow.parquet as pq

        self.path, self.name, self.folder = path, name, path.parent
        try:
            self.file = pq.ParquetFile(path)
        except (OSError, ValueError) as exc:  # pyarrow.ArrowInvalid is a ValueError
            raise BitError(f"{name}: not a parquet file pyarrow can read ({one_line(exc, limit=200)})") from None
        meta = self.file.metadata
        self.num_rows, self.size = meta.num_rows, path.stat().st_size
        self.schema = self.file.schema_arrow
        self.features = schema_features(self.schema)
        self._starts = np.cumsum([0] + [meta.row_group(i).num_rows for i in range(meta.num_row_groups)])

    def __reduce__(self):  # another process opens the file itself
        return ParquetShard, (self.path, self.name)

    def label_batches(self, column: str) -> Iterator[Any]:
        for batch in self.file.iter_batches(batch_size=LABEL_BATCH, columns=[column], use_threads=False):
            yield batch.column(0)

    def block_starts(self) -> np.ndarray:
        return self._starts

    def read_block(self, block: int, column: str) -> Any:
        return self.file.read_row_group(block, columns=[column], use_threads=False).column(0).combine_chunks()


def parquet_files(folder: Path) -> list[Path]:
    """The .parquet files under `folder` (any depth, hidden names skipped), sorted by relative path."""
    found = []
    for parent, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(parent) / f for f in files if f.endswith(".parquet") and not f.startswith(".")]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def split_of(relative: str, wanted: str | None = None) -> str | None:
    """The split a shard belongs to, from its name or a folder's ('data/train-00000-of-00002.parquet',
    'validation/0000.parquet'): the nearest part that is, or starts with, a split keyword followed by one
    of -._ or a digit. `wanted` also recognises that (custom) split name; a keyword ('val') keeps its key."""
    words = [(split, word) for split, keywords in SPLIT_KEYWORDS.items() for word in keywords]
    if wanted is not None and canonical_split(wanted) is None:
        words.insert(0, (wanted, wanted))
    for part in reversed(relative.removesuffix(".parquet").split("/")):
        for split, word in sorted(words, key=lambda w: -len(w[1])):
            if re.fullmatch(rf"{re.escape(word)}([-._ 0-9].*)?", part, flags=re.IGNORECASE):
                return split
    return None


def shard_splits(
    folder: Path, files: list[Path], label: str, wanted: str | None = None
) -> dict[str | None, list[ParquetShard]]:
    """{split: shards} of a folder's parquet files; {None: all} when no file names a split. `label` is how
    the folder is named in messages (its path, or hf://datasets/OWNER/NAME)."""
    if not files:
        raise BitError(f"{label}: holds no .parquet files")
    relative = [f.relative_to(folder).as_posix() for f in files]
    splits = [split_of(r, wanted) for r in relative]
    if all(s is None for s in splits):
        return {None: [ParquetShard(f, f"{label}/{r}") for f, r in zip(files, relative)]}
    out: dict[str | None, list[ParquetShard]] = {}
    for f, r, split in zip(files, relative, splits):
        if split is None:
            raise BitError(
                f"{label}/{r}: its name does not say its split (train, validation or test), unlike the other shards; "
                "rename it (e.g. train-00000.parquet) or move it out"
            )
        out.setdefault(split, []).append(ParquetShard(f, f"{label}/{r}"))
    return out
