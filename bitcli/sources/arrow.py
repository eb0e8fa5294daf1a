"""Folders written by `datasets`' save_to_disk: a Dataset (state.json, dataset_info.json, *.arrow) or a
DatasetDict (dataset_dict.json and a folder per split). The Arrow files are memory-mapped, as `datasets`
itself reads them: only the pages of the rows read are loaded."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bitcli.errors import BitError, one_line
from bitcli.sources.features import check_features, schema_features

STATE = "state.json"
INFO = "dataset_info.json"
DICT = "dataset_dict.json"
AGAIN = "save the data set again with save_to_disk"  # the fix of a damaged metadata file


def is_saved_dataset(folder: Path) -> bool:
    return (folder / DICT).is_file() or ((folder / STATE).is_file() and (folder / INFO).is_file())


class ArrowShard:
    def __init__(self, path: Path, name: str, features: dict | None) -> None:
        import pyarrow as pa

        self.path, self.name, self.folder = path, name, path.parent
        try:
            source = pa.memory_map(str(path))
            try:
                self.table = pa.ipc.open_stream(source).read_all()  # save_to_disk writes the streaming format
            except pa.ArrowInvalid:
                self.table = pa.ipc.open_file(source).read_all()
        except (OSError, ValueError) as exc:
            raise BitError(f"{name}: not an Arrow file pyarrow can read ({one_line(exc, limit=200)})") from None
        self.num_rows, self.size, self.schema = self.table.num_rows, path.stat().st_size, self.table.schema
        if not features:  # (none in dataset_info.json) the features that the Arrow schema carries, if any
            features = schema_features(self.schema)
            check_features(features, name, AGAIN)
        self.features = features

    def __reduce__(self):  # another process maps the file itself
        return ArrowShard, (self.path, self.name, self.features)

    def label_batches(self, column: str) -> Iterator[Any]:
        yield from self.table.column(column).chunks

    def block_starts(self) -> np.ndarray:
        return np.cumsum([0] + [len(c) for c in self.table.column(0).chunks])

    def read_block(self, block: int, column: str) -> Any:
        return self.table.column(column).chunk(block)  # zero-copy: a view of the memory map


def saved_splits(folder: Path, label: str) -> dict[str | None, list[ArrowShard]]:
    """{split: shards} of a DatasetDict, {None: shards} of a Dataset."""
    if (folder / DICT).is_file():
        splits = _read_json(folder / DICT, label).get("splits")
        if not isinstance(splits, list) or not splits:
            what = "lists no splits" if splits in (None, []) else "'splits' is not a list of split names"
            raise BitError(f"{label}/{DICT}: {what}; save the data set again with save_to_disk")
        names = [_inside(s, f"{label}/{DICT}", "split") for s in splits]
        return {name: _dataset_shards(folder / name, f"{label}/{name}") for name in names}
    return {None: _dataset_shards(folder, label)}


def _dataset_shards(folder: Path, label: str) -> list[ArrowShard]:
    state = _read_json(folder / STATE, label)
    features = _read_json(folder / INFO, label).get("features")
    features = features if isinstance(features, dict) else None
    check_features(features, f"{label}/{INFO}", AGAIN)
    listed = state.get("_data_files")
    if listed is not None and not isinstance(listed, list):
        raise BitError(f"{label}/{STATE}: '_data_files' is not a list of data files; {AGAIN}")
    for entry in listed or ():
        if not isinstance(entry, dict):
            shown = json.dumps(entry, ensure_ascii=False)[:100]
            raise BitError(f"{label}/{STATE}: data file entry {shown} is not an object with a filename; {AGAIN}")
    files = [_inside(f.get("filename"), f"{label}/{STATE}", "data file") for f in listed or ()]
    if not files:
        raise BitError(f"{label}/{STATE}: lists no data files; {AGAIN}")
    return [ArrowShard(folder / f, f"{label}/{f}", features) for f in files]


def _inside(name: object, where: str, what: str) -> str:
    """A name that a save_to_disk JSON file gives (a split's folder, a data file): one plain name inside the
    folder, as save_to_disk writes them. An absolute path or '..' would read files elsewhere."""
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
        shown = json.dumps(name, ensure_ascii=False)[:300]
        raise BitError(f"{where}: {what} {shown} is not a name inside the folder; {AGAIN}")
    return name


def _read_json(path: Path, label: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BitError(f"{label}/{path.name}: no such file; is this a folder written by save_to_disk?") from None
    except (OSError, ValueError) as exc:
        raise BitError(f"{label}/{path.name}: cannot read ({one_line(exc, limit=200)})") from None
    if not isinstance(data, dict):
        raise BitError(f"{label}/{path.name}: not a JSON object")
    return data
