"""The embedding cache: what one embedding pass learnt about an image file, kept under $BITCLI_CACHE so that a
second audit (or `bit finetune --head-only --cache-features`) computes nothing again.

Entries are keyed by (model, preprocessing, file content): a folder per model-and-preprocessing key (a hash of
the weights and of the eval transform), and in it shards of entries keyed by the SHA-256 of the file's bytes.
An entry holds the pre-logit embedding, the SHA-256 of the decoded pixels (exact duplicates) and the image's
size. A shard is a .npz written whole (temporary name, then rename) every few hundred new images and when the
pass ends or is interrupted, so Ctrl-C loses at most what the last shard would have held. Shards are read
without pickle; one that does not read (truncated, not a zip, not bitcli's arrays) is ignored with a warning,
since a cache is never the only copy of anything, and removed when this pass writes its own shard if its name
is one bitcli gives (a file someone else put there is left alone).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import time
import zipfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bitcli.errors import BitError, one_line
from bitcli.ui import display, log, visible
from bitcli.writes import atomic_write

HEAD = "head."  # bitcli's name of the classifier's tensors
SHARD_EVERY = 512  # new entries per shard
DIGEST = 32  # bytes of a SHA-256
FOLDER = "embeddings"
OWN_SHARD = re.compile(r"\d+-\d+\.npz")  # the names flush gives: {time_ns}-{pid}.npz
# what numpy.load(allow_pickle=False) and reading its arrays raise on a file that is not an intact .npz of
# arrays: not a zip (BadZipFile, or ValueError: "pickled data"), a damaged member (zlib.error, EOFError, ValueError),
# a bare .npy (an ndarray, no context manager: TypeError/AttributeError), a missing array (KeyError)
UNREADABLE = (OSError, ValueError, KeyError, EOFError, TypeError, AttributeError, zipfile.BadZipFile, zlib.error)


@dataclass(frozen=True)
class Entry:
    vector: np.ndarray  # float32 [D]
    pixels: bytes  # SHA-256 of the decoded RGB pixels and their size
    size: tuple[int, int]  # (width, height) as decoded (EXIF-rotated)


def model_key(tensors: Mapping[str, Callable[[], torch.Tensor]], preprocess: object, graph: Path | None) -> str:
    """The hash of what a model's features depend on: its backbone's weights (each tensor's name, shape and
    float32 bytes, in name order; the head is left out, so a checkpoint and the model fine-tuned from it with a
    new head share entries) or an ONNX graph's file bytes, and its eval transform (the Preprocess fields).
    `tensors` maps bitcli's tensor names to loaders."""
    h = hashlib.sha256(repr(preprocess).encode("utf-8"))
    if graph is not None:
        with open(graph, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    for name in sorted(n for n in tensors if not n.startswith(HEAD)):
        t = tensors[name]().detach().cpu()
        t = (t.float() if t.is_floating_point() else t).contiguous()
        h.update(f"{name}\t{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


class EmbeddingCache:
    """The entries of one model key: read from every shard at start, new ones written in shards."""

    def __init__(self, root: Path | None, key: str, dim: int) -> None:
        self.folder = root / FOLDER / key if root is not None else None
        self.dim = dim
        self.entries: dict[bytes, Entry] = {}
        self.new: dict[bytes, Entry] = {}
        self.hits = 0
        self.damaged: list[Path] = []  # bitcli's own shards that did not read: removed once a new shard is written
        if self.folder is not None and self.folder.is_dir():
            for shard in sorted(self.folder.glob("*.npz")):
                self._read(shard)

    def _read(self, shard: Path) -> None:
        try:
            with np.load(shard, allow_pickle=False) as z:
                files, pixels, sizes, vectors = z["files"], z["pixels"], z["sizes"], z["vectors"]
            readable = (
                files.dtype == np.uint8
                and pixels.dtype == np.uint8
                and files.shape[1:] == (DIGEST,)
                and pixels.shape[1:] == (DIGEST,)
                and sizes.shape[1:] == (2,)
                and np.issubdtype(sizes.dtype, np.integer)
                and vectors.ndim == 2
                and np.issubdtype(vectors.dtype, np.floating)
                and len(files) == len(pixels) == len(sizes) == len(vectors)
            )
        except UNREADABLE as exc:
            self._ignore(shard, one_line(exc))
            return
        if not readable:
            self._ignore(shard, "not the arrays of an embedding cache shard")
            return
        if vectors.shape[1] != self.dim:  # another model's features under this key: not damage, just not ours
            return
        for f, p, s, v in zip(files, pixels, sizes, vectors.astype(np.float32, copy=False)):
            self.entries[f.tobytes()] = Entry(v, p.tobytes(), (int(s[0]), int(s[1])))

    def _ignore(self, shard: Path, why: str) -> None:
        own = OWN_SHARD.fullmatch(shard.name) is not None
        then = "it is replaced when this run writes the cache" if own else "delete it if it is not needed"
        log(visible(f"warning: the embedding cache file {display(shard)} does not read ({why}); ignored, {then}"))
        if own:
            self.damaged.append(shard)

    def get(self, file_hash: bytes) -> Entry | None:
        entry = self.entries.get(file_hash)
        if entry is not None:
            self.hits += 1
        return entry

    def put(self, file_hash: bytes, entry: Entry) -> None:
        self.entries[file_hash] = entry
        self.new[file_hash] = entry
        if len(self.new) >= SHARD_EVERY:
            self.flush()

    def flush(self) -> None:
        """The new entries as one shard; a cache that cannot be written is said once and then left alone."""
        if not self.new or self.folder is None:
            self.new = {}
            return
        keys = list(self.new)
        # uint8 [n, 32], not numpy's "S32": a bytes dtype drops trailing zero bytes, and 1 digest in 256 ends in one
        files = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(-1, DIGEST)
        pixels = np.frombuffer(b"".join(self.new[k].pixels for k in keys), dtype=np.uint8).reshape(-1, DIGEST)
        sizes = np.array([self.new[k].size for k in keys], dtype=np.int64).reshape(-1, 2)
        vectors = np.stack([self.new[k].vector for k in keys]).astype(np.float32)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write(
                self.folder / f"{time.time_ns()}-{os.getpid()}.npz",
                lambda f: np.savez(f, files=files, pixels=pixels, sizes=sizes, vectors=vectors),
            )
        except (OSError, BitError) as exc:  # a cache that cannot be written never fails the audit
            log(f"warning: cannot write the embedding cache {display(self.folder)} ({one_line(exc)}); set BITCLI_CACHE")
            self.folder = None
        else:
            for shard in self.damaged:  # its entries, if any were whole, have just been computed again
                with contextlib.suppress(OSError):
                    shard.unlink()
            self.damaged = []
        self.new = {}
