"""The shared image code (bitcli.images): the one folder lister and the one background decoder."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from bitcli.errors import BitError
from bitcli.images import Reader, list_images


def _touch(root: Path, *names: str) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")


def test_list_images_sorted_by_relative_path_hidden_names_skipped(tmp_path):
    _touch(tmp_path, "b.JPG", "a.png", "notes.txt", "sub/c.webp", "sub b/d.png", ".hidden.png", "._a.png",
           ".git/e.png", "sub/.cache/f.png", "sub/g.tiff")  # fmt: skip
    (tmp_path / "folder.png").mkdir()  # a folder named like an image is not an image
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")  # listed: the caller reports it
    os.mkfifo(tmp_path / "pipe.png")
    assert list_images(tmp_path, recursive=False) == [
        str(tmp_path / n) for n in ["a.png", "b.JPG", "dangling.jpg", "pipe.png"]
    ]
    deep = ["a.png", "b.JPG", "dangling.jpg", "pipe.png", "sub b/d.png", "sub/c.webp", "sub/g.tiff"]
    assert list_images(tmp_path) == [str(tmp_path / n) for n in deep]


def test_list_images_of_a_hidden_folder_named_outright(tmp_path):
    """Only names below the folder count: a folder that is itself hidden is listed when asked for."""
    _touch(tmp_path, ".photos/a.png")
    assert list_images(tmp_path / ".photos") == [str(tmp_path / ".photos" / "a.png")]


def test_list_images_unreadable_folder_is_one_line(tmp_path):
    with pytest.raises(BitError) as info:
        list_images(tmp_path / "missing")
    assert str(info.value) == f"{tmp_path / 'missing'}: cannot list folder (No such file or directory)"


def test_list_images_never_skips_an_unreadable_sub_folder(tmp_path, monkeypatch):
    """A folder that cannot be read is an error naming it, not silently fewer images (as rglob would do)."""
    _touch(tmp_path, "a.png", "locked/b.png")
    real = os.scandir

    def scandir(path):
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert list_images(tmp_path, recursive=False) == [str(tmp_path / "a.png")]
    with pytest.raises(BitError) as info:
        list_images(tmp_path)
    assert str(info.value) == f"{tmp_path / 'locked'}: cannot list folder (Permission denied)"


def test_links_to_folders_are_not_followed(tmp_path):
    _touch(tmp_path, "real/a.png")
    (tmp_path / "top").mkdir()
    (tmp_path / "top" / "loop.png").symlink_to(tmp_path / "top")  # a cycle, named like an image
    (tmp_path / "top" / "real").symlink_to(tmp_path / "real")
    assert list_images(tmp_path / "top") == []


def _job(value: int, delay: float = 0.0):
    def job() -> np.ndarray:
        time.sleep(delay)
        if value < 0:
            raise ValueError(f"bad {value}")
        return np.full((2,), value)

    return job


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_outcomes_keep_job_order_and_failures(workers):
    batches = [("first", [_job(1, 0.03), _job(-2), _job(3)]), ("second", [_job(-4, 0.01), _job(5)])]
    with Reader(workers) as reader:
        got = list(reader.outcomes(batches))
    assert [meta for meta, _ in got] == ["first", "second"]
    flat = [r if isinstance(r, Exception) else int(r[0]) for _, results in got for r in results]
    assert [str(r) if isinstance(r, Exception) else r for r in flat] == [1, "bad -2", 3, "bad -4", 5]


@pytest.mark.parametrize("workers", [0, 2])
def test_run_stacks_and_raises_the_first_failure(workers):
    with Reader(workers) as reader:
        assert [(m, a.tolist()) for m, a in reader.run([("x", [_job(1), _job(2)])])] == [("x", [[1, 1], [2, 2]])]
        with pytest.raises(ValueError, match="bad -1"):
            list(reader.run([("ok", [_job(0)]), ("bad", [_job(-1), _job(-3)])]))


def test_decoding_runs_a_bounded_number_of_batches_ahead():
    pulled = []

    def batches():
        for i in range(6):
            pulled.append(i)
            yield i, [_job(i)]

    with Reader(2, ahead=2) as reader:
        for meta, _ in reader.outcomes(batches()):
            assert max(pulled) == min(meta + 2, 5)  # submitted: this batch and the two after it
    assert pulled == list(range(6))


def test_leaving_early_cancels_what_nobody_will_use():
    started = []
    gate = threading.Event()

    def job(i: int):
        def run() -> np.ndarray:
            started.append(i)
            gate.wait(5)
            return np.zeros(1)

        return run

    with Reader(1, ahead=3) as reader:
        outcomes = reader.outcomes((i, [job(i)]) for i in range(10))
        gate.set()
        next(outcomes)  # the first batch, with three more already submitted
    assert len(started) <= 4  # the queued ones were cancelled, not decoded
