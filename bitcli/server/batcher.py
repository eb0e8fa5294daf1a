"""Dynamic batching for `bit serve`: the images of concurrent requests share forward passes.

One thread owns the model (a torch module is not safe to run from several threads at once, and one forward of
16 images is faster than 16 of one). Requests hand it decoded images, each with a Future; it takes the first
image waiting, waits up to `max_wait_s` for more (up to `max_batch`), stacks them by size (an uncropped model
keeps each image's aspect ratio, as in the pipeline: images.stack_by_size), runs each stack through the compute
function of its kind (logits or features) and sets every Future. While a batch runs, the next one queues.

Admission is bounded: a request reserves a slot per image before anything is decoded (`admit`, refused when
`capacity` would be passed: the server answers 429), and the slots come back as the images' Futures finish or
are cancelled, or when the request gives up before handing them over (`release`). Memory is therefore bounded
by `capacity` decoded images, whatever the number of clients.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from bitcli.images import stack_by_size

Compute = Callable[[np.ndarray], Sequence[Any]]  # uint8 [B, H, W, 3] -> one value per image, in order


@dataclass(frozen=True)
class _Item:
    kind: str
    image: np.ndarray
    future: Future


class Batcher:
    """The model thread and its bounded queue. `compute` maps each kind ("logits", "features") to its function."""

    def __init__(self, compute: Mapping[str, Compute], *, max_batch: int, max_wait_s: float, capacity: int) -> None:
        self.compute, self.max_batch, self.max_wait_s, self.capacity = compute, max_batch, max_wait_s, capacity
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()  # bounded by admission, not here
        self._lock = threading.Lock()
        self._pending = 0  # slots held: admitted images not yet answered
        self._thread = threading.Thread(target=self._loop, name="bit-model", daemon=True)
        self.batches = 0  # forward passes run (one per stack)
        self.images = 0  # images answered by the model
        self._seconds_per_image = 0.0  # a running average, for Retry-After

    # -- the requests' side (any thread)

    def admit(self, n: int) -> bool:
        """Reserve n slots; False (nothing reserved) when that would pass the capacity."""
        with self._lock:
            if self._pending + n > self.capacity:
                return False
            self._pending += n
            return True

    def release(self, n: int) -> None:
        """Give back n slots of images that will not be submitted (undecodable, or their request gave up)."""
        if n:
            with self._lock:
                self._pending -= n

    def submit(self, kind: str, images: Sequence[np.ndarray]) -> list[Future]:
        """Hand admitted images to the model thread, queued one after the other (a request's images usually
        share a forward pass); each slot is given back when its Future is done or cancelled."""
        if kind not in self.compute:
            raise ValueError(kind)
        futures = []
        for image in images:
            future: Future = Future()
            future.add_done_callback(lambda _: self.release(1))
            self._queue.put(_Item(kind, image, future))
            futures.append(future)
        return futures

    @property
    def pending(self) -> int:
        return self._pending

    def retry_after(self) -> int:
        """Whole seconds after which a refused request has a fair chance: the time to work off what is held."""
        return max(1, math.ceil(self._pending * self._seconds_per_image))

    # -- the model thread

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Answer everything queued so far, then end the thread (the server has stopped taking requests)."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            items, stopping = self._gather()
            if items:
                self._run(items)
            if stopping:
                return

    def _gather(self) -> tuple[list[_Item], bool]:
        """The next batch: the first image waiting, then whatever comes within max_wait_s, up to max_batch.
        (True when the stop marker came: what was queued before it is in the batch or answered next.)"""
        first = self._queue.get()
        if first is None:
            return self._drain(), True
        items = [first]
        deadline = time.monotonic() + self.max_wait_s
        while len(items) < self.max_batch:
            try:
                item = self._queue.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                break
            if item is None:
                return items + self._drain(), True
            items.append(item)
        return items, False

    def _drain(self) -> list[_Item]:
        items: list[_Item] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return items
            if item is not None:
                items.append(item)

    def _run(self, items: list[_Item]) -> None:
        """Every stack of `items` through its compute function, max_batch at a time; a failure fails only the
        images of its stack (their requests get error rows) and never the thread."""
        live = [item for item in items if item.future.set_running_or_notify_cancel()]  # cancelled: gave up
        start = time.monotonic()
        for kind in dict.fromkeys(item.kind for item in live):
            group = [item for item in live if item.kind == kind]
            for start_at in range(0, len(group), self.max_batch):
                chunk = group[start_at : start_at + self.max_batch]
                for positions, stacked in stack_by_size((i, item.image) for i, item in enumerate(chunk)):
                    self._compute(self.compute[kind], stacked, [chunk[p].future for p in positions])
        if live:
            per_image = (time.monotonic() - start) / len(live)
            self._seconds_per_image = per_image if not self.images else 0.8 * self._seconds_per_image + 0.2 * per_image
            self.images += len(live)

    def _compute(self, compute: Compute, stacked: np.ndarray, futures: list[Future]) -> None:
        try:
            values = compute(stacked)
        except Exception as exc:  # noqa: BLE001 -- the images' error rows say what failed; the server goes on
            for future in futures:
                future.set_exception(exc)
            return
        self.batches += 1
        for future, value in zip(futures, values):
            future.set_result(value)
