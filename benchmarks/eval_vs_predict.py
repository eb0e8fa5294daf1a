"""`bit eval` against `bit predict` on the same images: whole processes, taking turns.

Both commands run the model through the one inference engine, so evaluating a labelled folder should cost
what classifying its images costs. The images are 24 realistic photos (R50x1, 448 px, the tests' random-weight
google/bit-50 layout) in three class folders named after the model's labels.

    .venv/bin/python benchmarks/eval_vs_predict.py --json runs/eval_vs_predict.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, load, machine, median, r50_checkpoint, realistic_images
from rss import run_measured

TARGET = 0.9  # eval's speed as a fraction of predict's on the same images


def labelled_folder(hf: Path, workdir: Path, n: int) -> Path:
    """n JPEGs in three class folders named after the checkpoint's first three labels."""
    labels = json.loads((hf / "config.json").read_text())["id2label"]
    folder = workdir / f"eval-{n}"
    if not folder.is_dir():
        tmp = workdir / f"eval-{n}.tmp"
        for i, im in enumerate(realistic_images(n, seed=2)):
            cls = tmp / labels[str(i % 3)]
            cls.mkdir(parents=True, exist_ok=True)
            im.save(cls / f"img{i:03d}.jpg", quality=90)
        tmp.rename(folder)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bitcli-bench"))
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    hf = r50_checkpoint(args.workdir)
    data = labelled_folder(hf, args.workdir, args.images)
    common = ["--model", str(hf), "--device", "cpu", "--batch-size", str(args.batch_size)]
    commands = {
        "predict": [sys.executable, "-m", "bitcli", "predict", str(data), "--recursive", "--format", "json", *common],
        "eval": [sys.executable, "-m", "bitcli", "eval", str(data), "--format", "json", *common],
    }
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    seconds: dict[str, list[float]] = {name: [] for name in commands}
    for rep in range(args.repeats):
        for name, cmd in commands.items():  # taking turns: drift of the machine hits both alike
            code, wall, _, err = run_measured(cmd, env=env, cwd=ROOT)
            if code != 0:
                raise SystemExit(f"bit {name} failed with exit {code}: {err}")
            seconds[name].append(wall)
        print(f"round {rep + 1}/{args.repeats}  load {load():.2f}  predict {seconds['predict'][-1]:.1f} s  "
              f"eval {seconds['eval'][-1]:.1f} s", flush=True)  # fmt: skip
    t_predict, t_eval = median(seconds["predict"]), median(seconds["eval"])
    result = {
        "machine": machine(),
        "images": args.images,
        "seconds": seconds,
        "predict_s": t_predict,
        "eval_s": t_eval,
        "eval_speed_vs_predict": t_predict / t_eval,
        "target": TARGET,
    }
    print(f"bit eval runs at {t_predict / t_eval:.2f}x the speed of bit predict on the same {args.images} images "
          f"(target >= {TARGET}); medians {t_eval:.1f} s vs {t_predict:.1f} s", flush=True)  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
