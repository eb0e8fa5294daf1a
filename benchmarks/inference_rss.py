"""Peak resident memory of one `bit predict` / `bit embed` process over 2,000 and 20,000 small generated images:
what grows with the number of images must be the results themselves, nothing else (decoded images, futures,
rows already written).

The model is the tests' tiny BiT (two stages, 64-d features, 10 classes, 32 px), so that 20,000 images take
a minute: the pipeline's memory, not the model's, is what is measured. Each figure is the process's own peak
(benchmarks/rss.py).

    .venv/bin/python benchmarks/inference_rss.py                  # 2,000 and 20,000 images
    .venv/bin/python benchmarks/inference_rss.py --counts 200 2000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, load, machine
from conftest import BIT50_PREPROCESSOR, TINY_LABELS, save_hf_model
from rss import run_measured

RUNS = {  # name -> (command, output file, the results it must hold until the end)
    "predict -f json": ("predict", "out.json", "every row (top-5 labels and scores)"),
    "embed .safetensors": ("embed", "out.safetensors", "the N x 64 float32 array and the paths"),
    "embed .jsonl": ("embed", "out.jsonl", "nothing: streamed"),
}


def tiny_model(workdir: Path) -> Path:
    folder = workdir / "tiny32"
    if not (folder / "model.safetensors").is_file():
        save_hf_model(
            folder, {**BIT50_PREPROCESSOR, "size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}},
            embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1], num_groups=8,
            id2label=dict(enumerate(TINY_LABELS)), label2id={n: i for i, n in enumerate(TINY_LABELS)},
        )  # fmt: skip
    return folder


def image_folder(workdir: Path, n: int) -> Path:
    """n distinct 40x40 PNGs in one folder (random pixels, a few hundred bytes to 5 kB each)."""
    from PIL import Image

    folder = workdir / f"small-{n}"
    if not folder.is_dir():
        tmp = workdir / "small.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        rng = np.random.default_rng(0)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(
                tmp / f"img{i:05d}.png", compress_level=1
            )
        tmp.rename(folder)
    return folder


def measure(model: Path, folder: Path, run: str, workdir: Path) -> dict:
    command, out_name, _ = RUNS[run]
    out = workdir / out_name
    cmd = [
        sys.executable,
        "-m",
        "bitcli",
        command,
        str(folder),
        "--model",
        str(model),
        "--device",
        "cpu",
        "-o",
        str(out),
    ]
    code, seconds, peak, err = run_measured(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=ROOT)
    if code != 0:
        raise RuntimeError(f"{run} failed with exit {code}: {err[-2000:]}")
    return {"peak_rss_mib": peak, "seconds": seconds, "output_mib": out.stat().st_size / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--counts", type=int, nargs="+", default=[2000, 20000])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/bitcli-bench"))
    args = p.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(json.dumps(machine()), flush=True)
    model = tiny_model(args.workdir)
    results: dict[str, dict[int, dict]] = {run: {} for run in RUNS}
    for n in args.counts:
        folder = image_folder(args.workdir, n)
        for run in RUNS:
            results[run][n] = r = measure(model, folder, run, args.workdir)
            print(f"  {run:20s} {n:6d} images: peak RSS {r['peak_rss_mib']:7.1f} MiB, {r['seconds']:6.1f} s, "
                  f"output {r['output_mib']:.1f} MiB  (load {load():.2f})", flush=True)  # fmt: skip
    lo, hi = min(args.counts), max(args.counts)
    print(f"\ngrowth from {lo} to {hi} images (peak RSS, MiB), and what the process must hold:")
    for run, by_n in results.items():
        grow = by_n[hi]["peak_rss_mib"] - by_n[lo]["peak_rss_mib"]
        print(f"  {run:20s} {by_n[lo]['peak_rss_mib']:7.1f} -> {by_n[hi]['peak_rss_mib']:7.1f}  (+{grow:.1f}; "
              f"{1024 * grow / (hi - lo):.2f} KiB per image)  holds {RUNS[run][2]}")  # fmt: skip


if __name__ == "__main__":
    main()
