"""Training data (data sets found by bitcli.sources): few-shot and validation sampling, decoding with a
cache, and the BiT train/eval transforms, with every random choice derived from (seed, step).

Deriving each step's sample, crops, flips and MixUp from (seed, step) instead of a running RNG is what makes
a resumed run bit-identical to an uninterrupted one, and the result independent of --workers and of how
the global batch is split into micro-batches or across processes.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from bitcli.errors import BitError
from bitcli.preprocess import Preprocess
from bitcli.sources.examples import ImageFolder
from bitcli.sources.rows import example_size, load_example

# Independent random streams, each seeded by (seed, stream, counter). (Stream 1 was few-shot sampling, now a
# seeded hash of each path: see few_shot.)
STREAM_VAL_SPLIT = 2
STREAM_EPOCH = 3  # counter: epoch; the order in which an epoch visits the training set
STREAM_REPLACEMENT = 4  # counter: step; small data sets are sampled with replacement
STREAM_AUGMENT = 5  # counter: step; crops, flips, MixUp partners and lambda
STREAM_BALANCED = 6  # counter: step; --sampler balanced: each position's class, then its example in the class


def rng(seed: int, stream: int, counter: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, stream, counter])


# ----------------------------------------------------------------------------------------------------------
# Data sets


def few_shot(
    ds: ImageFolder, shots: int, seed: int, undecodable: Callable[[list[int]], set[int]] | None = None
) -> ImageFolder:
    """Exactly `shots` decodable images of every class, the same for the same seed and files.

    Each class's images are ranked by a seeded hash of their path, and the first `shots` that decode are
    taken: a file's rank depends on its own name only, so an undecodable file that is skipped, or deleted,
    changes nothing else (a resumed run trains on the same images). `undecodable(indices)` decodes the
    candidates and returns the failures; only candidates are decoded, not the whole folder.
    A class with too few images is an error naming it: silently using fewer would change what "K-shot" means.
    """
    if shots < 1:
        raise BitError(f"--shots {shots}: need at least one example per class")
    if ds.multi_hot is not None:
        return _few_shot_multi_label(ds, shots, seed, undecodable)
    ranked = [sorted(members.tolist(), key=lambda i: _shot_rank(ds, seed, i)) for members in ds.by_class()]
    taken: list[list[int]] = [[] for _ in ranked]
    tried = [0] * len(ranked)
    while True:
        wanted = {c: order[tried[c] : tried[c] + shots - len(taken[c])] for c, order in enumerate(ranked)}
        wanted = {c: idx for c, idx in wanted.items() if len(taken[c]) < shots}
        if not wanted:
            return ds.subset(i for chosen in taken for i in chosen)
        for c, idx in wanted.items():
            if not idx:
                bad = tried[c] - len(taken[c])
                raise BitError(
                    f"--shots {shots}: class {ds.classes[c]!r} has only {len(taken[c])} training image(s)"
                    + (f" that decode ({bad} could not be decoded)" if bad else "")
                    + f" ({ds.where(c)}); lower --shots or add images"
                )
        failed = undecodable([i for idx in wanted.values() for i in idx]) if undecodable is not None else set()
        for c, idx in wanted.items():
            taken[c].extend(i for i in idx if i not in failed)
            tried[c] += len(idx)


def _few_shot_multi_label(
    ds: ImageFolder, shots: int, seed: int, undecodable: Callable[[list[int]], set[int]] | None
) -> ImageFolder:
    """Multi-label --shots: at least `shots` decodable images of every class, greedily. Class by class, rarest
    first (then in class order), the class's images are taken in seeded-hash rank order, skipping those already
    taken, until the taken images carry the class `shots` times; an image counts for each of its labels, so a
    class may end up with more than `shots` images. The same seed and files give the same images."""
    counts = ds.multi_hot.sum(0) if ds.multi_hot is not None else np.zeros(0)
    members = ds.by_class()
    taken: set[int] = set()
    failed_all: set[int] = set()
    have = np.zeros(len(ds.classes), dtype=np.int64)
    for c in sorted(range(len(ds.classes)), key=lambda k: (int(counts[k]), k)):
        order = [i for i in sorted(members[c].tolist(), key=lambda i: _shot_rank(ds, seed, i)) if i not in taken]
        tried = 0
        while have[c] < shots:
            idx = [i for i in order[tried : tried + shots - int(have[c])] if i not in failed_all]
            if tried >= len(order):
                bad = sum(1 for i in members[c].tolist() if i in failed_all)
                raise BitError(
                    f"--shots {shots}: class {ds.classes[c]!r} has only {int(have[c])} training image(s)"
                    + (f" that decode ({bad} could not be decoded)" if bad else "")
                    + f" ({ds.where(c)}); lower --shots or add images"
                )
            tried += shots - int(have[c])
            failed = undecodable(idx) if undecodable is not None and idx else set()
            failed_all |= failed
            for i in idx:
                if i not in failed:
                    taken.add(i)
                    have += ds.multi_hot[i] if ds.multi_hot is not None else 0
    return ds.subset(taken)


def _shot_rank(ds: ImageFolder, seed: int, index: int) -> bytes:
    return hashlib.sha256(f"{seed}\0{ds.relative(index)}".encode("utf-8", "surrogateescape")).digest()


def split_validation(ds: ImageFolder, fraction: float, seed: int) -> tuple[ImageFolder, ImageFolder]:
    """Hold out round(fraction x n) images of every class (at least one stays for training), seeded."""
    if not 0.0 < fraction < 1.0:
        raise BitError(f"--val-split {fraction}: use a fraction between 0 and 1, e.g. 0.1")
    generator = rng(seed, STREAM_VAL_SPLIT)
    if ds.multi_hot is not None:
        return _split_multi_label(ds, fraction, generator)
    held: list[int] = []
    for members in ds.by_class():
        n_val = min(round(fraction * len(members)), len(members) - 1)
        held.extend(generator.permutation(members)[:n_val].tolist())
    if not held:
        raise BitError(f"--val-split {fraction}: holds out no image (classes too small); use a larger fraction")
    keep = set(range(len(ds))) - set(held)
    return ds.subset(keep), ds.subset(held)


def _split_multi_label(
    ds: ImageFolder, fraction: float, generator: np.random.Generator
) -> tuple[ImageFolder, ImageFolder]:
    """Multi-label --val-split: class by class, rarest first (then in class order), images of the class in a seeded
    random order are held out until round(fraction x its images) of them are (those held for an earlier class
    count); an image is not held if that would leave one of its classes without a training image."""
    hot = np.asarray(ds.multi_hot, dtype=np.int64)
    counts = hot.sum(0)
    held_of = np.zeros(len(ds.classes), dtype=np.int64)
    is_held = np.zeros(len(ds), dtype=bool)
    for c in sorted(range(len(ds.classes)), key=lambda k: (int(counts[k]), k)):
        n_val = min(round(fraction * int(counts[c])), int(counts[c]) - 1)
        for i in generator.permutation(np.flatnonzero(hot[:, c])).tolist():
            if held_of[c] >= n_val:
                break
            if is_held[i] or (counts - held_of - hot[i])[hot[i] > 0].min() < 1:
                continue
            is_held[i] = True
            held_of += hot[i]
    if not is_held.any():
        raise BitError(f"--val-split {fraction}: holds out no image (classes too small); use a larger fraction")
    return ds.subset(np.flatnonzero(~is_held).tolist()), ds.subset(np.flatnonzero(is_held).tolist())


def balanced_class_weights(targets: Sequence[int] | np.ndarray, num_classes: int) -> np.ndarray:
    """--class-weights balanced: n / (classes x images of the class) per class, float64 (scikit-learn's
    compute_class_weight("balanced")); a class without training images gets 0 (it is never a target)."""
    counts = np.bincount(np.asarray(targets, dtype=np.int64), minlength=num_classes).astype(np.float64)
    return np.divide(len(targets), num_classes * counts, out=np.zeros(num_classes), where=counts > 0)


def median_area(ds: ImageFolder, limit: int = 256) -> float:
    """Median pixel count of up to `limit` evenly spaced images (headers only, nothing is decoded)."""
    picks = np.unique(np.linspace(0, len(ds) - 1, num=min(limit, len(ds))).round().astype(np.int64))
    areas = []
    for i in picks:
        width, height = example_size(ds.paths[i])  # a bad or huge file: predict's one-line error, word for word
        areas.append(width * height)
    return float(np.median(areas))


# ----------------------------------------------------------------------------------------------------------
# Per-step sampling


@dataclass(frozen=True)
class StepSample:
    """Everything random about one optimizer step's global batch, by position in the batch."""

    indices: np.ndarray  # [B] data-set indices
    tops: np.ndarray  # [B] crop offsets
    lefts: np.ndarray  # [B]
    flips: np.ndarray  # [B] bool: horizontal flip
    partners: np.ndarray | None  # [B] MixUp: the batch position mixed into each position
    lam: float  # MixUp weight of the position's own image (1.0 without MixUp)


class StepSampler:
    """The global batch of step s as a pure function of (seed, s).

    Data sets at least a batch long are visited epoch by epoch in a seeded random order, the batches running
    on across epoch boundaries so every step is full; smaller ones are sampled with replacement (as Google's
    code does) so every step still sees a full batch.

    With `by_class` (--sampler balanced: each class's example indices) every position of the batch draws a
    class uniformly, then an example of that class uniformly, with replacement, from rng(seed,
    STREAM_BALANCED, step): every class is equally likely whatever its size, and step s's sample is still a
    function of (seed, s) alone, so resuming and sharding over processes stay exact.
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int, max_offset: int, *, mixup: float | None,
                 by_class: Sequence[np.ndarray] | None = None) -> None:  # fmt: skip
        self.n, self.batch, self.seed, self.max_offset, self.mixup = num_examples, batch_size, seed, max_offset, mixup
        self.with_replacement = num_examples < batch_size
        self._orders: dict[int, np.ndarray] = {}
        self.by_class = None
        if by_class is not None:  # one flat array of the classes' members, and where each class starts in it
            by_class = [m for m in by_class if len(m)]  # a class without training images is never drawn
            sizes = np.array([len(m) for m in by_class], dtype=np.int64)
            self.by_class = (np.concatenate([np.asarray(m, dtype=np.int64) for m in by_class]),
                             np.cumsum(sizes) - sizes, sizes)  # fmt: skip

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) > 2:
                self._orders.pop(min(self._orders))
            self._orders[epoch] = rng(self.seed, STREAM_EPOCH, epoch).permutation(self.n)
        return self._orders[epoch]

    def indices(self, step: int) -> np.ndarray:
        if self.by_class is not None:
            members, starts, sizes = self.by_class
            g = rng(self.seed, STREAM_BALANCED, step)
            classes = g.integers(0, len(sizes), self.batch)
            return members[starts[classes] + g.integers(0, sizes[classes])]
        if self.with_replacement:
            return rng(self.seed, STREAM_REPLACEMENT, step).integers(0, self.n, self.batch)
        positions = np.arange(step * self.batch, (step + 1) * self.batch, dtype=np.int64)
        epochs = positions // self.n
        out = np.empty(self.batch, dtype=np.int64)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            out[mask] = self._order(int(epoch))[positions[mask] % self.n]
        return out

    def sample(self, step: int) -> StepSample:
        g = rng(self.seed, STREAM_AUGMENT, step)
        tops = g.integers(0, self.max_offset + 1, self.batch)
        lefts = g.integers(0, self.max_offset + 1, self.batch)
        flips = g.random(self.batch) < 0.5
        partners, lam = None, 1.0
        if self.mixup:
            lam = float(g.beta(self.mixup, self.mixup))
            partners = g.permutation(self.batch)
        return StepSample(self.indices(step), tops, lefts, flips, partners=partners, lam=lam)


# ----------------------------------------------------------------------------------------------------------
# Decoding


class DecodeCache:
    """Decoded (resized) uint8 images by data-set index, kept in memory up to a byte budget.

    Decoding is deterministic, so the cache changes speed only, never results.
    """

    def __init__(self, ds: ImageFolder, transform: Preprocess, budget_bytes: int) -> None:
        self.ds, self.transform, self.budget = ds, transform, budget_bytes
        self._arrays: dict[int, np.ndarray] = {}
        self._used = 0
        self._lock = threading.Lock()

    def get(self, index: int) -> np.ndarray:
        cached = self._arrays.get(index)
        if cached is not None:
            return cached
        array = self.transform.to_uint8(load_example(self.ds.paths[index]))
        with self._lock:
            if index not in self._arrays and self._used + array.nbytes <= self.budget:
                self._arrays[index] = array
                self._used += array.nbytes
        return array


def train_transform(resize: int) -> Preprocess:
    """BiT training: resize to a square (the random crop and flip follow, per step)."""
    return Preprocess(resize=(resize, resize), crop=None, interpolation="bilinear")


def eval_transform(crop: int, mean: tuple[float, float, float], std: tuple[float, float, float]) -> Preprocess:
    """BiT evaluation: resize straight to the crop size (no crop); this travels with the fine-tuned weights."""
    return Preprocess.square(crop, crop, mean=mean, std=std)


def augment(image: np.ndarray, top: int, left: int, crop: int, *, flip: bool) -> np.ndarray:
    out = image[top : top + crop, left : left + crop]
    return np.ascontiguousarray(out[:, ::-1] if flip else out)
