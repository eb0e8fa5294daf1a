"""Issue 23: bit audit's near-duplicate search (bitcli.audit.duplicates.find_pairs: blockwise top-k, no n x n
matrix) over synthetic embeddings, 100,000 x 2048 by default: wall time and this process's peak RSS, and that
the planted near-duplicates are found. Run it alone: it uses every thread torch has.

    .venv/bin/python benchmarks/audit_search.py [--n 100000] [--dim 2048] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import load, machine
from rss import own_peak_mib

from bitcli.audit.duplicates import find_pairs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--planted", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    # Non-negative like pre-logits (after ReLU and pooling), with a shared component as real features have.
    vectors = np.abs(rng.standard_normal((args.n, args.dim), dtype=np.float32)) + 0.5
    copies = rng.choice(args.n, size=(args.planted, 2), replace=False)
    vectors[copies[:, 1]] = vectors[copies[:, 0]] + 0.05 * rng.standard_normal(
        (args.planted, args.dim), dtype=np.float32
    )
    pixels = [i.to_bytes(8, "little") for i in range(args.n)]  # all distinct: no exact duplicate
    before = own_peak_mib()
    started = time.monotonic()
    pairs = find_pairs(vectors, pixels, 0.95)
    seconds = time.monotonic() - started
    want = {tuple(sorted(map(int, c))) for c in copies}
    got = {(p.a, p.b) for p in pairs}
    print(json.dumps({
        "n": args.n, "dim": args.dim, "threads": args.threads, "seconds": round(seconds, 1),
        "peak_rss_mib": round(own_peak_mib(), 1), "rss_before_search_mib": round(before, 1),
        "embeddings_mib": round(vectors.nbytes / 2**20, 1), "planted": len(want), "found_planted": len(want & got),
        "other_pairs": len(got - want), "load_before": load(), "machine": machine(),
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
