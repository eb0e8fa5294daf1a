"""`bit predict`: expand paths, decode in background threads, classify in batches, report in any format."""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import re
import sys
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from bitcli.errors import BitError, UsageError
from bitcli.preprocess import IMAGE_EXTENSIONS, Preprocess, load_image

FORMATS = ("table", "json", "jsonl", "csv")


@dataclass
class Result:
    path: str
    predictions: list[dict] | None = None
    error: str | None = None

    def to_dict(self) -> dict:
        if self.error is not None:
            return {"path": self.path, "error": self.error}
        return {"path": self.path, "predictions": self.predictions}


@dataclass
class Input:
    """One row of the report: a path to classify, or an argument that named nothing usable (`error` set)."""

    path: str
    error: str | None = None


# Output formats inferred from --output's suffix when --format is not given.
SUFFIX_FORMATS = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}


def output_format(fmt: str | None, output: Path | None) -> str:
    """--format if given, else the one --output's suffix names (table for any other suffix or for stdout).
    An explicit --format that contradicts the suffix is refused: the file would not hold what its name says."""
    inferred = SUFFIX_FORMATS.get(output.suffix.lower()) if output is not None else None
    if fmt is None:
        return inferred or "table"
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    if inferred is not None and inferred != fmt:
        raise UsageError(
            f"--format {fmt} contradicts --output {_display(output)} (a {output.suffix} file holds {inferred}); "
            f"drop --format or give the file a name that matches"
        )
    return fmt


_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# Characters that would break a table row or reorder what is shown: C0/C1 controls, line and paragraph
# separators, and the bidirectional overrides and isolates.
_INVISIBLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _visible(text: str) -> str:
    """`text` on one line for people: control characters shown as escapes (newline as \\n), nothing else changed."""
    return _INVISIBLE.sub(lambda m: _ESCAPES.get(m[0]) or f"\\u{ord(m[0]):04x}", text)


def _display(path: str | os.PathLike[str]) -> str:
    # Non-UTF-8 names stay printable (surrogate escapes become U+FFFD) and valid in JSON.
    return os.fsencode(path).decode("utf-8", "replace")


def _images_in(folder: Path, recursive: bool) -> list[str]:
    walker = folder.rglob("*") if recursive else folder.iterdir()
    # Anything but a folder is listed, so a dangling link or a pipe is reported rather than silently skipped.
    found = [p for p in walker if p.suffix.lower() in IMAGE_EXTENSIONS and not p.is_dir()]
    return sorted(str(p) for p in found)


def _expand(arg: str, recursive: bool) -> list[Input]:
    """A file as given; a folder to the images it holds; a glob to its matches (folders among them expanded)."""
    p = Path(arg)
    if p.is_dir():
        images = _images_in(p, recursive)
        return [Input(i) for i in images] or [Input(arg, f"{_display(arg)}: folder holds no images")]
    if p.exists() or p.is_symlink():
        return [Input(arg)]
    if not glob.has_magic(arg):
        return [Input(arg, f"{_display(arg)}: no such file or folder")]
    matches = sorted(glob.glob(arg, recursive=recursive))
    if not matches:
        return [Input(arg, f"{_display(arg)}: no files match this pattern")]
    return [Input(i) for m in matches for i in (_images_in(Path(m), recursive) if Path(m).is_dir() else [m])]


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


def iter_batches(
    paths: list[str], preprocess: Preprocess, batch_size: int, workers: int
) -> Iterator[tuple[list[str], np.ndarray | None, list[tuple[str, str]]]]:
    """(paths, uint8 [B, H, W, 3] batch, [(path, error)]) in input order; decoding runs ahead in threads
    (PIL releases the GIL) while the model works on the previous batch. Prefetch is bounded."""
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="bit-decode") as pool:
        pending: deque[tuple[str, Future]] = deque()
        todo = iter(paths)

        def refill() -> None:
            while len(pending) < batch_size * 2:
                path = next(todo, None)
                if path is None:
                    return
                pending.append((path, pool.submit(decode, path, preprocess)))

        refill()
        good_paths: list[str] = []
        arrays: list[np.ndarray] = []
        failures: list[tuple[str, str]] = []
        try:
            while pending:
                path, future = pending.popleft()
                refill()
                try:
                    array = future.result()
                except BitError as exc:
                    failures.append((path, str(exc)))
                    continue
                except Exception as exc:  # a decoder bug must not take the other images down
                    failures.append((path, f"{_display(path)}: cannot decode image ({exc})"))
                    continue
                if arrays and array.shape != arrays[0].shape:  # uncropped checkpoints: batch equal sizes only
                    yield good_paths, np.stack(arrays), failures
                    good_paths, arrays, failures = [], [], []
                good_paths.append(path)
                arrays.append(array)
                if len(arrays) == batch_size:
                    yield good_paths, np.stack(arrays), failures
                    good_paths, arrays, failures = [], [], []
            if arrays or failures:
                yield good_paths, (np.stack(arrays) if arrays else None), failures
        finally:
            for _, future in pending:
                future.cancel()


class Classifier:
    """A loaded checkpoint on a device, ready to turn uint8 batches into top-k predictions."""

    def __init__(self, ckpt, device, dtype, channels_last: bool = True) -> None:
        import torch

        from bitcli.runtime import reuse_freed_memory

        if device.type == "cpu":
            reuse_freed_memory()
        self.torch = torch
        self.labels = ckpt.labels
        self.preprocess: Preprocess = ckpt.preprocess
        self.device, self.dtype = device, dtype
        self.model = ckpt.build_model(device=device)
        if self.model.head is None:
            raise BitError(f"{ckpt.source}: checkpoint has no classification head; it gives features, not labels")
        self.channels_last = channels_last
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)

    def logits(self, batch_uint8: np.ndarray):
        from bitcli.runtime import autocast

        torch = self.torch
        x = torch.from_numpy(batch_uint8).to(self.device, non_blocking=True)
        x = self.preprocess.normalize(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), autocast(self.device, self.dtype):
            return self.model(x).float()

    def top_k(self, batch_uint8: np.ndarray, k: int) -> list[list[dict]]:
        torch = self.torch
        probs = torch.softmax(self.logits(batch_uint8), dim=-1)
        scores, indices = probs.topk(min(k, probs.shape[-1]), dim=-1)
        return [
            [{"label": self.labels[i], "index": i, "score": round(s, 6)} for s, i in zip(row_s, row_i)]
            for row_s, row_i in zip(scores.cpu().tolist(), indices.cpu().tolist())
        ]


def render(results: list[Result], fmt: str, color: bool) -> str:
    if fmt == "json":
        return json.dumps([r.to_dict() for r in results], ensure_ascii=False, indent=2) + "\n"
    if fmt == "jsonl":
        return "".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in results)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["path", "rank", "label", "index", "score", "error"])
        for r in results:
            if r.error is not None:
                writer.writerow([r.path, "", "", "", "", r.error])
            else:
                for rank, p in enumerate(r.predictions, 1):
                    writer.writerow([r.path, rank, p["label"], p["index"], f"{p['score']:.6f}", ""])
        return buf.getvalue()
    return _table(results, color)


def _table(results: list[Result], color: bool) -> str:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    # Paths, labels and error texts are data: Text objects keep them literal (a file "photo [red]1.jpg" is
    # not markup) and _visible keeps each on its line (a newline in a label must not split the row).
    table = Table(show_lines=True)
    table.add_column("image", overflow="fold")
    table.add_column("label", overflow="fold")
    table.add_column("score", justify="right")
    for r in results:
        if r.error is not None:
            table.add_row(Text(_visible(r.path)), Text.assemble(("error:", "red"), " ", _visible(r.error)), "")
            continue
        labels = Text("\n").join(
            Text.assemble(_visible(p["label"]), (f" ({p['index']})", "dim")) for p in r.predictions
        )
        scores = "\n".join(f"{p['score']:.4f}" for p in r.predictions)
        table.add_row(Text(_visible(r.path)), labels, scores)
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=color, no_color=not color, width=_width(), highlight=False)
    console.print(table)
    return buf.getvalue()


def _width() -> int:
    import shutil

    return max(60, shutil.get_terminal_size((120, 24)).columns)


def _emit(results: list[Result]) -> None:
    sys.stdout.write(render(results, "jsonl", color=False))
    sys.stdout.flush()


class Report:
    """The rows, one per input in argument order, each released once every row before it is known: streaming
    and an interrupted run both deliver an in-order prefix. A path listed twice is classified once."""

    def __init__(self, inputs: list[Input]) -> None:
        self.inputs = inputs
        self.outcomes: dict[str, Result] = {}  # by path as given
        self.rows: list[Result] = []

    def to_classify(self) -> list[str]:
        return list(dict.fromkeys(i.path for i in self.inputs if i.error is None))

    def record(self, path: str, predictions: list[dict] | None = None, error: str | None = None) -> None:
        self.outcomes[path] = Result(_display(path), predictions, error)

    def release(self) -> list[Result]:
        """The rows that became ready since the last call."""
        start = len(self.rows)
        for item in self.inputs[start:]:
            if item.error is not None:
                self.rows.append(Result(_display(item.path), error=item.error))
            elif item.path in self.outcomes:
                self.rows.append(self.outcomes[item.path])
            else:
                break
        return self.rows[start:]


def run(
    inputs: list[str],
    model: str,
    revision: str | None,
    top_k: int,
    batch_size: int,
    device_spec: str,
    precision: str,
    fmt: str | None,
    output: Path | None,
    recursive: bool,
    workers: int,
) -> int:
    """The whole command; returns the exit code. Ctrl-C reports what was done and returns 130."""
    from bitcli.hub import load_checkpoint
    from bitcli.runtime import resolve_device, resolve_precision

    fmt = output_format(fmt, output)
    device = resolve_device(device_spec)
    dtype = resolve_precision(precision, device)
    report = Report(expand_inputs(inputs, recursive))
    classifier = Classifier(load_checkpoint(model, revision), device, dtype)
    # jsonl on stdout streams: each line is written as soon as it and every line before it are done (a pipe
    # sees progress, and an interrupted run has already delivered everything it finished).
    stream = fmt == "jsonl" and output is None
    interrupted = _classify(report, classifier, top_k, batch_size, workers, _emit if stream else None)
    rows = report.rows
    if not stream:
        _write(rows, fmt, output)
    failed = [r for r in rows if r.error is not None]
    for r in failed:
        print(f"error: {_visible(r.error)}", file=sys.stderr)
    if interrupted:
        print(f"interrupted: {len(rows)} of {len(report.inputs)} images done; the results above are complete for those", file=sys.stderr)
        return 130
    return 1 if failed else 0


def _classify(report: Report, classifier: Classifier, top_k: int, batch_size: int, workers: int, emit) -> bool:
    """Fills `report`, passing each newly ready run of rows to `emit` (if any); True when Ctrl-C stopped it."""
    from bitcli.ui import progress_bar

    emit = emit or (lambda rows: None)
    paths = report.to_classify()
    emit(report.release())  # arguments that named nothing come out as soon as their turn comes
    with progress_bar("classifying", total=len(paths), unit="img") as advance:
        try:
            for good, batch, failures in iter_batches(paths, classifier.preprocess, batch_size, workers):
                for path, error in failures:
                    report.record(path, error=error)
                if batch is not None:
                    for path, preds in zip(good, classifier.top_k(batch, top_k)):
                        report.record(path, predictions=preds)
                emit(report.release())
                advance(len(good) + len(failures))
        except KeyboardInterrupt:
            emit(report.release())  # what was recorded before the signal is complete: deliver it
            return True
    return False


def _write(rows: list[Result], fmt: str, output: Path | None) -> None:
    from bitcli.checkpoints import atomic_write

    text = render(rows, fmt, color=output is None and fmt == "table" and sys.stdout.isatty())
    if output is not None:
        atomic_write(output, lambda f: f.write(text.encode("utf-8")))
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
