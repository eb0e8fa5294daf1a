"""benchmarks/gpu_check.py --cpu: the GPU check's own code, run on the CPU with tiny sizes, so that it is ready
(not rotten) when a GPU machine appears. The script is the unit: it runs in its own process, as a user runs it."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECKS = [
    "setup", "inference:agree:fp32", "inference:agree:bf16", "inference:agree:fp16", "agreement:agree",
    "inference:small:fp32", "inference:small:bf16", "inference:small:fp16", "gpu-decode",
    "finetune:fp32", "finetune:bf16", "finetune:fp16", "torchrun", "distributed-smoke",
    "onnx-export", "onnx-cuda", "throughput",
]  # fmt: skip
BUDGET = "budget is spent"  # a phase that ran out of time on a loaded machine skips what is left, and says so


def test_cpu_mode_runs_every_check(tmp_path: Path) -> None:
    """Run as on a machine where bitcli is not installed: no PYTHONPATH, another working directory; the script
    finds the bitcli of its own checkout (an installed bitcli elsewhere must not be the one checked)."""
    out = tmp_path / "cpu.json"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu", "--out", str(out),
                           "--workdir", str(tmp_path / "work")], capture_output=True, text=True, env=env, timeout=300,
                          cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["mode"] == "cpu" and results["complete"] is True
    assert results["machine"]["bitcli"] == str(ROOT / "bitcli")
    assert results["machine"]["tf32"]["matmul_allow_tf32"] is False  # torch's default (read before any check)
    checks = {c["check"]: c for c in results["checks"]}
    assert sorted(checks) == sorted(CHECKS)
    for c in checks.values():
        assert c["status"] in ("PASS", "SKIP"), c
        assert c["status"] == "PASS" or c["reason"], c  # every SKIP says why
    ran = {name for name, c in checks.items() if c["status"] == "PASS"}
    # fp16 is refused on a CPU, the CUDA provider needs a GPU, and the check fine-tunes at bf16/fp16 on GPUs only
    assert {"inference:agree:fp16", "inference:small:fp16", "onnx-cuda", "finetune:bf16", "finetune:fp16"}.isdisjoint(
        ran
    )
    for name in CHECKS:
        if name not in ran and "fp16" not in name and name not in ("onnx-cuda", "finetune:bf16"):
            reason = checks[name]["reason"]
            assert BUDGET in reason or (name.endswith(":bf16") and "bf16 instructions" in reason), checks[name]

    numbers = {name: c["numbers"] for name, c in checks.items()}
    if "agreement:agree" in ran:
        assert all(v >= 0.99 for k, v in numbers["agreement:agree"].items() if k.endswith("fp32"))
        assert numbers["agreement:agree"]["classes_seen"] >= 4  # photo_head: top-1 is a decision, not one class
    if "gpu-decode" in ran:
        decode = numbers["gpu-decode"]
        assert decode["on_device"] == decode["images"] == 16
        assert decode["max_pixel_diff"] <= 2 and decode["top1_agreement"] >= 0.995
    if "finetune:fp32" in ran:
        ft = numbers["finetune:fp32"]
        assert ft["loss_last"] < ft["loss_first"] and ft["resumed_max_abs_diff"] == 0.0
        assert 0 < ft["killed_at_step"] < ft["steps"]
    if "torchrun" in ran:
        assert numbers["torchrun"]["max_abs_diff"] == 0.0 and numbers["torchrun"]["world_size"] == 1
    if "distributed-smoke" in ran:
        assert numbers["distributed-smoke"] == {"backend": "gloo", "world_size": 1, "all_reduce": 1.0}
    if "onnx-export" in ran:
        assert numbers["onnx-export"]["cpu_provider_vs_torch"] >= 0.99
    assert "inference:agree:fp32" in ran and "throughput" in ran  # the first checks of their phases always run
    rows = results["throughput"]
    assert {r["contender"] for r in rows} >= {"bitcli", "timm", "transformers"}
    assert all(r["images_per_s"] > 0 for r in rows if r["images_per_s"] is not None)
    assert "bitcli GPU check (cpu mode)" in done.stdout and "contender" in done.stdout  # the printed tables


# The run's own machinery, in this process (cheap: no model is run)


@pytest.fixture()
def gpu_check(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_check

    return gpu_check


def _mode(gpu_check, **changes):
    return dataclasses.replace(gpu_check.cpu_mode(), **changes)


def test_a_failed_setup_is_a_fail_row_and_the_table_is_still_printed(gpu_check, tmp_path, monkeypatch, capsys):
    """Making the models fails (a test double of make_models raises): a FAIL row saying why, the table, the JSON
    (not complete), and nothing after setup is tried."""

    def broken(run):
        raise RuntimeError("no space left on device")

    monkeypatch.setattr(gpu_check, "make_models", broken)
    out = tmp_path / "r.json"
    results = gpu_check.check_all(gpu_check.Run(gpu_check.cpu_mode(), tmp_path, out))
    assert [(c["check"], c["status"], c["reason"]) for c in results["checks"]] == [
        ("setup", "FAIL", "RuntimeError: no space left on device")
    ]
    assert json.loads(out.read_text()) == results and results["complete"] is False
    assert "bitcli GPU check (cpu mode)" in capsys.readouterr().out and not (tmp_path / "agree-images").exists()


def test_each_row_is_written_at_once_and_nothing_starts_after_the_deadline(gpu_check, tmp_path):
    out = tmp_path / "r.json"
    run = gpu_check.Run(_mode(gpu_check, deadline=3600), tmp_path, out)
    run.begin("inference")
    assert run.guarded("first", lambda: run.add("first", "PASS", "", n=1))
    assert [c["check"] for c in json.loads(out.read_text())["checks"]] == ["first"]  # before the run ends
    run.run_deadline = time.monotonic()  # the run's deadline passes: a check not yet started is skipped
    ran = []
    assert not run.guarded("second", lambda: ran.append(1))
    saved = json.loads(out.read_text())
    assert ran == [] and saved["complete"] is False
    assert saved["checks"][-1] == {"check": "second", "status": "SKIP", "reason": "the run's 3600-s budget is spent",
                                   "numbers": {}}  # fmt: skip


def test_throughput_rows_left_out_by_the_budget_say_so(gpu_check, tmp_path):
    from gpu_peers import CONTENDERS, throughput

    run = gpu_check.Run(gpu_check.cpu_mode(), tmp_path)
    run.begin("throughput")
    run.run_deadline = time.monotonic()
    missing = tmp_path / "never-read.safetensors"  # a spent budget loads no model
    throughput(run, gpu_check.Models(missing, None, missing, []))
    rows = {(r["contender"], r["model"], r["resolution"], r["what"]) for r in run.throughput}
    assert rows == {(c, model, res, what) for c in CONTENDERS for res in run.mode.resolutions
                    for model, what in [("tiny", "model only"), ("small", "model only"), ("tiny", "end to end")]}  # fmt: skip
    assert all(r["images_per_s"] is None and r["note"] == "not measured: the run's 240-s budget is spent"
               for r in run.throughput)  # fmt: skip
    [check] = run.checks
    assert (check.check, check.status) == ("throughput", "SKIP") and "not measured" in check.reason


@pytest.mark.parametrize("steps", [12, 16, 24])
def test_the_run_to_resume_is_killed_after_a_checkpoint_and_before_its_end(gpu_check, tmp_path, steps):
    for mode in (gpu_check.cpu_mode(), _mode(gpu_check, name="gpu")):
        run = gpu_check.Run(dataclasses.replace(mode, steps=steps), tmp_path)
        assert gpu_check._save_every(run) < gpu_check._kill_step(run) < steps
    with pytest.raises(RuntimeError, match="too few"):
        gpu_check._kill_step(gpu_check.Run(_mode(gpu_check, name="gpu", steps=6), tmp_path))
