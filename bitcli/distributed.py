"""One process, or one of `torchrun --nproc_per_node N` (NCCL on GPUs, gloo on CPUs).

Every process runs the same code on its share of the work; only the main process (rank 0) prints and writes.
The helpers here are no-ops in a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from bitcli.errors import UsageError
from bitcli.runtime import resolve_device


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_spec: str) -> tuple[Dist, torch.device]:
    """(this process's place, its device); joins the process group when started by torchrun."""
    device = resolve_device(device_spec)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), device
    info = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise UsageError(f"--device {device_spec}: distributed runs use CUDA (NCCL) or the CPU (gloo)")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return info, device


def teardown(info: Dist) -> None:
    if info.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: Dist) -> None:
    if info.world > 1:
        dist.barrier()


def collective_device(device: torch.device) -> torch.device:
    """Where tensors for a collective live: the GPU for NCCL, the CPU for gloo."""
    return device if device.type == "cuda" else torch.device("cpu")


def all_max(t: torch.Tensor, info: Dist) -> torch.Tensor:
    """Element-wise maximum over the processes, in place."""
    if info.world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_sum(t: torch.Tensor, info: Dist) -> torch.Tensor:
    """Sum over the processes, in place."""
    if info.world > 1:
        dist.all_reduce(t)
    return t


def wrap(model: torch.nn.Module, info: Dist, device: torch.device) -> torch.nn.Module:
    """The module the training forward runs: `model` itself, or DistributedDataParallel over it (which
    averages the gradients over the processes during backward)."""
    if info.world <= 1:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
