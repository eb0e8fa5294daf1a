"""torchrun (gloo, two processes on the CPU) against one process: the same weights, losses and skipped files.
These start real processes: several processes are what is tested."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_main, write_folder

from .helpers import (
    FAST,
    PROCESS_ENV,
    TINY,
    one_and_two_processes,
    read_metrics,
    read_weights,
    torchrun,
    truncated_jpeg,
)

pytestmark = pytest.mark.slow  # two torchrun launches: about 8 s each on 2 cores


def test_torchrun_two_processes_match_one(dataset: Path, tmp_path: Path) -> None:
    one, two, stderr = one_and_two_processes(dataset, tmp_path, "--steps", "4", "--mixup", "0.3", "--eval-every", "0",
                                             "--workers", "1", *FAST[:-2])  # fmt: skip
    assert stderr.count("bit finetune:") == 1  # only rank 0 talks ...
    assert len(read_metrics(two)) == 4  # ... and writes
    plan = json.loads((two / "finetune_config.json").read_text())
    assert plan["world_size"] == 2
    a, b = read_weights(one / "model.safetensors"), read_weights(two / "model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    assert np.allclose([m["loss"] for m in read_metrics(one)], [m["loss"] for m in read_metrics(two)], rtol=1e-5)


def test_torchrun_processes_skip_the_same_files(tmp_path: Path) -> None:
    """Each process decodes its share of the images; all skip the same files and train what one process does."""
    data = tmp_path / "data"
    write_folder(data, {"red": 6, "green": 6})
    bads = [truncated_jpeg(data / "green" / "zz.jpg"), truncated_jpeg(data / "red" / "cut.jpg")]  # class order
    common = ["finetune", str(data), "--steps", "2", "--batch-size", "8", "--eval-every", "0", "--workers", "1",
              "--random-init", "--model", TINY, "--resolution", "16"]  # fmt: skip
    code, _, err = run_main(*common, "--output", tmp_path / "one", "--batch-split", "2")
    assert code == 0, err
    two = subprocess.run(torchrun(2, *common, "--output", tmp_path / "two", "--batch-split", "1"),
                         capture_output=True, text=True, env=PROCESS_ENV, timeout=300)  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    for bad in bads:
        assert two.stderr.count(f"skipped {bad}: cannot decode image") == 1  # named once, by the main process
    for run in ("one", "two"):
        assert json.loads((tmp_path / run / "summary.json").read_text())["skipped"] == [str(b) for b in bads]
    a, b = read_weights(tmp_path / "one" / "model.safetensors"), read_weights(tmp_path / "two" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
