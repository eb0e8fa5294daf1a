"""Issue 24: is the digits demo's temperature worth anything on images it was not fitted on?

examples/digits_demo.sh passes its held-out test split as `--val`, so `bit finetune` fits the temperature on the
very 360 images that `bit eval` then measures: the test ECE "after" is in-sample. This script takes the demo's
model and test folder, collects the test logits once (bitcli.evaluation.evaluate, the pass `bit eval` runs),
checks that they give `bit eval`'s NLL and ECE at T = 1 and at the stored T, and then cross-fits: the test
images split in two stratified halves (fixed seed), the temperature fitted on each half (bitcli.scores.
fit_temperature, as fine-tuning fits it) and every image scored at the temperature of the half it is not in.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/demo_calibration.py runs/digits-demo/model \
        runs/digits-demo/digits/test [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from bitcli import scores
from bitcli.engine import load_engine
from bitcli.evaluation import evaluate, example_decoder
from bitcli.hub import load_checkpoint
from bitcli.labels import match_classes
from bitcli.metrics import ECE_BINS
from bitcli.sources.locate import Columns, evaluation_part


def test_logits(model: str, data: str) -> tuple[torch.Tensor, np.ndarray, float, dict]:
    """(logits [N, classes] in the model's label order, model-label targets [N], stored T, bit eval's dict)."""
    ds = evaluation_part(data, Columns(None, None)).scan(None)
    ckpt = load_checkpoint(model, None)
    class_to_model = match_classes(ds.classes, ckpt.labels, ckpt.source or model, ds.root, data=ds.source,
                                   first_row=ds.first_row)  # fmt: skip
    engine = load_engine(ckpt, torch.device("cpu"), torch.float32)
    kept: list[tuple[torch.Tensor, np.ndarray]] = []
    result = evaluate(engine, ds, example_decoder(ds, engine.preprocess), batch_size=64, workers=2,
                      class_to_model=class_to_model, keep_views=lambda lg, t: kept.append((lg, t)))  # fmt: skip
    logits = torch.cat([lg[:, 0] for lg, _ in kept])
    targets = np.asarray(class_to_model)[np.concatenate([t for _, t in kept])]
    return logits, targets, engine.temperature, result.to_dict()


def ece(logits: torch.Tensor, targets: np.ndarray, temperature: np.ndarray) -> float:
    """bit eval's ECE (ECE_BINS equal-width bins of the top-1 score, (lower, upper]), each row at its own T."""
    probs = torch.softmax(logits.double() / torch.from_numpy(temperature)[:, None], dim=1).numpy()
    top, pred = probs.max(axis=1), probs.argmax(axis=1)
    bins = np.clip(np.ceil(top * ECE_BINS).astype(int) - 1, 0, ECE_BINS - 1)
    total = 0.0
    for b in range(ECE_BINS):
        inside = bins == b
        if inside.any():
            total += inside.mean() * abs((pred[inside] == targets[inside]).mean() - top[inside].mean())
    return float(total)


def nll(logits: torch.Tensor, targets: np.ndarray, temperature: np.ndarray) -> float:
    log_p = torch.log_softmax(logits.double() / torch.from_numpy(temperature)[:, None], dim=1)
    return float(-log_p.gather(1, torch.from_numpy(targets).long().view(-1, 1)).mean())


def halves(targets: np.ndarray, seed: int) -> np.ndarray:
    """A stratified split: True for the first half of each class's images, in a seeded random order."""
    rng = np.random.default_rng(seed)
    first = np.zeros(len(targets), dtype=bool)
    for c in np.unique(targets):
        rows = rng.permutation(np.flatnonzero(targets == c))
        first[rows[: len(rows) // 2]] = True
    return first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("test")
    ap.add_argument("--seeds", type=int, default=5, help="cross-fit with this many different splits")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    logits, targets, stored, reported = test_logits(args.model, args.test)
    n = len(targets)
    ones, at_stored = np.ones(n), np.full(n, stored)
    out: dict = {
        "images": n,
        "stored_temperature": stored,
        "bit_eval": {"ece": reported["ece"], "nll": reported["nll"]},
        "t1": {"ece": ece(logits, targets, ones), "nll": nll(logits, targets, ones)},
        "stored": {"ece": ece(logits, targets, at_stored), "nll": nll(logits, targets, at_stored)},
        "refit_on_all": scores.fit_temperature(logits, torch.from_numpy(targets)),
        "cross_fit": [],
    }
    for seed in range(args.seeds):
        first = halves(targets, seed)
        t_first = scores.fit_temperature(logits[first], torch.from_numpy(targets[first]))
        t_second = scores.fit_temperature(logits[~first], torch.from_numpy(targets[~first]))
        other = np.where(first, t_second, t_first)  # each image at the temperature fitted without it
        out["cross_fit"].append({"seed": seed, "t_first": t_first, "t_second": t_second,
                                 "ece": ece(logits, targets, other), "nll": nll(logits, targets, other)})  # fmt: skip
    text = json.dumps(out, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
