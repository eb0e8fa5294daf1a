"""Device and numeric-precision choices shared by predict, eval and finetune."""

from __future__ import annotations

import contextlib
import ctypes
import sys
from pathlib import Path

import torch

from bitcli.errors import UsageError
from bitcli.options import OptionError, Precision, device_parts
from bitcli.ui import log


def resolve_device(spec: str) -> torch.device:
    """--device (spelled as bitcli.options.parse_device accepts it) -> that device, if this machine has it;
    auto picks CUDA, then Apple MPS, then the CPU."""
    try:
        kind, index = device_parts(spec)
    except OptionError as exc:
        raise UsageError(f"--device {exc}") from None
    spec = spec.strip().lower()
    if kind == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec}: CUDA is not available on this machine; use --device cpu or auto")
        if (index or 0) >= torch.cuda.device_count():
            raise UsageError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) here")
        return torch.device("cuda", index)  # type: ignore[arg-type]  # torch takes None (no index); its stub says int
    if kind == "mps" and not _mps_available():
        raise UsageError("--device mps: Apple MPS is not available on this machine; use --device cpu or auto")
    return torch.device(kind)


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(getattr(torch.backends.mkldnn, "is_available", lambda: False)()) and _cpu_has_bf16()
    return False


CPUINFO = Path("/proc/cpuinfo")


def _cpu_has_bf16() -> bool:
    """Whether the CPU has bf16 instructions (AVX512-BF16 or AMX-BF16), from the flags Linux lists."""
    try:
        lines = CPUINFO.read_text().splitlines()
    except OSError:
        return False
    flags = {f for line in lines if line.startswith("flags") for f in line.partition(":")[2].split()}
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_precision(precision: Precision | str, device: torch.device) -> torch.dtype:
    """auto: bf16 on GPUs that have it, fp16 on other GPUs, fp32 on CPU (exact, the reference numbers)."""
    if precision not in tuple(Precision):
        raise UsageError(f"--precision {precision!r}: use one of {', '.join(p.value for p in Precision)}")
    if precision == "fp32":
        if device.type == "cuda":
            exact_fp32()
        return torch.float32
    if precision == "bf16":
        if device.type == "cpu" and not bf16_supported(device):
            # torch then runs bf16 convolutions through a generic path: about 8x slower than fp32 on an AVX2 CPU
            log("warning: this CPU has no bf16 instructions, so --precision bf16 is emulated and slower than fp32")
        return torch.bfloat16
    if precision == "fp16":
        if device.type == "cpu":
            raise UsageError("--precision fp16 is for GPUs; on a CPU use bf16 or fp32")
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def exact_fp32() -> None:
    """--precision fp32 on CUDA computes in fp32: torch lets cuDNN's convolutions use TF32 by default (a 10-bit
    mantissa on Ampere and later GPUs: logits about 1e-3 apart from the CPU's), and this turns it off, for
    matrix products too. The standard flags; the older ones, which every torch bitcli supports reads and writes
    (mixing them with torch 2.9's fp32_precision settings makes torch refuse to read them)."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def reuse_freed_memory() -> None:
    """Make glibc keep freed memory for reuse instead of returning large blocks to the kernel.

    glibc serves every allocation above 32 MiB with a fresh mmap and unmaps it on free, so each forward pass
    page-faults (and the kernel zeroes) its activation memory again: at 448 px and batch 8 that costs a
    quarter of an R50's CPU time. Serving everything from the heap and never trimming it avoids that; the
    process keeps its peak memory until it exits, which suits a command-line run and a server alike. No-op outside
    glibc.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8  # from <malloc.h>
    mallopt(m_mmap_max, 0)
    mallopt(m_trim_threshold, 2**31 - 1)
    # Threads started from now on share the main heap: a thread's own arena lives in 64 MiB heaps, too small for
    # a batch's activations, and faults them in afresh every pass (bit serve's model thread ran 30% slower).
    mallopt(m_arena_max, 1)
