"""The model thread of `bit serve` (bitcli.server.batcher): what it stacks together, in what order, how
admission is bounded and given back, failures that stay in their batch, and the drain at shutdown."""

from __future__ import annotations

import threading
from concurrent.futures import CancelledError

import numpy as np
import pytest

from bitcli.server.batcher import Batcher

from .helpers import wait_until


def _image(size: int, value: int) -> np.ndarray:
    return np.full((size, size, 3), value, dtype=np.uint8)


class Recorder:
    """A compute function that records the batches it was given and answers each image's first pixel."""

    def __init__(self, name: str) -> None:
        self.name, self.batches = name, []

    def __call__(self, batch: np.ndarray) -> list[tuple[str, int]]:
        self.batches.append([int(v) for v in batch[:, 0, 0, 0]])
        return [(self.name, int(v)) for v in batch[:, 0, 0, 0]]


def test_queued_images_are_stacked_by_kind_and_size_up_to_max_batch():
    logits, features = Recorder("logits"), Recorder("features")
    batcher = Batcher({"logits": logits, "features": features}, max_batch=3, max_wait_s=0, capacity=10)
    assert batcher.admit(7)
    first = batcher.submit("logits", [_image(4, 1), _image(8, 2), _image(4, 3), _image(4, 4)])
    second = batcher.submit("features", [_image(4, 5), _image(4, 6)])
    third = batcher.submit("logits", [_image(4, 7)])
    batcher.start()  # everything is queued already: the first batch takes max_batch of it at once
    try:
        assert [f.result(10) for f in first + second + third] == [
            ("logits", 1), ("logits", 2), ("logits", 3), ("logits", 4), ("features", 5), ("features", 6), ("logits", 7),
        ]  # fmt: skip
    finally:
        batcher.stop(10)
    # batch one: images 1-3 (4 px, 8 px, 4 px) as two stacks; batch two: 4, 5, 6 (logits, then features); then 7
    assert logits.batches == [[1, 3], [2], [4], [7]]
    assert features.batches == [[5, 6]]
    assert batcher.batches == 5 and batcher.images == 7 and batcher.pending == 0


def test_admission_is_bounded_and_slots_come_back():
    gate = threading.Event()

    def slow(batch: np.ndarray) -> list[int]:
        assert gate.wait(10)
        return list(range(len(batch)))

    batcher = Batcher({"logits": slow}, max_batch=4, max_wait_s=0, capacity=3)
    assert batcher.admit(2) and not batcher.admit(2) and batcher.pending == 2  # refused: nothing reserved
    assert batcher.admit(1) and batcher.pending == 3 and not batcher.admit(1)
    batcher.release(1)  # an image that did not decode
    futures = batcher.submit("logits", [_image(2, 0), _image(2, 1)])
    assert futures[1].cancel() and batcher.pending == 1  # its request gave up: the slot is back at once
    batcher.start()
    try:
        gate.set()
        assert futures[0].result(10) == 0
        with pytest.raises(CancelledError):
            futures[1].result(0)
    finally:
        batcher.stop(10)
    assert batcher.pending == 0 and batcher.images == 1


def test_a_failing_batch_fails_its_images_and_the_thread_goes_on():
    calls = []

    def flaky(batch: np.ndarray) -> list[int]:
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return [7] * len(batch)

    batcher = Batcher({"logits": flaky}, max_batch=2, max_wait_s=0, capacity=4)
    assert batcher.admit(3)
    failed = batcher.submit("logits", [_image(2, 0), _image(2, 0)])
    batcher.start()
    try:
        for future in failed:
            with pytest.raises(RuntimeError, match="out of memory"):
                future.result(10)
        assert batcher.submit("logits", [_image(2, 0)])[0].result(10) == 7
    finally:
        batcher.stop(10)
    assert calls == [2, 1] and batcher.pending == 0


def test_stop_answers_what_is_queued_then_ends_the_thread():
    gate = threading.Event()

    def gated(batch: np.ndarray) -> list[int]:
        assert gate.wait(10)
        return [int(v) for v in batch[:, 0, 0, 0]]

    batcher = Batcher({"logits": gated}, max_batch=2, max_wait_s=0, capacity=8)
    assert batcher.admit(5)
    batcher.start()
    futures = batcher.submit("logits", [_image(2, v) for v in range(5)])
    stopper = threading.Thread(target=batcher.stop)
    stopper.start()  # the stop marker is queued behind the five images
    gate.set()
    stopper.join(10)
    assert not stopper.is_alive() and not batcher._thread.is_alive()
    assert [f.result(0) for f in futures] == [0, 1, 2, 3, 4]


def test_retry_after_grows_with_the_work_held():
    batcher = Batcher({"logits": lambda b: [0] * len(b)}, max_batch=4, max_wait_s=0, capacity=100)
    assert batcher.retry_after() == 1  # nothing measured yet: one second
    batcher._seconds_per_image = 0.25
    assert batcher.admit(40) and batcher.retry_after() == 10


def test_the_first_image_waits_for_company_until_max_batch_or_max_wait():
    """--max-wait-ms: the model thread holds a lone image up to max_wait_s for others; a batch that fills to
    max_batch runs at once (here long before its 30 s wait), and a lone image runs when its wait is over."""
    recorder = Recorder("logits")
    patient = Batcher({"logits": recorder}, max_batch=3, max_wait_s=30, capacity=8)
    patient.start()
    try:
        assert patient.admit(3)
        first = patient.submit("logits", [_image(2, 1)])
        wait_until(patient._queue.empty)  # the model thread took it and now waits for company
        assert not first[0].done()
        rest = patient.submit("logits", [_image(2, 2), _image(2, 3)])
        assert [f.result(10) for f in first + rest] == [("logits", 1), ("logits", 2), ("logits", 3)]
    finally:
        patient.stop(10)
    assert recorder.batches == [[1, 2, 3]]

    recorder = Recorder("logits")
    brief = Batcher({"logits": recorder}, max_batch=8, max_wait_s=0.05, capacity=8)
    brief.start()
    try:
        assert brief.admit(1)
        assert brief.submit("logits", [_image(2, 4)])[0].result(10) == ("logits", 4)  # alone, after its wait
    finally:
        brief.stop(10)
    assert recorder.batches == [[4]]
