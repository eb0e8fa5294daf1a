"""Issue 23: bit audit's near-duplicate search (bitcli.audit.duplicates.find_pairs: blockwise top-k, no n x n
matrix; above SKETCH_ABOVE examples, candidates from bitcli.audit.sketch) over synthetic embeddings, 100,000 x
2048 by default: wall time, this process's peak RSS, the planted near-duplicates found, how many candidates the
search re-scored and how many rows it searched again exactly; then, on --agree-n examples, whether the sketch
gives exactly the exact search's pairs. Run it alone: it uses every thread torch has.

Two kinds of data (--data):
- uniform: |N(0, 1)| + 0.5 per dimension (non-negative, a shared component, an otherwise flat spectrum), with
  near-copies x + 0.05 N(0, 1) planted (similarity about 0.999);
- spectrum: closer to real features: ReLU(0.5 + z W) with a latent z of LATENT dimensions whose variances
  decay as i^-1.4, in classes of 100 (a class centre plus as much spread again), W Gaussian; near-copies planted
  at similarities spread evenly over [threshold - 0.01, 0.999] (y = t x + sqrt(1 - t^2) z, z another example's
  direction made orthogonal to x), so some are just below the threshold and must not be found (so the spectrum
  data differ with --threshold).

    .venv/bin/python benchmarks/audit_search.py [--n 100000] [--dim 2048] [--threads 2] [--data uniform spectrum]
                                                [--agree-n 20000] [--threshold 0.90]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import load, machine
from rss import own_peak_mib

from bitcli.audit import duplicates, sketch
from bitcli.audit.duplicates import cosines, find_pairs
from bitcli.tool_options import DEFAULT_NEAR_THRESHOLD

THRESHOLD = DEFAULT_NEAR_THRESHOLD  # bit audit's default; --threshold sets another
LATENT = 512  # latent dimensions of the spectrum data
CLASS_SIZE = 100
CHUNK = 8192  # rows generated at a time (no n x dim temporaries)


def uniform(n: int, dim: int, planted: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    vectors = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, CHUNK):
        rows = rng.standard_normal((min(CHUNK, n - start), dim), dtype=np.float32)
        vectors[start : start + len(rows)] = np.abs(rows) + 0.5
    copies = rng.choice(n, size=(planted, 2), replace=False)
    noise = 0.05 * rng.standard_normal((planted, dim), dtype=np.float32)
    vectors[copies[:, 1]] = vectors[copies[:, 0]] + noise
    return vectors, copies


def spectrum(n: int, dim: int, planted: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    scale = np.arange(1, LATENT + 1, dtype=np.float32) ** -0.7
    scale /= np.sqrt((scale**2).sum() * 2)  # centre + spread: unit variance per latent draw
    mix = rng.standard_normal((LATENT, dim), dtype=np.float32)
    centres = rng.standard_normal((max(1, n // CLASS_SIZE), LATENT), dtype=np.float32) * scale
    vectors = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, CHUNK):
        count = min(CHUNK, n - start)
        latent = centres[rng.integers(0, len(centres), count)]
        latent += rng.standard_normal((count, LATENT), dtype=np.float32) * scale
        vectors[start : start + count] = np.maximum(0.5 + latent @ mix, 0)
    copies = rng.choice(n, size=(planted, 3), replace=False)  # original, copy, the direction mixed in
    target = rng.permutation(np.linspace(THRESHOLD - 0.01, 0.999, planted))
    x = vectors[copies[:, 0]] / np.linalg.norm(vectors[copies[:, 0]], axis=1, keepdims=True)
    z = vectors[copies[:, 2]] - np.sum(vectors[copies[:, 2]] * x, axis=1, keepdims=True) * x
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    vectors[copies[:, 1]] = (target[:, None] * x + np.sqrt(1 - target[:, None] ** 2) * z).astype(np.float32)
    return vectors, copies[:, :2]


class Counts:
    """Counts what find_pairs does inside (candidates re-scored, rows searched again exactly, seconds spent
    making the sketch) while in a `with` block."""

    def __init__(self) -> None:
        self.rescored = 0
        self.searched_again = 0
        self.sketch_seconds = 0.0
        self.originals = (duplicates.cosines, duplicates.exact_later, sketch.sketch)

    def __enter__(self) -> Counts:
        rescore, search_again, make_sketch = self.originals

        def counted_cosines(vectors: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
            self.rescored += len(a)
            return rescore(vectors, a, b)

        def counted_exact(vectors: np.ndarray, chosen: np.ndarray, k: int, floor: float) -> tuple:
            self.searched_again += len(chosen)
            return search_again(vectors, chosen, k, floor)

        def timed_sketch(vectors: np.ndarray) -> sketch.Sketch:
            started = time.monotonic()
            out = make_sketch(vectors)
            self.sketch_seconds += time.monotonic() - started
            return out

        duplicates.cosines, duplicates.exact_later, sketch.sketch = counted_cosines, counted_exact, timed_sketch
        return self

    def __exit__(self, *exc: object) -> None:
        duplicates.cosines, duplicates.exact_later, sketch.sketch = self.originals


def planted_figures(vectors: np.ndarray, copies: np.ndarray, pairs: list) -> dict:
    """The planted pairs at or above the threshold (their similarity computed exactly), how many were found,
    and how many planted below it were reported (none should be)."""
    a, b = copies.min(axis=1), copies.max(axis=1)
    similar = cosines(vectors, a, b) >= THRESHOLD
    got = {(p.a, p.b) for p in pairs}
    found = np.array([(int(i), int(j)) in got for i, j in zip(a, b)], dtype=bool)
    return {
        "planted_at_or_above": int(similar.sum()), "found_planted": int((found & similar).sum()),
        "planted_below_found": int((found & ~similar).sum()), "other_pairs": len(got) - int(found.sum()),
    }  # fmt: skip


def timed(search: Callable[[], list]) -> tuple[list, float]:
    started = time.monotonic()
    pairs = search()
    return pairs, time.monotonic() - started


def run_case(kind: str, n: int, dim: int, planted: int) -> dict:
    make = uniform if kind == "uniform" else spectrum
    vectors, copies = make(n, dim, planted, np.random.default_rng(0))
    pixels = [i.to_bytes(8, "little") for i in range(n)]  # all distinct: no exact duplicate
    before = own_peak_mib()
    with Counts() as counts:
        pairs, seconds = timed(lambda: find_pairs(vectors, pixels, THRESHOLD))
    return {
        "data": kind, "n": n, "dim": dim, "search": "sketch" if counts.sketch_seconds else "exact",
        "seconds": round(seconds, 1), "sketch_seconds": round(counts.sketch_seconds, 1),
        "peak_rss_mib": round(own_peak_mib(), 1), "rss_before_search_mib": round(before, 1),
        "embeddings_mib": round(vectors.nbytes / 2**20, 1), **planted_figures(vectors, copies, pairs),
        "rescored": counts.rescored, "searched_again": counts.searched_again,
    }  # fmt: skip


def agreement(kind: str, n: int, dim: int, planted: int) -> dict:
    """The sketch (forced on n examples) against the exact search (bf16 candidates where the CPU has bf16):
    the same pairs with the same similarities?"""
    make = uniform if kind == "uniform" else spectrum
    vectors, copies = make(n, dim, planted, np.random.default_rng(1))
    pixels = [i.to_bytes(8, "little") for i in range(n)]
    sketched, sketch_s = timed(lambda: find_pairs(vectors, pixels, THRESHOLD, sketch_above=0))
    exact, exact_s = timed(lambda: find_pairs(vectors, pixels, THRESHOLD, sketch_above=None))
    mine, theirs = {(p.a, p.b): p.similarity for p in sketched}, {(p.a, p.b): p.similarity for p in exact}
    return {
        "data": kind, "n": n, "dim": dim, "sketch_seconds": round(sketch_s, 1), "exact_seconds": round(exact_s, 1),
        "exact_pairs": len(theirs), "identical": mine == theirs, "missed_by_sketch": len(theirs.keys() - mine.keys()),
        "only_in_sketch": len(mine.keys() - theirs.keys()),
        "planted_found_exact": planted_figures(vectors, copies, exact)["found_planted"],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--planted", type=int, default=1000)
    parser.add_argument("--data", nargs="+", choices=("uniform", "spectrum"), default=["uniform", "spectrum"])
    parser.add_argument("--agree-n", type=int, default=20_000, help="0: no agreement check")
    parser.add_argument("--threshold", type=float, default=DEFAULT_NEAR_THRESHOLD, help="bit audit --threshold")
    args = parser.parse_args()
    global THRESHOLD
    THRESHOLD = args.threshold
    torch.set_num_threads(args.threads)
    out: dict = {"threads": args.threads, "threshold": THRESHOLD, "load_before": load()}
    out["runs"] = [run_case(kind, args.n, args.dim, args.planted) for kind in args.data]
    if args.agree_n:
        out["agreement"] = [agreement(kind, args.agree_n, args.dim, args.planted) for kind in args.data]
    out["load_after"] = load()
    out["machine"] = machine()  # last: it imports timm and transformers, which the peak RSS above leaves out
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
