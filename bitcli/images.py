"""Finding images in folders and decoding them in background threads: shared by every command.

Decoding runs on a thread pool (Pillow releases the GIL while it decodes and resizes) a bounded number of
batches ahead of the model; results come back in job order, so the number of workers changes speed only.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Generic, TypeVar, cast

import numpy as np

from bitcli.errors import BitError
from bitcli.preprocess import IMAGE_EXTENSIONS

T = TypeVar("T")
K = TypeVar("K")
Job = Callable[[], np.ndarray]


def list_images(folder: Path, recursive: bool = True) -> list[str]:
    """The images in `folder` (at any depth when recursive), sorted by their path relative to it.

    Names starting with "." are skipped, folders and files alike (version-control folders, macOS `._*` files).
    Anything with an image suffix that is not a folder is listed, a dangling link or a pipe too, so that the
    caller reports it instead of silently leaving it out; for the same reason a folder that cannot be read,
    at any depth, is an error rather than skipped. Links to folders are not followed (no cycles).
    """

    def refuse(exc: OSError) -> None:
        where = exc.filename if exc.filename is not None else folder
        raise BitError(f"{where}: cannot list folder ({exc.strerror or type(exc).__name__})")

    found: list[tuple[str, str]] = []  # (relative POSIX path, path)
    for parent, dirs, files in os.walk(folder, onerror=refuse):
        dirs[:] = [d for d in dirs if not d.startswith(".")] if recursive else []
        rel = Path(parent).relative_to(folder)
        for name in files:
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                found.append(((rel / name).as_posix(), str(Path(parent) / name)))
    return [path for _, path in sorted(found)]


class Reader(Generic[T]):
    """Runs batches of decode jobs on `workers` threads (0: in the calling thread), `ahead` batches before
    they are consumed. A batch is (meta, [job, ...]); its results keep the order of its jobs."""

    def __init__(self, workers: int, ahead: int = 1) -> None:
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bit-decode") if workers > 0 else None
        self.ahead = ahead

    def __enter__(self) -> Reader[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:  # an interrupted run must not wait for images nobody will use
            self.pool.shutdown(wait=True, cancel_futures=True)

    def outcomes(self, batches: Iterable[tuple[T, list[Job]]]) -> Iterator[tuple[T, list[np.ndarray | Exception]]]:
        """(meta, results): each result is the job's array, or the Exception it raised (one bad image must
        not take the others down; the caller decides what a failure means)."""
        pending: deque[tuple[T, list[Future | np.ndarray | Exception]]] = deque()
        for meta, jobs in batches:
            pending.append((meta, [self._submit(job) for job in jobs]))
            if len(pending) > self.ahead:
                yield self._collect(pending.popleft())
        while pending:
            yield self._collect(pending.popleft())

    def run(self, batches: Iterable[tuple[T, list[Job]]]) -> Iterator[tuple[T, np.ndarray]]:
        """(meta, stacked arrays); the first failed job's exception is raised."""
        for meta, results in self.outcomes(batches):
            for result in results:
                if isinstance(result, Exception):
                    raise result
            yield meta, np.stack(cast("list[np.ndarray]", results))  # every Exception was raised above

    def _submit(self, job: Job) -> Future | np.ndarray | Exception:
        if self.pool is not None:
            return self.pool.submit(job)
        try:
            return job()
        except Exception as exc:  # noqa: BLE001 -- a job's failure is its result (Reader.outcomes)
            return exc

    @staticmethod
    def _collect(item: tuple[T, list[Future | np.ndarray | Exception]]) -> tuple[T, list[np.ndarray | Exception]]:
        meta, futures = item
        results: list[np.ndarray | Exception] = []
        for f in futures:
            if isinstance(f, Future):
                exc = f.exception()
                results.append(f.result() if exc is None else exc)  # type: ignore[arg-type]  # typed BaseException; a job's are Exceptions
            else:
                results.append(f)
        return meta, results


def stack_by_size(
    items: Iterable[tuple[K, Any]], stack: Callable[[list], Any] = np.stack
) -> Iterator[tuple[list[K], Any]]:
    """(keys, stacked arrays), one batch per image size, keys in their order within it: only equal sizes
    stack, and a checkpoint without a centre crop keeps each image's aspect ratio. `stack`: np.stack, or
    torch.stack for images already on a GPU (bitcli.gpu_decode)."""
    by_size: dict[tuple[int, ...], list[tuple[K, Any]]] = {}
    for key, array in items:
        by_size.setdefault(tuple(array.shape), []).append((key, array))
    for group in by_size.values():
        yield [key for key, _ in group], stack([array for _, array in group])
