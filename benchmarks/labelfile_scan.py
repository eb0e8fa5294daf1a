"""Reading a large CSV label file (issue 20): the scan of a valid file (every row checked, its image stat'ed),
and the time until a file with one bad row in its middle is refused, each in its own process, with its peak
RSS (VmHWM). The file lists 1,390,000 images (about 50 MB of CSV, 100 classes, every 10th row split val): 1,390
empty files reached through 1,000 links to their folder, so every path is distinct and exists.

    python benchmarks/labelfile_scan.py [--rows N] [--code DIR]...

--code runs the same scan with another checkout's bitcli (e.g. one exported with `git archive`), before the
current one: a before/after comparison on the same files.
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

from common import ROOT

SCAN = """
import json, sys, time
from pathlib import Path
from bitcli.errors import BitError
from bitcli.sources.locate import Columns, training_parts
t = time.perf_counter()  # after the imports: the read and the scan themselves
try:
    train_part, val_part = training_parts(Path(sys.argv[1]), Columns())
    train = train_part.scan(None)
    outcome = f"{len(train):,} train + {len(val_part.scan(train.classes)):,} val rows"
except BitError as exc:
    outcome = str(exc)[:90]
seconds = time.perf_counter() - t
from rss import own_peak_mib
print(json.dumps({"outcome": outcome, "seconds": seconds, "peak_mib": own_peak_mib()}))
"""
PER_FOLDER = 1390


def write_files(folder: Path, rows: int) -> tuple[Path, Path]:
    """(the valid CSV, the same with row rows // 2 naming a missing image)."""
    (folder / "images").mkdir()
    for i in range(PER_FOLDER):
        (folder / "images" / f"img_{i:04d}.jpg").touch()
    links = -(-rows // PER_FOLDER)
    for d in range(links):
        os.symlink("images", folder / f"d{d:04d}")
    valid, bad = folder / "labels.csv", folder / "bad.csv"
    with open(valid, "w") as good, open(bad, "w") as broken:
        for f in (good, broken):
            f.write("path,label,split\n")
        for r in range(rows):
            line = f"d{r // PER_FOLDER:04d}/img_{r % PER_FOLDER:04d}.jpg,class_{r // 3 % 100:02d},{'val' if r % 10 == 0 else 'train'}\n"
            good.write(line)
            broken.write(line if r != rows // 2 else line.replace(".jpg", ".jpeg"))
    return valid, bad


def scan(code: Path, data: Path) -> dict:
    env = {"PYTHONPATH": f"{code}:{ROOT / 'benchmarks'}", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", SCAN, str(data)], capture_output=True, text=True, env=env, cwd=data.parent
    )
    if out.returncode:
        raise SystemExit(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_390_000)
    parser.add_argument("--code", type=Path, action="append", default=[], help="another checkout to compare")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        valid, bad = write_files(Path(tmp), args.rows)
        print(json.dumps({"rows": args.rows, "csv_mib": round(valid.stat().st_size / 2**20, 1),
                          "made_s": round(time.perf_counter() - t, 1)}), flush=True)  # fmt: skip
        for code in [*args.code, ROOT]:
            for name, data in (("valid", valid), ("bad row in the middle", bad)):
                result = scan(code, data)
                print(json.dumps({"code": str(code), "file": name, "outcome": result["outcome"],
                                  "seconds": round(result["seconds"], 1), "peak_mib": round(result["peak_mib"])}),
                      flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
