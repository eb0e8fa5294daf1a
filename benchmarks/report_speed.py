"""`bit report RUN_DIR`: wall time and peak RSS of the whole command (a fresh `python -m bitcli` process, start-up
included) on finished, running and interrupted runs, small and long (issue 21: under 1 s and 150 MB for any run).

The runs are built here: a real 8-step `bit finetune` of the tests' tiny network with a validation set (its
pictures drawn, matplotlib installed); "interrupted" is its copy as a kill after the last checkpoint leaves it
(no summary.json, no model files); "running" is that copy with its .lock held by this process, as a training
process holds it. The "long" runs are the same folders with the metrics.jsonl of a 20,000-step run (the
HyperRule's longest schedule; a validation every 500 steps) and the validation.json of a 1000-class model.
With --old TREE (a checkout of an earlier bitcli, e.g. `git archive e5f698c | tar -x -C /tmp/old`) each
report is also timed with that code, on a copy of the run (it redrew the pictures into the folder).

    python benchmarks/report_speed.py --repeats 5 --old /tmp/old
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from common import ROOT, machine
from conftest import write_folder
from rss import run_measured

TINY = '{"depths": [1, 1], "hidden_sizes": [32, 64], "embedding_size": 16, "num_groups": 8}'
LONG_STEPS = 20_000
LONG_CLASSES = 1000
UNFINISHED_LEAVES = ("summary.json", "model.safetensors", "preprocessor_config.json", "config.json")


def env_for(tree: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def train(workdir: Path) -> Path:
    data, out = workdir / "data", workdir / "finished-small"
    write_folder(data / "train", {"red": 12, "green": 12, "blue": 12})
    write_folder(data / "val", {"red": 4, "green": 4, "blue": 4}, seed=1)
    args = ["finetune", data, "--output", out, "--random-init", "--model", TINY, "--resolution", "16", "--steps", "8",
            "--batch-size", "8", "--eval-every", "4", "--workers", "2"]  # fmt: skip
    subprocess.run(
        [sys.executable, "-m", "bitcli", *map(str, args)], check=True, env=env_for(ROOT), capture_output=True
    )
    return out


def unfinished(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    for name in UNFINISHED_LEAVES:
        (to / name).unlink()
    return to


def lengthen(run: Path, to: Path) -> Path:
    """The run with a 20,000-step metrics.jsonl and a 1000-class plan and validation.json."""
    shutil.copytree(run, to)
    plan = json.loads((to / "finetune_config.json").read_text())
    classes = [f"class{i:04d}" for i in range(LONG_CLASSES)]
    plan.update(steps=LONG_STEPS, classes=classes)
    (to / "finetune_config.json").write_text(json.dumps(plan, indent=2) + "\n")
    with open(to / "metrics.jsonl", "w") as f:
        for step in range(LONG_STEPS):
            record = {"step": step, "lr": 0.003 * 0.1 ** (step * 3 // LONG_STEPS), "loss": 7.0 * math.exp(-step / 4000),
                      "images_per_s": 512.0 + step % 7}  # fmt: skip
            if (step + 1) % 500 == 0:
                record.update(val_top1=step / LONG_STEPS, val_top5=min(1.0, 1.5 * step / LONG_STEPS), val_loss=2.0)
            f.write(json.dumps(record) + "\n")
    per = 50  # validation images per class
    confusion = [[per - 5 if i == j else (5 if j == (i + 1) % LONG_CLASSES else 0) for j in range(LONG_CLASSES)]
                 for i in range(LONG_CLASSES)]  # fmt: skip
    per_class = dict.fromkeys(classes, 0.9)
    validation = {"step": LONG_STEPS - 1, "top1": 0.9, "top5": 0.99, "loss": 0.4, "count": per * LONG_CLASSES,
                  "per_class": per_class, "precision": per_class, "recall": per_class, "f1": per_class,
                  "macro_f1": 0.9, "confusion": confusion, "labels": classes}  # fmt: skip
    (to / "validation.json").write_text(json.dumps(validation, indent=2) + "\n")
    return to


@contextlib.contextmanager
def lock_held(run: Path) -> Iterator[None]:
    """As a training process holds the run: an exclusive flock on RUN/.lock."""
    with open(run / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
    (run / ".lock").unlink()


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(tree: Path, run: Path, repeats: int) -> dict:
    """Median wall time, median CPU time (user + system, so a busy machine shows less in it than in the wall
    time; the small launcher process of rss.run_measured is included) and the largest peak RSS of `repeats`
    whole `bit report RUN` processes."""
    times, cpu, peaks, status = [], [], [], ""
    for _ in range(repeats):
        with tempfile.TemporaryFile("w+") as out:
            before = children_cpu_s()
            code, seconds, peak, err = run_measured([sys.executable, "-m", "bitcli", "report", str(run)],
                                                    env=env_for(tree), stdout=out, cwd=tree)  # fmt: skip
            cpu.append(children_cpu_s() - before)
            out.seek(0)
            status = next((line for line in out.read().splitlines() if line.startswith("status")), err.strip())
        if code:
            return {"exit": code, "error": err.strip()[-300:]}
        times.append(seconds)
        peaks.append(peak)
    return {"s": round(statistics.median(times), 3), "cpu_s": round(statistics.median(cpu), 3),
            "peak_mib": round(max(peaks), 1), "status": status}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--old", type=Path, help="an earlier bitcli tree to compare with")
    parser.add_argument("--workdir", type=Path, help="where the runs are built (default: a temporary folder)")
    args = parser.parse_args()
    info = machine()
    print(json.dumps({k: info[k] for k in ("cpu", "cores", "simd", "python", "torch")}), flush=True)
    print(json.dumps({"load_average_1min": os.getloadavg()[0]}), flush=True)
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        small = train(workdir)
        long = lengthen(small, workdir / "finished-long")
        runs = {"finished": small, "interrupted": unfinished(small, workdir / "interrupted-small"),
                "finished, long": long, "interrupted, long": unfinished(long, workdir / "interrupted-long")}  # fmt: skip
        runs["running"], runs["running, long"] = runs["interrupted"], runs["interrupted, long"]
        for name, run in runs.items():
            with lock_held(run) if name.startswith("running") else contextlib.nullcontext():
                row = {"run": name, "metrics_lines": (run / "metrics.jsonl").read_text().count("\n"),
                       "bitcli": measure(ROOT, run, args.repeats)}  # fmt: skip
                if args.old:
                    copy = workdir / "old-copy"
                    shutil.rmtree(copy, ignore_errors=True)
                    shutil.copytree(run, copy)
                    with lock_held(copy) if name.startswith("running") else contextlib.nullcontext():
                        row["old"] = measure(args.old, copy, args.repeats)
            print(json.dumps(row), flush=True)
    print(json.dumps({"load_average_1min": os.getloadavg()[0]}), flush=True)


if __name__ == "__main__":
    main()
