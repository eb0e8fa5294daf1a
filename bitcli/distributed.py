"""One process, or one of `torchrun --nproc_per_node N` (NCCL on GPUs, gloo on CPUs).

Every process runs the same code on its share of the work; only the main process (rank 0) prints and writes.
The helpers here are no-ops in a single process.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from bitcli.errors import BitError, UsageError
from bitcli.runtime import resolve_device

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


@contextlib.contextmanager
def process_group(device_spec: str) -> Iterator[tuple[Dist, torch.device]]:
    """(this process's place, its device) for a command's whole run: joins the process group when started by
    torchrun, and leaves it however the run ends. Every command that runs a model runs inside one."""
    info, device = _join(device_spec)
    try:
        yield info, device
    finally:
        if info.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _join(device_spec: str) -> tuple[Dist, torch.device]:
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


def from_main(compute: Callable[[], T], info: Dist) -> T:
    """compute() run by the main process only, its result on every process: what only one process may do
    (read stdin, list folders once so that every process splits the same list). A BitError it raises is
    raised on every process, so that all of them stop with the same message and exit code."""
    if info.world <= 1:
        return compute()
    box: list[object] = [None]
    if info.main:
        try:
            box[0] = compute()
        except BitError as exc:
            box[0] = exc
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], BitError):
        raise box[0]
    return box[0]  # type: ignore[return-value]  # what compute() returned, broadcast as an object


def my_share(count: int, info: Dist) -> range:
    """The items (batches) 0..count-1 this process runs: every world-th one from its rank. Splitting at batch
    granularity keeps each batch exactly as one process composes it, so the results are bit-identical."""
    return range(info.rank, count, info.world)


def gather_in_order(mine: Iterator[T], count: int, info: Dist) -> Iterator[T]:
    """The results of items 0..count-1, in that order, on the main process; `mine` yields this process's
    share (my_share) in order. One round per `world` items: each process hands in its item of the round and
    the main process yields them, so it streams and holds one round. The other processes yield nothing, but
    must run to the end: every round is a collective."""
    if info.world <= 1:
        yield from mine
        return
    for start in range(0, count, info.world):
        item = next(mine) if start + info.rank < count else None
        parts: list[object] | None = [None] * info.world if info.main else None
        dist.gather_object(item, parts, dst=0)
        if parts is not None:
            yield from parts[: count - start]  # type: ignore[misc]  # each process's item (a T), gathered as objects


def wrap(model: torch.nn.Module, info: Dist, device: torch.device) -> torch.nn.Module:
    """The module the training forward runs: `model` itself, or DistributedDataParallel over it (which
    averages the gradients over the processes during backward)."""
    if info.world <= 1:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
