"""--batch-split auto: the fewest micro-batches per step whose forward and backward fit in memory."""

from __future__ import annotations

import os

import torch

from bitcli.distributed import Dist, all_max, collective_device
from bitcli.runtime import autocast


def mem_available() -> int:
    """Bytes the kernel says a new allocation can get (4 GiB when it does not say)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def auto_batch_split(
    model, per_rank: int, *, crop: int, device: torch.device, dtype: torch.dtype, info: Dist
) -> tuple[int, str]:
    """(micro-batches per step, why). Every process takes the same number: the largest any of them needs.

    On a GPU each candidate is tried for real (out-of-memory moves on to the next); on a CPU the activation
    size of one image is measured and the micro-batch kept under a quarter of the available memory.
    """
    splits = [d for d in range(1, per_rank + 1) if per_rank % d == 0]
    if device.type == "cuda":
        chosen, why = _largest_that_runs(model, per_rank, splits, crop=crop, device=device, dtype=dtype)
    else:
        chosen, why = _largest_under_budget(model, per_rank, splits, crop)
    t = torch.tensor([chosen], device=collective_device(device))
    return int(all_max(t, info).item()), why


def _largest_that_runs(
    model, per_rank: int, splits: list[int], *, crop: int, device: torch.device, dtype: torch.dtype
) -> tuple[int, str]:
    for split in splits:
        x = out = None
        try:
            x = torch.zeros(per_rank // split, 3, crop, crop, device=device)
            with autocast(device, dtype):
                out = model(x)
            out.float().sum().backward()
            torch.cuda.synchronize(device)
            return split, f"largest micro-batch that fit in GPU memory: {per_rank // split}"
        except torch.cuda.OutOfMemoryError:
            pass
        finally:
            model.zero_grad(set_to_none=True)
            x = out = None
            torch.cuda.empty_cache()
    return splits[-1], "nothing larger fit: one image per micro-batch"


def _largest_under_budget(model, per_rank: int, splits: list[int], crop: int) -> tuple[int, str]:
    sizes: list[int] = []
    leaves = [m for m in model.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(lambda m, i, o: sizes.append(getattr(o, "numel", int)())) for m in leaves]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, crop, crop))
    finally:
        for h in hooks:
            h.remove()
    if any(p.requires_grad for name, p in model.named_parameters() if not name.startswith("head.")):
        per_image = sum(sizes) * 4 * 2  # fp32 activations kept for backward, and their gradients
    else:  # --head-only: nothing is kept for a backward; a few maps of a unit live at once (R50x1: ~5x the largest)
        per_image = max(sizes) * 4 * 6
    budget = mem_available() // 4 // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    why = f"~{per_image / 2**20:.1f} MiB of activations per image, under 1/4 of available memory"
    for split in splits:
        if per_rank // split * per_image <= budget:
            return split, why
    return splits[-1], why
