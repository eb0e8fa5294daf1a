"""`bit predict`: expand paths, decode in background threads, classify in batches, report in any format."""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import sys
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

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
class Inputs:
    paths: list[str] = field(default_factory=list)  # images to decode, in order
    failures: list[Result] = field(default_factory=list)  # arguments that named nothing usable


def _display(path: str | os.PathLike[str]) -> str:
    # Non-UTF-8 names stay printable (surrogate escapes become U+FFFD) and valid in JSON.
    return os.fsencode(path).decode("utf-8", "replace")


def _images_in(folder: Path, recursive: bool) -> list[str]:
    walker = folder.rglob("*") if recursive else folder.iterdir()
    # Anything but a folder is listed, so a dangling link or a pipe is reported rather than silently skipped.
    found = [p for p in walker if p.suffix.lower() in IMAGE_EXTENSIONS and not p.is_dir()]
    return sorted(str(p) for p in found)


def expand_inputs(args: list[str], recursive: bool) -> Inputs:
    """Files as given; folders to the images they hold; globs to their matches. Order kept, duplicates dropped."""
    out, seen = Inputs(), set()

    def add(path: str) -> None:
        if path not in seen:
            seen.add(path)
            out.paths.append(path)

    for arg in args:
        p = Path(arg)
        if p.is_dir():
            images = _images_in(p, recursive)
            if not images:
                out.failures.append(Result(_display(arg), error=f"{_display(arg)}: folder holds no images"))
            for image in images:
                add(image)
        elif p.exists() or p.is_symlink():
            add(arg)
        elif glob.has_magic(arg):
            matches = sorted(glob.glob(arg, recursive=recursive))
            if not matches:
                out.failures.append(Result(_display(arg), error=f"{_display(arg)}: no files match this pattern"))
            for m in matches:
                if Path(m).is_dir():
                    for image in _images_in(Path(m), recursive):
                        add(image)
                else:
                    add(m)
        else:
            out.failures.append(Result(_display(arg), error=f"{_display(arg)}: no such file or folder"))
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

    table = Table(show_lines=True)
    table.add_column("image", overflow="fold")
    table.add_column("label", overflow="fold")
    table.add_column("score", justify="right")
    for r in results:
        if r.error is not None:
            table.add_row(r.path, f"[red]error:[/red] {r.error}", "")
        else:
            labels = "\n".join(f"{p['label']} [dim]({p['index']})[/dim]" for p in r.predictions)
            scores = "\n".join(f"{p['score']:.4f}" for p in r.predictions)
            table.add_row(r.path, labels, scores)
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


def run(
    inputs: list[str],
    model: str,
    revision: str | None,
    top_k: int,
    batch_size: int,
    device_spec: str,
    precision: str,
    fmt: str,
    output: Path | None,
    recursive: bool,
    workers: int,
) -> int:
    """The whole command; returns the exit code. Ctrl-C reports what was done and returns 130."""
    from bitcli.checkpoints import atomic_write
    from bitcli.hub import load_checkpoint
    from bitcli.runtime import resolve_device, resolve_precision
    from bitcli.ui import progress_bar

    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    device = resolve_device(device_spec)
    dtype = resolve_precision(precision, device)
    found = expand_inputs(inputs, recursive)
    classifier = Classifier(load_checkpoint(model, revision), device, dtype)

    # jsonl on stdout streams: each line is written as soon as its image is done (a pipe sees progress,
    # and an interrupted run has already delivered everything it finished).
    stream = fmt == "jsonl" and output is None
    if stream:
        _emit(found.failures)
    results: dict[str, Result] = {}
    interrupted = False
    with progress_bar("classifying", total=len(found.paths), unit="img") as advance:
        try:
            for paths, batch, failures in iter_batches(found.paths, classifier.preprocess, batch_size, workers):
                for path, error in failures:
                    results[path] = Result(_display(path), error=error)
                if batch is not None:
                    for path, preds in zip(paths, classifier.top_k(batch, top_k)):
                        results[path] = Result(_display(path), predictions=preds)
                if stream:  # each batch covers the next run of inputs, so input order holds
                    _emit([results[p] for p in found.paths[len(results) - len(paths) - len(failures) : len(results)]])
                advance(len(paths) + len(failures))
        except KeyboardInterrupt:
            interrupted = True

    ordered = found.failures + [results[p] for p in found.paths if p in results]
    if not stream:
        text = render(ordered, fmt, color=output is None and fmt == "table" and sys.stdout.isatty())
        if output is not None:
            atomic_write(output, lambda f: f.write(text.encode("utf-8")))
        else:
            sys.stdout.write(text)
            sys.stdout.flush()
    failed = [r for r in ordered if r.error is not None]
    for r in failed:
        print(f"error: {r.error}", file=sys.stderr)
    if interrupted:
        done = len(ordered) - len(found.failures)
        print(f"interrupted: {done} of {len(found.paths)} images done; the results above are complete for those", file=sys.stderr)
        return 130
    return 1 if failed else 0
