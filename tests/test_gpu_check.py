"""benchmarks/gpu_check.py --cpu: the GPU check's own code, run on the CPU with tiny sizes, so that it is ready
(not rotten) when a GPU machine appears. The script is the unit: it runs in its own process, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECKS = [
    "inference:agree:fp32", "inference:agree:bf16", "inference:agree:fp16", "agreement:agree",
    "inference:small:fp32", "inference:small:bf16", "inference:small:fp16", "gpu-decode",
    "finetune:fp32", "finetune:bf16", "finetune:fp16", "torchrun", "distributed-smoke",
    "onnx-export", "onnx-cuda", "throughput",
]  # fmt: skip
BUDGET = "budget is spent"  # a phase that ran out of time on a loaded machine skips what is left, and says so


def test_cpu_mode_runs_every_check(tmp_path: Path) -> None:
    out = tmp_path / "cpu.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu", "--out", str(out),
                           "--workdir", str(tmp_path / "work")], capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["mode"] == "cpu"
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
