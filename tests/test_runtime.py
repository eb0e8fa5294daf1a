"""--device and --precision have one home for their spellings (bitcli.options); bitcli.runtime only decides
whether this machine has the device and which dtype a precision means on it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from bitcli import runtime
from bitcli.errors import UsageError
from bitcli.options import OptionError, Precision, parse_device

ROOT = Path(__file__).resolve().parent.parent

SPELLINGS = ["auto", "cpu", "CPU", " cpu ", "cuda", "cuda:0", "CUDA:1", "cuda:007", "mps", "tpu", "gpu", "cuda:x",
             "cuda:", "cpu:0", "mps:1", ""]  # fmt: skip


def with_cuda(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_runtime_refuses_exactly_the_spellings_the_flag_refuses(spelling: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with_cuda(monkeypatch, 8)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    try:
        parse_device(spelling)
    except OptionError as exc:
        with pytest.raises(UsageError) as refused:
            runtime.resolve_device(spelling)
        assert str(refused.value) == f"--device {exc}"
        assert str(refused.value) == f"--device {spelling!r}: use auto, cpu, cuda, cuda:N or mps"
        return
    assert isinstance(runtime.resolve_device(spelling), torch.device)


def test_cuda_index_is_read_as_a_number(monkeypatch: pytest.MonkeyPatch) -> None:
    """cuda:007 is device 7 (torch.device('cuda:007') itself raises), and an index past the count is one line."""
    with_cuda(monkeypatch, 8)
    assert runtime.resolve_device("cuda:007") == torch.device("cuda", 7)
    assert runtime.resolve_device("CUDA") == torch.device("cuda")
    assert runtime.resolve_device("auto") == torch.device("cuda")
    with pytest.raises(UsageError, match=r"^--device cuda:99999999999999999999: only 8 CUDA device\(s\) here$"):
        runtime.resolve_device("cuda:99999999999999999999")
    with_cuda(monkeypatch, 0)
    with pytest.raises(UsageError) as refused:
        runtime.resolve_device("cuda:1")
    assert str(refused.value) == "--device cuda:1: CUDA is not available on this machine; use --device cpu or auto"


def test_no_mps_here_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with_cuda(monkeypatch, 0)
    assert runtime.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(UsageError) as refused:
        runtime.resolve_device("MPS")
    assert str(refused.value) == "--device mps: Apple MPS is not available on this machine; use --device cpu or auto"


def test_precision_values_are_the_flag_choices() -> None:
    cpu = torch.device("cpu")
    assert runtime.resolve_precision(Precision.fp32, cpu) is torch.float32
    assert runtime.resolve_precision("auto", cpu) is torch.float32
    assert runtime.resolve_precision("bf16", cpu) is torch.bfloat16
    with pytest.raises(UsageError) as refused:
        runtime.resolve_precision("fp8", cpu)
    assert str(refused.value) == "--precision 'fp8': use one of auto, fp32, bf16, fp16"
    assert [p.value for p in Precision] == ["auto", "fp32", "bf16", "fp16"]
    with pytest.raises(UsageError, match=r"^--precision fp16 is for GPUs; on a CPU use bf16 or fp32$"):
        runtime.resolve_precision(Precision.fp16, cpu)


@pytest.fixture()
def tf32_on() -> Iterator[None]:
    """TF32 allowed for convolutions and matrix products, put back as it was after the test (torch's cuBLAS
    flags are no plain attributes: monkeypatch cannot set them)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.usefixtures("tf32_on")
@pytest.mark.parametrize("precision", ["auto", "bf16", "fp16"])
def test_tf32_is_left_alone_unless_fp32_on_cuda(precision: str) -> None:
    runtime.resolve_precision("fp32", torch.device("cpu"))
    runtime.resolve_precision(precision, torch.device("cuda"))
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32


@pytest.mark.usefixtures("tf32_on")
def test_fp32_on_cuda_turns_tf32_off() -> None:
    """--precision fp32 means fp32 on a GPU too (TF32's 10-bit mantissa would move the logits by ~1e-3)."""
    assert runtime.resolve_precision("fp32", torch.device("cuda")) is torch.float32
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32


_THREAD_ALLOCATIONS = """
import ctypes, sys, threading
import torch
from bitcli.runtime import reuse_freed_memory

if sys.argv[1] == "reuse":
    reuse_freed_memory()
libc = ctypes.CDLL(None)
libc.sbrk.restype = ctypes.c_void_p
where = []

def passes():  # what bit serve's model thread does: large activations, pass after pass
    for _ in range(3):
        x = torch.empty(32 * 2**20)  # 128 MiB, above a thread arena's 64 MiB heaps
        where.append("heap" if x.data_ptr() < libc.sbrk(0) else "mapping")
        del x

thread = threading.Thread(target=passes)
thread.start()
thread.join()
print(" ".join(where))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator settings")
@pytest.mark.parametrize(("setting", "expected"), [("reuse", "heap heap heap"), ("default", "mapping mapping mapping")])
def test_a_model_threads_activations_come_from_the_kept_heap(setting: str, expected: str) -> None:
    """After reuse_freed_memory, a thread started later takes large blocks from the main heap (kept, never
    trimmed) instead of fresh mappings that are unmapped on free and faulted in again every pass (bit serve's
    model thread ran 30% slower). Under glibc's defaults, the reference, they are mappings. A process of its own:
    allocator settings are the process's, for its lifetime."""
    out = subprocess.run([sys.executable, "-c", _THREAD_ALLOCATIONS, setting], capture_output=True, text=True,
                         check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert out.stdout.split() == expected.split()
