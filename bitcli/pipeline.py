"""The one pipeline from inputs to ordered results, under every command that runs images through a model:
decode ahead in background threads (bitcli.images.Reader), batch by size, compute (an engine), shard the batches
across torchrun's processes and gather them back in order on the main process, and keep every failure in its
place. `bit predict`, `bit embed`, `bit eval` (bitcli.evaluation), fine-tuning's scan for undecodable images
and int8 calibration all run through `run`; predict and embed report one row per argument with `Report`.

Batches are cut from the inputs in order, batch_size at a time, and each is composed the same way whatever the
number of processes or decoding threads: process r runs batches r, r + world, ... (distributed.my_share), and
the main process receives them in batch order (distributed.gather_in_order), so every result is bit-identical
to a single process's.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections import Counter
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

from bitcli.distributed import Dist, from_main, gather_in_order, my_share
from bitcli.errors import BitError, one_line
from bitcli.gpu_decode import DeviceDecoder
from bitcli.images import Job, Reader, stack_by_size
from bitcli.preprocess import cannot_decode
from bitcli.ui import display, progress_bar, visible

K = TypeVar("K")


class _Row(Protocol):
    """A report's row (predict's Row, embed's Embedded); `error` says why it has no value (None: it has one)."""

    @property
    def error(self) -> str | None: ...


R = TypeVar("R", bound=_Row)
# a stacked uint8 batch [B, H, W, 3] (numpy, or a tensor on the engine's GPU) -> one value per image, in order
Compute = Callable[[Any], Sequence[Any]]
ONE_PROCESS = Dist()


def failure(name: str, exc: BaseException) -> str:
    """The one-line error text of an image `name` that could not be decoded; never empty."""
    reason = one_line(exc)
    if isinstance(exc, BitError):  # bitcli's own messages name the file and say what to do
        return reason if str(exc).strip() else f"{display(name)}: {reason}"
    return str(cannot_decode(display(name), exc))  # a decoder bug must not take the others down


@dataclass(frozen=True)
class Outcome(Generic[K]):
    """One input's result: its value (what compute gave, or without compute the decoded image), or why it has
    none (`error`: the failure text)."""

    ref: K
    error: str | None = None
    value: Any = None


@dataclass(frozen=True)
class Batch(Generic[K]):
    """One batch's outcomes in input order, failures in place, and its stacks: the positions (into `outcomes`)
    of the images that one call of compute took together, one stack per image size, in the order computed.
    A consumer that needs what compute saw (eval's exact per-stack accumulation) reads the stacks."""

    outcomes: list[Outcome[K]]
    stacks: list[list[int]]

    def __iter__(self) -> Iterator[Outcome[K]]:
        return iter(self.outcomes)

    def __len__(self) -> int:
        return len(self.outcomes)


def no_progress(n: int) -> None:
    """The progress callback of a run that shows none."""


def run(
    refs: Sequence[K],
    decode: Callable[[K], np.ndarray],
    compute: Compute | None,
    *,
    batch_size: int,
    workers: int,
    info: Dist = ONE_PROCESS,
    name: Callable[[K], str] = str,
    advance: Callable[[int], None] = no_progress,
    on_device: DeviceDecoder[K] | None = None,
) -> Generator[Batch[K], None, None]:
    """The batches of `refs` (paths, data-set indices, examples: whatever `decode` takes), batch_size at a time,
    in input order. Each image is decoded by `decode(ref)` on `workers` threads a batch ahead of the model (0:
    in this thread); an image that fails is an Outcome with the failure text (named by `name(ref)`), and the
    others are stacked by size and given to `compute` (None: each value is the decoded image itself).

    Under torchrun every process runs its share of the batches and only the main process yields; the others
    yield nothing but must run to the end (every round is a collective). A BitError that compute raises is
    raised on the main process when that batch's turn comes, as in one process. After each batch the consumer
    has taken, `advance(len(batch))` is called (a progress bar). Ctrl-C stops it wherever it is: the decoding
    threads are told to drop what is queued.

    on_device (bitcli.gpu_decode.for_engine, for a model on a GPU): the threads read the files and decode only
    what the GPU cannot (`decode` then), and each batch's JPEGs are decoded together on the GPU before compute."""
    count = -(-len(refs) // batch_size)
    reader: Reader[list[K]] = Reader(workers)
    with reader:
        jobs = _jobs(refs, decode if on_device is None else on_device.prepare, batch_size, my_share(count, info))
        done: Iterator[tuple[list[K], Sequence[Any]]] = reader.outcomes(jobs)  # Any: gpu_decode's Encoded too
        if on_device is not None:
            done = ((chunk, on_device.finish(results)) for chunk, results in done)
        stack = np.stack if on_device is None else on_device.stack
        mine = (_batch(chunk, results, compute, name, stack=stack) for chunk, results in done)
        for batch in gather_in_order(mine, count, info):
            if isinstance(batch, BitError):
                raise batch
            yield batch
            advance(len(batch))


def _jobs(
    refs: Sequence[K], decode: Callable[[K], Any], batch_size: int, batches: range
) -> Iterator[tuple[list[K], list[Job]]]:
    """The batches numbered in `batches` (batch b: refs b * batch_size onwards), with their decode jobs."""
    for b in batches:
        chunk = list(refs[b * batch_size : (b + 1) * batch_size])
        yield chunk, [lambda r=r: decode(r) for r in chunk]  # type: ignore[misc]  # python/mypy#15459: a default-argument lambda


def _batch(
    chunk: list[K],
    results: Sequence[Any],
    compute: Compute | None,
    name: Callable[[K], str],
    *,
    stack: Callable[[list], Any] = np.stack,
) -> Batch[K] | BitError:
    """A chunk's Batch; the BitError that compute raised is returned, not raised, so that the main process
    raises it at this batch's turn."""
    outcomes: list[Outcome[K]] = []
    decoded: list[tuple[int, Any]] = []
    for position, (ref, result) in enumerate(zip(chunk, results)):
        if isinstance(result, Exception):
            outcomes.append(Outcome(ref, failure(name(ref), result)))
        else:
            outcomes.append(Outcome(ref, None, result))
            decoded.append((position, result))
    if compute is None:
        return Batch(outcomes, [])
    stacks = []
    try:
        # An uncropped checkpoint keeps each image's aspect ratio, and only equal sizes stack.
        for positions, images in stack_by_size(decoded, stack):
            for position, value in zip(positions, compute(images)):
                outcomes[position] = Outcome(chunk[position], None, value)
            stacks.append(positions)
    except BitError as exc:
        return exc
    return Batch(outcomes, stacks)


# ----------------------------------------------------------------------------------------------------------
# Rows: one per input in argument order (predict, embed)


class Report(Generic[R]):
    """The rows, one per input in argument order, each released once every row before it is known: streaming
    and an interrupted run both deliver an in-order prefix. A path listed twice is computed once.
    `make_row(path, value, error)` builds a row (predict's Row, embed's Embedded). Released rows are the
    caller's: only rows still to come are held here (and the failed ones, for the summary on stderr), so
    streaming a million images holds none of them. `inputs` are bitcli.inputs.Input."""

    def __init__(self, inputs: list, make_row: Callable[[str, Any, str | None], R]) -> None:
        self.inputs = inputs
        self.make_row = make_row
        self.uses = Counter(i.path for i in inputs if i.error is None)  # occurrences not yet released, by path
        self.outcomes: dict[str, R] = {}  # recorded and not yet released, by path as given
        self.released = 0  # rows released so far
        self.failed: list[R] = []

    def to_compute(self) -> list[str]:
        return list(dict.fromkeys(i.path for i in self.inputs if i.error is None))

    def record(self, path: str, value: Any = None, error: str | None = None) -> None:
        self.outcomes[path] = self.make_row(display(path), value, error)

    def release(self) -> list[R]:
        """The rows that became ready since the last call."""
        ready: list[R] = []
        while self.released < len(self.inputs):
            item = self.inputs[self.released]
            if item.error is not None:
                row = self.make_row(display(item.path), None, item.error)
            elif item.path in self.outcomes:
                self.uses[item.path] -= 1  # the last occurrence takes the row out
                row = self.outcomes[item.path] if self.uses[item.path] else self.outcomes.pop(item.path)
            else:
                break
            ready.append(row)
            self.released += 1
        self.failed += [r for r in ready if r.error is not None]
        return ready


def run_report(report: Report, decode: Callable[[str], np.ndarray], compute: Compute, *, batch_size: int,
               workers: int, emit: Callable[[list], None], info: Dist, verb: str,
               on_device: DeviceDecoder[str] | None = None) -> bool:  # fmt: skip
    """Runs `compute` over every path of `report` (`run`, decoding on the GPU with `on_device`), records each
    image's value or error on the main process and passes each newly ready run of rows to `emit`, with a
    progress bar saying `verb`; True when Ctrl-C stopped it (what was recorded before the signal is complete,
    and is emitted)."""
    paths = report.to_compute()
    emit(report.release())  # arguments that named nothing come out as soon as their turn comes
    bar = progress_bar(verb, total=len(paths), unit="img") if info.main else contextlib.nullcontext(no_progress)
    batches = functools.partial(run, paths, decode, compute, batch_size=batch_size, workers=workers, info=info,
                                on_device=on_device)  # fmt: skip
    try:
        with bar as advance, contextlib.closing(batches(advance=advance)) as done:
            for batch in done:
                for outcome in batch:
                    report.record(outcome.ref, outcome.value, outcome.error)
                emit(report.release())
    except KeyboardInterrupt:
        emit(report.release())
        return True
    return False


def exit_code(report: Report, interrupted: bool, info: Dist, output: Path | None) -> int:
    """0, 1 (some input failed) or 130 (Ctrl-C). The main process names the failures on stderr and decides;
    every process returns its code, so that torchrun reports the run as one process would. `output`: where
    the rows went (None: stdout), named when Ctrl-C stopped the run."""
    if info.main:
        for r in report.failed:
            print(f"error: {visible(r.error)}", file=sys.stderr)
        if interrupted:
            print(
                f"interrupted: {report.released} of {len(report.inputs)} images done; the results "
                + ("above" if output is None else f"written to {visible(display(output))}")
                + " are complete for those",
                file=sys.stderr,
            )
    if interrupted:  # every process got the signal; no further collective (some may have left a round early)
        return 130
    return from_main(lambda: 1 if report.failed else 0, info)


def drop(rows: list) -> None:
    """The other processes' emit: only the main process reports."""
