"""What the fine-tuning tests share: a tiny architecture, fast flags, readers for a run's files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bitcli.preprocess import image_size

TINY = '{"depths": [1, 1], "hidden_sizes": [32, 64], "embedding_size": 16, "num_groups": 8}'
FAST = ["--random-init", "--model", TINY, "--resolution", "16", "--workers", "2"]
RUN_FILES = {
    "config.json",
    "model.safetensors",
    "preprocessor_config.json",
    "metrics.jsonl",
    "summary.json",
    "finetune_config.json",
    "checkpoint.safetensors",
}  # fmt: skip (no .lock: it goes when the run ends)
VALIDATION_FILES = {"validation.json", "curves.png", "confusion.png"}  # and these in a run with a validation set
# Processes that a test compares with in-process runs (one intra-op thread, see conftest.one_thread) use one
# thread too: results are bit-identical for the same thread count.
PROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def bit_process(*args: object) -> list[str]:
    return [sys.executable, "-m", "bitcli", *map(str, args)]


def torchrun(nproc: int, *args: object) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "bitcli", *map(str, args)]  # fmt: skip


def one_and_two_processes(dataset: Path, tmp_path: Path, *flags: object) -> tuple[Path, Path, str]:
    """The same 16-image steps fine-tuned by one process (2 micro-batches, in-process) and by torchrun with two
    (1 micro-batch each): (one's run folder, two's run folder, two's stderr); both must succeed."""
    from conftest import run_main

    one, two = tmp_path / "one", tmp_path / "two"
    code, _, err = run_main("finetune", dataset, "--output", one, "--batch-split", "2", "--batch-size", "16", *flags)
    assert code == 0, err
    done = subprocess.run(torchrun(2, "finetune", dataset, "--output", two, "--batch-split", "1", "--batch-size", "16", *flags),
                          capture_output=True, text=True, env=PROCESS_ENV, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "16 = 2 process(es) x 1 micro-batch(es) of 8" in done.stderr
    return one, two, done.stderr


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def truncated_jpeg(path: Path) -> Path:
    """A JPEG cut short: its header reads fine (so a header scan passes it), its pixels do not decode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(7).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    assert image_size(path) == (64, 64)
    return path
