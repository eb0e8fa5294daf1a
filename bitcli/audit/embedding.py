"""The audit's one pass over the images: each file's bytes hashed (the cache key), and on a cache miss the
image decoded (bitcli.sources.rows.load_example: every source, its checks and one-line errors), its pixels
hashed (exact duplicates: a re-saved PNG has the same pixels) and its pre-logit embedding computed by the
engine (what `bit embed` gives), batch by batch through bitcli.pipeline, decoding a batch ahead on threads.

New entries go to the cache as they come (bitcli.audit.cache), and the pending ones are written when the pass
is interrupted: Ctrl-C, then the same command, computes only the images not done before."""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from bitcli import pipeline
from bitcli.audit.cache import EmbeddingCache, Entry
from bitcli.audit.examples import Examples, table
from bitcli.engine import Engine
from bitcli.errors import BitError
from bitcli.images import stack_by_size
from bitcli.preprocess import Preprocess
from bitcli.sources.examples import ImageFolder
from bitcli.sources.rows import RowRef, load_example
from bitcli.ui import log, progress_bar


@dataclass
class Embeddings:
    """What the pass found for each example (rows of failed examples are zero; `errors` says why)."""

    vectors: np.ndarray  # float32 [N, D]
    pixels: list[bytes | None]  # SHA-256 of the decoded pixels; None: undecodable
    sizes: np.ndarray  # int64 [N, 2]: (width, height), 0 when undecodable
    errors: dict[int, str]  # example -> the one-line failure text
    computed: int = 0  # embeddings computed in this pass (the others came from the cache)

    @property
    def ok(self) -> np.ndarray:
        return np.asarray([p is not None for p in self.pixels], dtype=bool)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during the pass (still a KeyboardInterrupt): how far it got, for the line that says so."""

    def __init__(self, done: int, total: int, computed: int) -> None:
        super().__init__()
        self.done, self.total, self.computed = done, total, computed


@dataclass(frozen=True)
class _Seen:
    """An example after the decoding thread: its cache entry, or what the model still needs to see."""

    file_hash: bytes | None  # None: the bytes could not be read (the decode then said why, or did not fail)
    entry: Entry | None = None
    pixels: bytes = b""
    size: tuple[int, int] = (0, 0)
    array: np.ndarray | None = None  # the model's input, uint8 HWC


def file_bytes(ref: Any) -> bytes | None:
    """The example's encoded bytes (a file's, or a data set cell's); None when they cannot be read here (the
    decoder then gives the one-line reason)."""
    if isinstance(ref, RowRef):
        cell = ref.table.image_cell(ref.row)
        if not isinstance(cell, str):
            return bytes(cell)
        ref = cell
    try:
        if not stat.S_ISREG(os.stat(ref).st_mode):  # a FIFO would block; load_example says what it is
            return None
        with open(ref, "rb") as f:
            return f.read()
    except OSError:
        return None


def pixel_hash(picture: Image.Image) -> bytes:
    """SHA-256 of an RGB picture's shape (height, width, 3) and pixels: the digest of its numpy array's shape and
    bytes (what earlier caches hold), taken from Pillow's bytes directly, a copy fewer than numpy's array."""
    if picture.mode != "RGB":  # load_example gives RGB; another mode would hash other bytes under the same shape
        raise ValueError(f"pixel_hash needs an RGB picture, not {picture.mode}")
    h = hashlib.sha256(f"{(picture.height, picture.width, 3)}".encode())
    h.update(picture.tobytes())
    return h.digest()


def embed_examples(examples: Examples, engine: Engine, cache: EmbeddingCache, *, batch_size: int,
                   workers: int) -> Embeddings:  # fmt: skip
    """Every example's embedding, pixel hash and size, from the cache or computed."""
    n = len(examples)
    found = Embeddings(np.zeros((n, cache.dim), dtype=np.float32), [None] * n, np.zeros((n, 2), np.int64), {})
    decode = _decoder(examples, engine.preprocess, cache)
    batches = pipeline.run(
        range(n), decode, None, batch_size=batch_size, workers=workers, name=examples.names.__getitem__
    )
    done = 0
    try:
        with progress_bar("embedding", total=n, unit="img") as advance, contextlib.closing(batches):
            for batch in batches:
                misses = []
                for outcome in batch:
                    if outcome.error is not None:
                        found.errors[outcome.ref] = outcome.error
                    elif outcome.value.entry is not None:
                        _keep(found, outcome.ref, outcome.value.entry)
                    else:
                        misses.append((outcome.ref, outcome.value))
                _compute(misses, engine, cache, found)
                advance(len(batch))
                done += len(batch)
    except KeyboardInterrupt:
        raise Interrupted(done, n, found.computed) from None
    finally:
        cache.flush()  # what was computed before Ctrl-C (or an error) is kept for the next run
    return found


def _decoder(examples: Examples, preprocess: Preprocess, cache: EmbeddingCache):
    def decode(i: int) -> _Seen:
        ref = examples.ref(i)
        data = file_bytes(ref)
        file_hash = hashlib.sha256(data).digest() if data is not None else None
        entry = cache.get(file_hash) if file_hash is not None else None
        if entry is not None:
            return _Seen(file_hash, entry)
        picture = load_example(ref)
        size = (picture.width, picture.height)
        return _Seen(file_hash, pixels=pixel_hash(picture), size=size, array=preprocess.to_uint8(picture))

    return decode


def _keep(found: Embeddings, i: int, entry: Entry) -> None:
    found.vectors[i] = entry.vector
    found.pixels[i] = entry.pixels
    found.sizes[i] = entry.size


def _compute(misses: list[tuple[int, _Seen]], engine: Engine, cache: EmbeddingCache, found: Embeddings) -> None:
    """The embeddings of the images the cache did not have, one engine call per image size."""
    seen = dict(misses)
    for rows, batch in stack_by_size((i, s.array) for i, s in misses if s.array is not None):
        vectors = engine.features(batch).float().cpu().numpy()
        for i, vector in zip(rows, vectors):
            entry = Entry(vector.copy(), seen[i].pixels, seen[i].size)
            _keep(found, i, entry)
            file_hash = seen[i].file_hash
            if file_hash is not None:
                cache.put(file_hash, entry)
            found.computed += 1


def folder_features(
    ds: ImageFolder, engine: Engine, cache: EmbeddingCache, *, batch_size: int, workers: int
) -> np.ndarray:
    """Every example's features [N, D] (`bit finetune --cache-features`: the data set holds only images that
    decode), from the cache or computed; an image that no longer decodes is an error naming it."""
    found = embed_examples(table({"train": ds}), engine, cache, batch_size=batch_size, workers=workers)
    if found.errors:
        raise BitError(next(iter(found.errors.values())))
    log(f"--cache-features: {len(ds)} training images embedded ({found.computed} computed, "
        f"{len(ds) - found.computed} from the cache)")  # fmt: skip
    return found.vectors
