"""`bit predict`: expand the arguments into images, decode them in background threads, classify them in batches
with the engine, and report one row per argument occurrence, in argument order, in any format."""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import torch

from bitcli.engine import Engine
from bitcli.errors import BitError, UsageError, one_line
from bitcli.hub import load_checkpoint
from bitcli.images import Job, Reader, list_images, stack_by_size
from bitcli.options import PredictFormat, PredictOptions
from bitcli.preprocess import Preprocess, load_image
from bitcli.render import Row, json_lines, predictions_text, write_text
from bitcli.runtime import resolve_device, resolve_precision
from bitcli.ui import display, progress_bar, visible


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


class Report:
    """The rows, one per input in argument order, each released once every row before it is known: streaming
    and an interrupted run both deliver an in-order prefix. A path listed twice is classified once."""

    def __init__(self, inputs: list[Input]) -> None:
        self.inputs = inputs
        self.outcomes: dict[str, Row] = {}  # by path as given
        self.rows: list[Row] = []

    def to_classify(self) -> list[str]:
        return list(dict.fromkeys(i.path for i in self.inputs if i.error is None))

    def record(self, path: str, predictions: list[dict] | None = None, error: str | None = None) -> None:
        self.outcomes[path] = Row(display(path), predictions, error)

    def release(self) -> list[Row]:
        """The rows that became ready since the last call."""
        start = len(self.rows)
        for item in self.inputs[start:]:
            if item.error is not None:
                self.rows.append(Row(display(item.path), error=item.error))
            elif item.path in self.outcomes:
                self.rows.append(self.outcomes[item.path])
            else:
                break
        return self.rows[start:]


def run(opts: PredictOptions) -> int:
    """The whole command; returns the exit code. Ctrl-C reports what was done and returns 130."""
    device = resolve_device(opts.device)
    dtype = resolve_precision(opts.precision, device)
    report = Report(expand_inputs(opts.images, opts.recursive))
    ckpt = load_checkpoint(opts.model, opts.revision)
    engine = Engine.load(ckpt, device, dtype)
    # jsonl on stdout streams: each line is written as soon as it and every line before it are done (a pipe
    # sees progress, and an interrupted run has already delivered everything it finished).
    stream = opts.format == PredictFormat.jsonl and opts.output is None
    interrupted = classify(report, engine, ckpt, opts, _emit if stream else lambda rows: None)
    rows = report.rows
    if not stream:
        color = opts.output is None and opts.format == PredictFormat.table and sys.stdout.isatty()
        write_text(predictions_text(rows, opts.format, color), opts.output)
    failed = [r for r in rows if r.error is not None]
    for r in failed:
        print(f"error: {visible(r.error)}", file=sys.stderr)
    if interrupted:
        print(f"interrupted: {len(rows)} of {len(report.inputs)} images done; the results above are complete for those", file=sys.stderr)
        return 130
    return 1 if failed else 0


def _emit(rows: list[Row]) -> None:
    sys.stdout.write(json_lines(rows))
    sys.stdout.flush()


def classify(report: Report, engine: Engine, ckpt, opts: PredictOptions, emit: Callable[[list[Row]], None]) -> bool:
    """Classifies every path of `report` with the checkpoint's transform and labels, passing each newly ready
    run of rows to `emit`; True when Ctrl-C stopped it (what was recorded before the signal is complete, and
    is emitted)."""
    paths = report.to_classify()
    emit(report.release())  # arguments that named nothing come out as soon as their turn comes
    with progress_bar("classifying", total=len(paths), unit="img") as advance, Reader(opts.workers) as reader:
        try:
            for chunk, results in reader.outcomes(_jobs(paths, ckpt.preprocess, opts.batch_size)):
                for path, error, predictions in _outcomes(chunk, results, engine, ckpt.labels, opts.top_k):
                    report.record(path, predictions, error)
                emit(report.release())
                advance(len(chunk))
        except KeyboardInterrupt:
            emit(report.release())
            return True
    return False


def _jobs(paths: list[str], preprocess: Preprocess, batch_size: int) -> Iterator[tuple[list[str], list[Job]]]:
    """Chunks of batch_size paths with their decode jobs; the reader decodes a chunk ahead of the model."""
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        yield chunk, [lambda p=p: decode(p, preprocess) for p in chunk]  # `decode` looked up when the job runs


def _outcomes(
    chunk: list[str], results: list[np.ndarray | Exception], engine: Engine, labels: Sequence[str], k: int
) -> Iterator[tuple[str, str | None, list[dict] | None]]:
    """(path, error, predictions) per image of a chunk. The decoded images are classified one batch per
    image size: an uncropped checkpoint keeps each image's aspect ratio, and only equal sizes stack."""
    decoded = []
    for path, result in zip(chunk, results):
        if isinstance(result, Exception):
            yield path, failure(path, result), None
        else:
            decoded.append((path, result))
    for paths, batch in stack_by_size(decoded):
        for path, predictions in zip(paths, top_k(engine.logits(batch), labels, k)):
            yield path, None, predictions
