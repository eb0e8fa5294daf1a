"""Real-world labels on the digits demo (issue 24): class imbalance, calibration and test-time augmentation.

scikit-learn's digits exported as in examples/digits_demo.sh (train 1,437, test 360, 32 px). A balanced
validation folder takes 20 images of every class from train; the rest of train is made 20:1 imbalanced
(fixed seed): class c keeps round(largest x 20^(-c/9)) of its images, on the demo's export 119, 85, ..., 8, 6 (19.8:1).
Each variant fine-tunes the demo's small BiT from random weights with the demo's flags (300 steps of 128,
or --steps/--batch-size; --lr 0.1, --resolution 34:32, --seed 0 or --seed: the imbalanced copy keeps its own
fixed seed) and `bit eval` measures it on the 360 balanced test images:

- none, --class-weights balanced, --sampler balanced: macro F1 and balanced accuracy on test;
- calibration: validation ECE/NLL before and after the fitted temperature (summary.json), and test ECE/NLL
  of the same weights at temperature 1 (the key removed from a copy of config.json) and at the fitted one;
- --tta flip: test top-1 and eval wall time with and without it (the best of `--repeat` runs each).

    .venv/bin/python benchmarks/labels_digits.py --work runs/labels-digits --json runs/labels_digits.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from common import ROOT, load, machine
from export_digits import export

RATIO = 20
VAL_PER_CLASS = 20
DEMO = ["--random-init", "--model", "small", "--resolution", "34:32", "--lr", "0.1"]
VARIANTS = {"none": [], "class-weights": ["--class-weights", "balanced"], "sampler": ["--sampler", "balanced"]}


def bit(*args: object) -> tuple[str, float]:
    """Run `python -m bitcli ARGS` from this checkout; (stdout, wall seconds)."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "bitcli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    if done.returncode:
        raise SystemExit(f"bit {' '.join(map(str, args))} failed:\n{done.stderr[-3000:]}")
    return done.stdout, time.perf_counter() - started


def imbalanced_copy(digits: Path, out: Path, seed: int = 0) -> dict[str, int]:
    """out/train (20:1 long tail) and out/val (VAL_PER_CLASS per class) from digits/train; out/test linked."""
    rng = np.random.default_rng(seed)
    if out.exists():
        shutil.rmtree(out)
    classes = sorted((digits / "train").iterdir(), key=lambda p: int(p.name))
    pools = {c.name: sorted(c.iterdir()) for c in classes}
    for name in pools:
        pools[name] = [pools[name][i] for i in rng.permutation(len(pools[name]))]
    largest = min(len(p) for p in pools.values()) - VAL_PER_CLASS
    kept = {}
    for c, name in enumerate(pools):
        val, rest = pools[name][:VAL_PER_CLASS], pools[name][VAL_PER_CLASS:]
        keep = max(1, round(largest * RATIO ** (-c / (len(pools) - 1))))
        kept[name] = keep
        for split, files in (("val", val), ("train", rest[:keep])):
            (out / split / name).mkdir(parents=True, exist_ok=True)
            for f in files:
                shutil.copy(f, out / split / name / f.name)
    (out / "test").symlink_to((digits / "test").resolve())
    return kept


def evaluate(model: Path, test: Path, *flags: str) -> tuple[dict, float]:
    out, seconds = bit("eval", test, "--model", model, "--format", "json", "--device", "cpu", *flags)
    return json.loads(out), seconds


def uncalibrated(run: Path) -> Path:
    """A copy of the run's model without its temperature (the same weights at temperature 1)."""
    copy = run.parent / (run.name + "-t1")
    shutil.rmtree(copy, ignore_errors=True)
    copy.mkdir()
    for name in ("model.safetensors", "preprocessor_config.json"):
        (copy / name).symlink_to((run / name).resolve())
    config = json.loads((run / "config.json").read_text())
    config.pop("bitcli_temperature", None)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "labels-digits")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--repeat", type=int, default=3, help="eval runs with and without --tta flip (0: none)")
    ap.add_argument("--steps", type=int, default=300, help="the demo's 300 (fewer on a busy machine)")
    ap.add_argument("--batch-size", type=int, default=128, help="the demo's 128")
    ap.add_argument("--seed", type=int, default=0, help="fine-tuning's (the demo's 0); not the data's")
    args = ap.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    export(work / "digits", size=32)
    data = work / "imbalanced"
    kept = imbalanced_copy(work / "digits", data)
    result: dict = {"machine": machine(), "load_before": load(), "train_per_class": kept, "variants": {},
                    "steps": args.steps, "batch_size": args.batch_size, "seed": args.seed}  # fmt: skip
    print(f"train per class: {kept} (ratio {max(kept.values()) / min(kept.values()):.1f}:1)", flush=True)
    for name, flags in VARIANTS.items():
        run = work / f"run-{name}"
        _, seconds = bit("finetune", data / "train", "--val", data / "val", "--output", run, "--overwrite",
                         "--device", "cpu", "--steps", args.steps, "--batch-size", args.batch_size, *DEMO,
                         "--seed", args.seed, *flags)  # fmt: skip
        summary = json.loads((run / "summary.json").read_text())
        calibrated, _ = evaluate(run, data / "test")
        plain, _ = evaluate(uncalibrated(run), data / "test")
        row = {
            "finetune_s": round(seconds, 1),
            "test_top1": calibrated["top1"],
            "test_macro_f1": calibrated["macro_f1"],
            "test_balanced_accuracy": calibrated["balanced_accuracy"],
            "calibration_val": summary["calibration"],
            "test_ece_t1": plain["ece"],
            "test_nll_t1": plain["nll"],
            "test_ece_fitted": calibrated["ece"],
            "test_nll_fitted": calibrated["nll"],
        }
        times = {"none": [], "flip": []}
        for _ in range(args.repeat):
            for tta, flags_tta in (("none", []), ("flip", ["--tta", "flip"])):
                ev, seconds = evaluate(run, data / "test", *flags_tta)
                times[tta].append(seconds)
                row[f"tta_{tta}_top1"] = ev["top1"]
                row[f"tta_{tta}_ece"] = ev["ece"]
        if args.repeat:  # --repeat 0: no test-time augmentation rows
            row["tta_none_eval_s"], row["tta_flip_eval_s"] = min(times["none"]), min(times["flip"])
        result["variants"][name] = row
        print(name, json.dumps(row), flush=True)
    result["load_after"] = load()
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
