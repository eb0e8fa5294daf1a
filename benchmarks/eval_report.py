"""`bit eval --report` on 10,000 images with about 2,000 errors: the extra wall time over a plain `bit eval`, the
report's size, and how long headless Chromium takes to load its page.

The data: 32-px PNGs of ten colours (each class its own colour, with noise), 20% of them put in the folder of
another class (label noise), so that a tiny BiT that learned the colours gets about 2,000 of the 10,000 wrong.
The model: `bit finetune --random-init --model tiny` on a clean set of 50 images per class. Both commands run as
whole processes taking turns (the median of --repeats rounds); the page is loaded --loads times in Chromium
(Playwright driving Debian's chromium, as the tests do).

With --multi-label (issue 24) the data is a JSONL label file instead: each image holds one to three of the ten
colours (a vertical stripe each) and lists them as its labels, 20% of its rows with one label dropped or one
added (label noise), and the model is a multi-label fine-tune of the tiny BiT on a clean set (its thresholds
fitted on a tenth of it): the report is then per-class AP and each class's worst false positives and negatives.

With --realistic the model is R50x1 (google/bit-50's layout with the tests' random weights, benchmarks/common.py)
with a head for the ten colours trained for 30 steps (--head-only) at 224 px: what a real model's pass and
Grad-CAM cost per image, where the tiny model makes the report's fixed costs the whole story. It takes about
0.1 s an image on one CPU thread: run it on --images 1000.

    .venv/bin/python benchmarks/eval_report.py --json runs/eval_report.json
    .venv/bin/python benchmarks/eval_report.py --multi-label --json runs/eval_report_multilabel.json
    .venv/bin/python benchmarks/eval_report.py --realistic --images 1000 --json runs/eval_report_r50.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, load, machine, median, r50_checkpoint

TARGET_EXTRA = 0.25  # --report's extra wall time, as a fraction of plain eval's (CPU)
TARGET_LOAD_S = 2.0  # Chromium's load of index.html
PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (170, 110, 40), (128, 128, 128)]  # fmt: skip


def write_images(folder: Path, per_class: int, noise: float, seed: int) -> None:
    """per_class images of each colour; a `noise` fraction of them saved in another class's folder."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for c in range(len(PALETTE)):
        (tmp / f"class{c}").mkdir(parents=True)
    for c, colour in enumerate(PALETTE):
        for i in range(per_class):
            pixels = np.clip(np.array(colour) + rng.integers(-40, 41, (32, 32, 3)), 0, 255).astype(np.uint8)
            shown = c if rng.random() >= noise else int((c + rng.integers(1, len(PALETTE))) % len(PALETTE))
            Image.fromarray(pixels).save(tmp / f"class{shown}" / f"c{c}-{i:05d}.png")
    tmp.rename(folder)


def write_multi_label(folder: Path, count: int, noise: float, seed: int) -> Path:
    """`count` images of one to three colour stripes, and labels.jsonl listing each image's colours (as classN)
    with a `noise` fraction of rows given one label too many or too few; returns the label file."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    with open(tmp / "labels.jsonl", "w") as f:
        for i in range(count):
            colours = sorted(rng.choice(len(PALETTE), size=int(rng.integers(1, 4)), replace=False).tolist())
            pixels = np.zeros((32, 32, 3), dtype=np.int64)
            for k, c in enumerate(colours):  # one vertical stripe per colour
                pixels[:, k * 32 // len(colours) : (k + 1) * 32 // len(colours)] = PALETTE[c]
            pixels = np.clip(pixels + rng.integers(-40, 41, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp / "images" / f"{i:05d}.png")
            labels = list(colours)
            if rng.random() < noise:
                if len(labels) > 1 and rng.random() < 0.5:
                    labels.pop(int(rng.integers(len(labels))))
                else:
                    labels.append(int(rng.choice([c for c in range(len(PALETTE)) if c not in labels])))
            f.write(json.dumps({"path": f"images/{i:05d}.png", "label": [f"class{c}" for c in labels]}) + "\n")
    tmp.rename(folder)
    return folder / "labels.jsonl"


def bit(*args: object) -> tuple[float, float, subprocess.CompletedProcess]:
    """(wall seconds, CPU seconds (user + system), the finished process) of `python -m bitcli ARGS`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "bitcli", *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=ROOT)  # fmt: skip
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if done.returncode != 0:
        raise SystemExit(f"bit {' '.join(map(str, args))} failed:\n{done.stderr[-3000:]}")
    return wall, cpu, done


def chromium_load(page: Path, loads: int) -> dict[str, float]:
    """Median seconds from navigation to DOMContentLoaded and to the load event (the pictures in view loaded;
    the others load lazily as the page scrolls), over `loads` fresh pages."""
    from playwright.sync_api import sync_playwright

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import CHROMIUM, CHROMIUM_ARGS

    content, loaded = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        for _ in range(loads):
            context = browser.new_context(viewport={"width": 1280, "height": 800})
            tab = context.new_page()
            tab.goto(page.as_uri(), wait_until="load")
            timing = tab.evaluate("JSON.parse(JSON.stringify(performance.getEntriesByType('navigation')[0]))")
            content.append(timing["domContentLoadedEventEnd"] / 1000)
            loaded.append(timing["loadEventEnd"] / 1000)
            context.close()
        browser.close()
    return {"dom_content_loaded_s": round(median(content), 3), "load_s": round(median(loaded), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bitcli-bench-report"))
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--loads", type=int, default=5)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--multi-label", action="store_true", help="a multi-label label file and model (issue 24)")
    ap.add_argument("--realistic", action="store_true", help="R50x1 at 224 px instead of the tiny 32-px model")
    args = ap.parse_args()
    if args.multi_label and args.realistic:
        ap.error("--realistic is single-label")
    work = args.workdir / ("multi-label" if args.multi_label else "realistic" if args.realistic else "")
    work.mkdir(parents=True, exist_ok=True)
    data, train, run = work / f"eval-{args.images}", work / "train", work / "run"
    if args.multi_label:
        data = data / "labels.jsonl" if data.is_dir() else write_multi_label(data, args.images, noise=0.2, seed=1)
        train = train / "labels.jsonl" if train.is_dir() else write_multi_label(train, 500, noise=0.0, seed=2)
    else:
        if not data.is_dir():
            write_images(data, args.images // len(PALETTE), noise=0.2, seed=1)
        if not train.is_dir():
            write_images(train, 50, noise=0.0, seed=2)
    if not (run / "summary.json").is_file() and args.realistic:
        bit("finetune", train, "--output", run, "--overwrite", "--model", r50_checkpoint(work), "--head-only",
            "--resolution", "224", "--steps", "30", "--batch-size", "16", "--lr", "0.3", "--val-split", "0.1")  # fmt: skip
    elif not (run / "summary.json").is_file():
        bit("finetune", train, "--output", run, "--overwrite", "--random-init", "--model", "tiny", "--resolution",
            "32", "--steps", "60", "--batch-size", "64", "--lr", "0.1", "--val-split", "0.1")  # fmt: skip
    common = ["eval", data, "--model", run, "--format", "json", "--device", "cpu"]
    plain, report, plain_cpu, report_cpu, loads, drawing = [], [], [], [], [], []
    for _ in range(args.repeats):  # taking turns: drift of the machine hits both alike
        wall, cpu, done = bit(*common)
        plain.append(wall)
        plain_cpu.append(cpu)
        shutil.rmtree(work / "report", ignore_errors=True)
        wall, cpu, done = bit(*common, "--report", work / "report")
        report.append(wall)
        report_cpu.append(cpu)
        loads.append(load())
        drawing.append(float(re.findall(r"shown; ([0-9.]+) s\)", done.stderr)[-1]))  # write_report's own log line
        print(f"plain {plain[-1]:.1f} s ({plain_cpu[-1]:.1f} s CPU), --report {report[-1]:.1f} s "
              f"({report_cpu[-1]:.1f} s CPU; {done.stderr.strip().splitlines()[-1]}), load {loads[-1]:.1f}",
              file=sys.stderr)  # fmt: skip
    result = json.loads(done.stdout)
    files = [p for p in (work / "report").rglob("*") if p.is_file()]
    errors = sum(1 for _ in open(work / "report" / "errors.csv")) - 1
    quality = {"mAP": result["mAP"]} if args.multi_label else {}
    out = {
        "images": result["count"], "errors": errors, "top1": result["top1"], **quality,
        "plain_eval_s": round(median(plain), 2), "report_eval_s": round(median(report), 2),
        "extra": round(median(report) / median(plain) - 1, 3), "target_extra": TARGET_EXTRA,
        "plain_eval_cpu_s": round(median(plain_cpu), 2), "report_eval_cpu_s": round(median(report_cpu), 2),
        "extra_cpu": round(median(report_cpu) / median(plain_cpu) - 1, 3),
        "report_drawing_s": round(median(drawing), 2),
        "index_html_bytes": (work / "report" / "index.html").stat().st_size,
        "report_bytes": sum(p.stat().st_size for p in files), "report_files": len(files),
        **chromium_load(work / "report" / "index.html", args.loads), "target_load_s": TARGET_LOAD_S,
        "load_average": [round(x, 2) for x in loads], "machine": machine(),
    }  # fmt: skip
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
