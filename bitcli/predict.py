"""`bit predict`: expand the arguments into images, decode them in background threads, classify them in batches
with the engine, and report one row per argument occurrence, in argument order, in any format.

The pipeline from arguments to in-order rows (expand_inputs, Report, run_batches, exit_code) is also
`bit embed`'s; under torchrun each process runs every world-th batch and the main process reports them all.
"""

from __future__ import annotations

import contextlib
import glob
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Generic, TypeVar

import numpy as np
import torch

from bitcli.distributed import Dist, from_main, gather_in_order, my_share, setup_distributed, teardown
from bitcli.engine import Engine
from bitcli.errors import BitError, UsageError, one_line
from bitcli.hub import load_checkpoint
from bitcli.images import Job, Reader, list_images, stack_by_size
from bitcli.options import PredictFormat, PredictOptions
from bitcli.preprocess import Preprocess, load_image
from bitcli.render import Row, json_lines, predictions_text, write_text
from bitcli.runtime import resolve_precision
from bitcli.ui import display, progress_bar, visible

R = TypeVar("R")
Compute = Callable[[np.ndarray], Sequence[Any]]  # a stacked uint8 batch -> one result per image, in order


@dataclass(frozen=True)
class Input:
    """One row of the report: a path to classify, or an argument that named nothing usable (`error` set)."""

    path: str
    error: str | None = None


def _expand(arg: str, recursive: bool) -> list[Input]:
    """A file as given; a folder to the images it holds; a glob to its matches (folders among them expanded)."""
    p = Path(arg)
    try:
        if p.is_dir():
            images = list_images(p, recursive)
            return [Input(i) for i in images] or [Input(arg, f"{display(arg)}: folder holds no images")]
        if p.exists() or p.is_symlink():
            return [Input(arg)]
        if not glob.has_magic(arg):
            return [Input(arg, f"{display(arg)}: no such file or folder")]
        matches = sorted(glob.glob(arg, recursive=recursive))
        if not matches:
            return [Input(arg, f"{display(arg)}: no files match this pattern")]
        return [Input(i) for m in matches for i in (list_images(Path(m), recursive) if Path(m).is_dir() else [m])]
    except BitError as exc:  # a folder that cannot be listed is one failed row; the other arguments go on
        return [Input(arg, str(exc))]


def _stdin_paths(stdin: IO[bytes]) -> list[str]:
    """The lines of stdin, blank ones skipped; bytes kept as the file system spells them (surrogate escapes)."""
    paths = []
    for raw in stdin.read().split(b"\n"):
        line = raw[:-1] if raw.endswith(b"\r") else raw
        if line.strip():
            paths.append(os.fsdecode(line))
    return paths


def expand_inputs(args: list[str], recursive: bool, stdin: IO[bytes] | None = None) -> list[Input]:
    """One entry per image in argument order, repeats kept (one row per occurrence): folders and globs expand
    in place, sorted; `-` stands for the paths listed on stdin, one per line, each read like an argument."""
    if args.count("-") > 1:
        raise UsageError("`-` (read paths from stdin) may be given only once")
    out: list[Input] = []
    for arg in args:
        if arg != "-":
            out += _expand(arg, recursive)
            continue
        if stdin is None and sys.stdin is None:  # started with stdin closed (a service, `<&-`)
            raise UsageError("`-` reads paths from stdin, but this process has no stdin")
        lines = _stdin_paths(stdin if stdin is not None else sys.stdin.buffer)
        out += [i for line in lines for i in _expand(line, recursive)] or [Input("-", "-: stdin lists no paths")]
    return out


def decode(path: str, preprocess: Preprocess) -> np.ndarray:
    return preprocess.to_uint8(load_image(path))


def failure(path: str, exc: BaseException) -> str:
    """The one-line error text of an image that could not be decoded; never empty."""
    reason = one_line(exc)
    if isinstance(exc, BitError):  # bitcli's own messages name the file and say what to do
        return reason if str(exc).strip() else f"{display(path)}: {reason}"
    return f"{display(path)}: cannot decode image ({reason})"  # a decoder bug must not take the others down


def top_k(logits: torch.Tensor, labels: Sequence[str], k: int) -> list[list[dict]]:
    """Per row of logits, the k most probable classes, best first: {"label", "index", "score"}."""
    probs = torch.softmax(logits, dim=-1)
    scores, indices = probs.topk(min(k, probs.shape[-1]), dim=-1)
    return [
        [{"label": labels[i], "index": i, "score": round(s, 6)} for s, i in zip(row_s, row_i)]
        for row_s, row_i in zip(scores.cpu().tolist(), indices.cpu().tolist())
    ]


class Report(Generic[R]):
    """The rows, one per input in argument order, each released once every row before it is known: streaming
    and an interrupted run both deliver an in-order prefix. A path listed twice is classified once.
    `make_row(path, value, error)` builds a row (predict's Row, embed's Embedded). Released rows are the
    caller's: only rows still to come are held here (and the failed ones, for the summary on stderr), so
    streaming a million images holds none of them."""

    def __init__(self, inputs: list[Input], make_row: Callable[[str, Any, str | None], R] = Row) -> None:
        self.inputs = inputs
        self.make_row = make_row
        self.uses = Counter(i.path for i in inputs if i.error is None)  # occurrences not yet released, by path
        self.outcomes: dict[str, R] = {}  # recorded and not yet released, by path as given
        self.released = 0  # rows released so far
        self.failed: list[R] = []

    def to_classify(self) -> list[str]:
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
        self.failed += [r for r in ready if r.error is not None]  # type: ignore[attr-defined]
        return ready


def run(opts: PredictOptions) -> int:
    """The whole command; returns the exit code. Ctrl-C reports what was done and returns 130."""
    info, device = setup_distributed(opts.device)
    try:
        return _run(opts, info, device)
    finally:
        teardown(info)


def _run(opts: PredictOptions, info: Dist, device: torch.device) -> int:
    dtype = resolve_precision(opts.precision, device)
    report: Report[Row] = Report(from_main(lambda: expand_inputs(opts.images, opts.recursive), info))
    ckpt = load_checkpoint(opts.model, opts.revision)
    engine = Engine.load(ckpt, device, dtype)
    # jsonl on stdout streams: each line is written as soon as it and every line before it are done (a pipe
    # sees progress, and an interrupted run has already delivered everything it finished).
    stream = opts.format == PredictFormat.jsonl and opts.output is None
    rows: list[Row] = []
    emit = (print_lines if stream else rows.extend) if info.main else drop

    def classify(batch: np.ndarray) -> list[list[dict]]:
        return top_k(engine.logits(batch), ckpt.labels, opts.top_k)

    interrupted = run_batches(report, classify, ckpt.preprocess, opts.batch_size, opts.workers, emit, info)
    if info.main and not stream:
        color = opts.output is None and opts.format == PredictFormat.table and sys.stdout.isatty()
        write_text(predictions_text(rows, opts.format, color), opts.output)
    return exit_code(report, interrupted, info)


def exit_code(report: Report, interrupted: bool, info: Dist) -> int:
    """0, 1 (some input failed) or 130 (Ctrl-C). The main process names the failures on stderr and decides;
    every process returns its code, so that torchrun reports the run as one process would."""
    if info.main:
        for r in report.failed:
            print(f"error: {visible(r.error)}", file=sys.stderr)
        if interrupted:
            print(
                f"interrupted: {report.released} of {len(report.inputs)} images done; the results above are complete for those",
                file=sys.stderr,
            )
    if interrupted:  # every process got the signal; no further collective (some may have left a round early)
        return 130
    return from_main(lambda: 1 if report.failed else 0, info)


def print_lines(rows: list) -> None:
    """Rows as JSON lines on stdout, flushed: a pipe sees each as soon as it is ready."""
    sys.stdout.write(json_lines(rows))
    sys.stdout.flush()


def drop(rows: list) -> None:
    """The other processes' emit: only the main process reports."""


def run_batches(
    report: Report, compute: Compute, preprocess: Preprocess, batch_size: int, workers: int,
    emit: Callable[[list], None], info: Dist, verb: str = "classifying",
) -> bool:  # fmt: skip
    """Runs `compute` over every path of `report`, decoded with `preprocess`, batch_size paths at a time
    (this process's share of the batches, see distributed.my_share), and records each image's result or
    error in order on the main process, passing each newly ready run of rows to `emit`; True when Ctrl-C
    stopped it (what was recorded before the signal is complete, and is emitted)."""
    paths = report.to_classify()
    count = -(-len(paths) // batch_size)
    emit(report.release())  # arguments that named nothing come out as soon as their turn comes
    bar = progress_bar(verb, total=len(paths), unit="img") if info.main else contextlib.nullcontext(lambda n: None)
    with bar as advance, Reader(workers) as reader:
        batches = reader.outcomes(decode_jobs(paths, preprocess, batch_size, my_share(count, info)))
        mine = (list(_outcomes(chunk, results, compute)) for chunk, results in batches)
        try:
            for outcomes in gather_in_order(mine, count, info):
                for path, error, value in outcomes:
                    report.record(path, value, error)
                emit(report.release())
                advance(len(outcomes))
        except KeyboardInterrupt:
            emit(report.release())
            return True
    return False


def decode_jobs(
    paths: list[str], preprocess: Preprocess, batch_size: int, batches: range
) -> Iterator[tuple[list[str], list[Job]]]:
    """The chunks of batch_size paths numbered in `batches`, with their decode jobs; the reader decodes a
    chunk ahead of the model."""
    for b in batches:
        chunk = paths[b * batch_size : (b + 1) * batch_size]
        yield chunk, [lambda p=p: decode(p, preprocess) for p in chunk]  # `decode` looked up when the job runs


def _outcomes(
    chunk: list[str], results: list[np.ndarray | Exception], compute: Compute
) -> Iterator[tuple[str, str | None, Any]]:
    """(path, error, result) per image of a chunk. The decoded images are computed one batch per image
    size: an uncropped checkpoint keeps each image's aspect ratio, and only equal sizes stack."""
    decoded = []
    for path, result in zip(chunk, results):
        if isinstance(result, Exception):
            yield path, failure(path, result), None
        else:
            decoded.append((path, result))
    for paths, batch in stack_by_size(decoded):
        for path, value in zip(paths, compute(batch)):
            yield path, None, value
