"""`bit finetune` start-up on parquet data sets of small images: the scan (label column only, the index of
(label, row)) and the whole start-up up to and including the first training step (which decodes every image
first: find_undecodable), with each process's peak RSS. Large data sets stream: the peak must not grow with
the number of rows beyond that index.

    python benchmarks/dataset_scan.py 10000 200000
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import ROOT

CLASSES = [f"class{i:02d}" for i in range(10)]
ROW_GROUP = 100  # what `datasets` writes for image data sets (PARQUET_ROW_GROUP_SIZE_FOR_IMAGE_DATASETS)

SCAN = """
import json, sys, time
from bitcli.sources.locate import Columns, training_parts
from pathlib import Path
t = time.perf_counter()  # after the imports: the scan itself
train = training_parts(Path(sys.argv[1]), Columns())[0].scan(None)
seconds = time.perf_counter() - t
from rss import own_peak_mib
print(json.dumps({"rows": len(train), "scan_s": seconds, "peak_mib": own_peak_mib()}))
"""

FIRST_STEP = """
import json, sys, time
t = time.perf_counter()
from bitcli.cli import main
sys.argv = ["bit", "finetune", *sys.argv[1:]]
try:
    main()
except SystemExit as exc:
    assert not exc.code, exc.code
from rss import own_peak_mib
print(json.dumps({"first_step_s": time.perf_counter() - t, "peak_mib": own_peak_mib()}))
"""


def write_parquet(path: Path, rows: int) -> None:
    """`rows` distinct 16x16 PNGs (each class has its own dominant channel), labels a ClassLabel, written as
    `datasets` writes image data sets: HF features in the schema metadata, row groups of 100."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    features = {"image": {"_type": "Image"}, "label": {"names": CLASSES, "_type": "ClassLabel"}}
    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("label", pa.int64())],
                       metadata={b"huggingface": json.dumps({"info": {"features": features}}).encode()})  # fmt: skip
    rng = np.random.default_rng(0)
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, 10_000):
            n = min(10_000, rows - start)
            labels = rng.integers(0, len(CLASSES), n)
            images = []
            for label in labels:
                array = rng.integers(0, 90, (16, 16, 3), dtype=np.uint8)
                array[..., label % 3] += 120
                buffer = io.BytesIO()
                Image.fromarray(array).save(buffer, format="PNG")
                images.append({"bytes": buffer.getvalue(), "path": None})
            writer.write_table(pa.table({"image": images, "label": labels}, schema=schema), row_group_size=ROW_GROUP)


def child(code: str, *args: object) -> dict:
    env = {
        "PYTHONPATH": f"{ROOT}:{ROOT / 'benchmarks'}",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PATH": "/usr/bin:/bin",
    }
    out = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env, cwd=ROOT
    )
    if out.returncode:
        raise SystemExit(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    sizes = [int(n) for n in sys.argv[1:]] or [10_000, 200_000]
    tiny = '{"depths": [1, 1], "hidden_sizes": [32, 64], "embedding_size": 16, "num_groups": 8}'
    with tempfile.TemporaryDirectory() as tmp:
        for rows in sizes:
            data = Path(tmp) / f"data{rows}.parquet"
            t = time.perf_counter()
            write_parquet(data, rows)
            made = time.perf_counter() - t
            scan = child(SCAN, data)
            first = child(FIRST_STEP, data, "--output", Path(tmp) / f"run{rows}", "--random-init", "--model", tiny,
                          "--resolution", "16", "--steps", "1", "--batch-size", "8", "--workers", "2")  # fmt: skip
            print(json.dumps({"rows": rows, "file_mib": round(data.stat().st_size / 2**20, 1), "made_s": round(made, 1),
                              "scan_s": round(scan["scan_s"], 3), "scan_peak_mib": round(scan["peak_mib"], 1),
                              "first_step_s": round(first["first_step_s"], 1), "first_step_peak_mib": round(first["peak_mib"], 1)}),
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
