"""Issue 23: the linear probe on cached features (`bit finetune --head-only --cache-features`) against today's
`--head-only` (the frozen backbone run on every augmented image of every step), on the same R50x1 weights
(the tests' random-weight google/bit-50 layout), images, steps and seed: training speed per epoch (from each
run's summary.json: images per second of the optimizer steps), the one-time embedding pass, and the final
validation top-1. Each run is its own `python -m bitcli` process, one after the other.

    .venv/bin/python benchmarks/audit_probe.py [--epochs 4] [--resolution 128]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, load, machine, r50_checkpoint
from conftest import write_folder


def finetune(data: Path, model: Path, out: Path, flags: list[str], env: dict) -> dict:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "bitcli", "finetune", str(data), "--model", str(model),
                           "--output", str(out), *flags], capture_output=True, text=True, env=env, cwd=ROOT)  # fmt: skip
    if proc.returncode:
        raise SystemExit(proc.stderr)
    summary = json.loads((out / "summary.json").read_text())
    return {"wall_s": round(time.monotonic() - started, 1), "images_per_s": summary["images_per_s"],
            "val_top1": summary["val_top1"], "log": [ln for ln in proc.stderr.splitlines() if "cache-features:" in ln]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--per-class", type=int, default=40)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="audit-probe-"))
    model = r50_checkpoint(work)
    classes = dict.fromkeys(("red", "green", "blue", "gold"), args.per_class)
    write_folder(work / "data/train", classes, size=args.resolution + 32)
    write_folder(work / "data/val", dict.fromkeys(classes, 10), size=args.resolution + 32, seed=1)
    n, batch = sum(classes.values()), 32
    steps = args.epochs * n // batch
    flags = ["--steps", str(steps), "--batch-size", str(batch), "--resolution", str(args.resolution),
             "--eval-every", "0", "--seed", "0", "--head-only", "--precision", "fp32"]  # fmt: skip
    env = {**os.environ, "BITCLI_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    runs = {"head_only": finetune(work / "data", model, work / "a", [*flags, "--mixup", "0"], env)}
    probe_flags = [*flags, "--cache-features"]
    runs["cache_features_first"] = finetune(work / "data", model, work / "b", probe_flags, env)
    runs["cache_features_again"] = finetune(work / "data", model, work / "c", probe_flags, env)
    for run in runs.values():
        run["epoch_s"] = round(n / run["images_per_s"], 4)
    speedup = runs["head_only"]["epoch_s"] / runs["cache_features_again"]["epoch_s"]
    print(json.dumps({"train_images": n, "steps": steps, "epochs": args.epochs, "runs": runs,
                      "per_epoch_speedup": round(speedup, 1), "load": load(), "machine": machine()}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
