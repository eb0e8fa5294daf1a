"""Issue 23: bit audit's likely label errors (bitcli.audit.labels: a 5-fold linear head's out-of-sample
probabilities, then cleanlab.filter.find_label_issues) on scikit-learn's digits (1,797 8x8 images, their 64
pixel values as the features) with 5% of the labels flipped at random to another class (fixed seeds):
precision and recall of the flagged set against the flips, and the time of each part.

    .venv/bin/python benchmarks/audit_labels.py [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bitcli.audit.labels import find_issues, out_of_sample_probs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    rows = []
    for seed in args.seeds:
        rng = np.random.default_rng(seed)
        noisy = y.copy()
        flipped = rng.choice(len(y), size=round(0.05 * len(y)), replace=False)
        noisy[flipped] = (y[flipped] + rng.integers(1, 10, len(flipped))) % 10
        t0 = time.monotonic()
        probs = out_of_sample_probs(x.astype(np.float32), noisy, 10)
        t1 = time.monotonic()
        flagged = {i.example for i in find_issues(noisy, probs)}
        t2 = time.monotonic()
        hits = len(flagged & set(flipped.tolist()))
        rows.append({
            "seed": seed, "flipped": len(flipped), "flagged": len(flagged), "true_flags": hits,
            "precision": round(hits / max(len(flagged), 1), 4), "recall": round(hits / len(flipped), 4),
            "head_accuracy_on_clean_labels": round(float((probs.argmax(1) == y).mean()), 4),
            "kfold_head_s": round(t1 - t0, 2), "cleanlab_s": round(t2 - t1, 2),
        })  # fmt: skip
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
