"""Hub data sets, `hf://datasets/OWNER/NAME[@REVISION][:SPLIT]`: their parquet shards fetched through
huggingface_hub into the normal Hugging Face cache, with the offline and error rules of models
(bitcli.hub): HF_HUB_OFFLINE=1 reads the cache only, and what is not cached is one line saying how to get it.
Only the shards of the splits used are downloaded."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass

from bitcli import hub
from bitcli.errors import BitError, UsageError
from bitcli.sources.dataset import evaluation_key, training_keys
from bitcli.sources.parquet import ParquetShard, parquet_files, shard_splits, split_of
from bitcli.sources.splits import canonical_split
from bitcli.ui import quiet_logger

SPEC = re.compile(r"hf://datasets/(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<revision>[^:]+))?(?::(?P<split>[\w.-]+))?")


@dataclass(frozen=True)
class HubDataset:
    repo_id: str
    revision: str | None
    split: str | None  # as typed after ':'

    @property
    def label(self) -> str:
        return f"hf://datasets/{self.repo_id}" + (f"@{self.revision}" if self.revision else "")

    @property
    def key(self) -> str | None:
        """The split's key among shard_splits' (train/validation/test for their keywords)."""
        return None if self.split is None else canonical_split(self.split) or self.split

    @property
    def hint(self) -> str:
        return f"name the split to use, e.g. {self.label}:test"


def parse(spec: str) -> HubDataset:
    found = SPEC.fullmatch(spec)
    if found is None:
        raise UsageError(
            f"{spec}: use hf://datasets/OWNER/NAME, optionally with @REVISION and :SPLIT (hf://datasets/OWNER/NAME@main:test)"
        )
    return HubDataset(found["repo"], found["revision"], found["split"])


def hub_splits(ds: HubDataset, purpose: str) -> dict[str | None, list[ParquetShard]]:
    """{split: shards} of what is needed for `purpose` ("train": train and validation; "eval": the split
    evaluated), downloaded into the cache first unless it is there or the Hub cannot be asked."""
    if not sys.stderr.isatty():  # download bars only on a terminal, as for models
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    online = hub.hub_answers(ds.repo_id, ds.revision, "dataset")
    patterns = ["*.parquet"]
    if online:
        patterns = _needed_files(ds, purpose)
    folder = hub.fetch_snapshot(ds.repo_id, ds.revision, patterns, online=online, repo_type="dataset")
    files = [f for f in parquet_files(folder) if online is not True or f.relative_to(folder).as_posix() in patterns]
    if not files:
        raise (
            hub.not_cached(ds.repo_id, ds.revision, "parquet files of dataset", "dataset")
            if not online
            else BitError(
                f"{ds.label}: has no parquet files; bit reads Hub data sets in parquet (try @refs/convert/parquet)"
            )
        )
    splits = shard_splits(folder, files, ds.label, ds.split)
    if ds.key is not None and ds.key not in splits:
        if not online:
            raise hub.not_cached(ds.repo_id, ds.revision, f"split {ds.split!r} of dataset", "dataset")
        raise BitError(f"{ds.label}: has no split {ds.split!r} (splits: {', '.join(map(str, splits))})")
    return splits


def _needed_files(ds: HubDataset, purpose: str) -> list[str]:
    """The repo's parquet files of the split(s) that will be read (the listing is one request)."""
    from huggingface_hub import HfApi

    try:
        with quiet_logger("huggingface_hub"):
            listed = HfApi().list_repo_files(ds.repo_id, repo_type="dataset", revision=ds.revision)
    except Exception:  # noqa: BLE001 -- snapshot_download meets the same failure and reports it
        return ["*.parquet"]
    files = sorted(f for f in listed if f.endswith(".parquet") and not any(p.startswith(".") for p in f.split("/")))
    if not files:  # hub_splits says so once the snapshot holds none
        return ["*.parquet"]
    by_split: dict[str | None, list[str]] = {}
    for f in files:
        by_split.setdefault(split_of(f, ds.split), []).append(f)
    keep: list[str | None]  # split keys (None: the files of no split)
    if ds.key is not None:
        if ds.key not in by_split:  # said before anything is downloaded
            raise BitError(f"{ds.label}: has no split {ds.split!r} (splits: {', '.join(map(str, by_split))})")
        keep = [ds.key]
    elif purpose == "train":
        keep = list(training_keys(list(by_split), ds.label, ds.hint))
    else:
        keep = [evaluation_key(list(by_split), ds.label, ds.hint)]
    needed = [f for split in keep for f in by_split.get(split, [])]
    return needed or files
