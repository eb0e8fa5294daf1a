"""`torchrun --nproc_per_node 2 -m bitcli predict|embed|eval` (gloo, CPU) against one process: byte-identical
output and the same exit code, each image opened by exactly one of the processes. These start real processes:
several processes are what is tested.

Which process opened which file is observed from outside bitcli: a sitecustomize module (loaded by every
Python process that has it on PYTHONPATH, torchrun's workers included) installs a CPython audit hook that logs
each `open` event under the image folder with the process's RANK, into a file of its own."""

from __future__ import annotations

import collections
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_main, write_folder
from PIL import Image

pytestmark = pytest.mark.slow  # three torchrun launches: about 10 s each on 2 cores

TRACER = """
import os, sys
_log = os.environ.get("OPEN_TRACE")
if _log:
    _root = os.environ["OPEN_TRACE_ROOT"]
    _rank = os.environ.get("RANK", "-")
    _fd = os.open(os.path.join(_log, str(os.getpid())), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def _hook(event, args):
        if event == "open" and isinstance(args[0], str) and os.path.abspath(args[0]).startswith(_root):
            os.write(_fd, (_rank + "\\t" + os.path.abspath(args[0]) + "\\n").encode())

    sys.addaudithook(_hook)
"""


@pytest.fixture(autouse=True)
def one_thread():
    """The in-process run uses one intra-op thread, as each torchrun worker does (OMP_NUM_THREADS=1): the
    same convolution code path, so the same bits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def traced(tmp_path: Path) -> tuple[dict, Path]:
    """(environment for torchrun with the open tracer, the folder the processes log into)."""
    (tmp_path / "tracer").mkdir()
    (tmp_path / "tracer" / "sitecustomize.py").write_text(TRACER)
    logs = tmp_path / "opened"
    logs.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(tmp_path / "tracer"),
           "OPEN_TRACE": str(logs), "OPEN_TRACE_ROOT": str(tmp_path / "images")}  # fmt: skip
    return env, logs


def _torchrun(*args: object, env: dict, stdin: bytes = b"") -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "bitcli",
        *map(str, args),
    ]
    return subprocess.run(cmd, input=stdin, capture_output=True, env=env, timeout=300)


def _opened(logs: Path) -> dict[str, list[str]]:
    """rank -> the image files that process opened, in order."""
    by_rank: dict[str, list[str]] = collections.defaultdict(list)
    for log in logs.iterdir():
        for line in log.read_text().splitlines():
            rank, path = line.split("\t")
            by_rank[rank].append(path)
    return dict(by_rank)


def _assert_each_opened_once_by_one_process(logs: Path, images: list[Path]) -> None:
    opened = _opened(logs)
    assert sorted(opened) == ["0", "1"], opened  # both workers decoded a share ...
    every = [path for paths in opened.values() for path in paths]
    assert collections.Counter(every) == collections.Counter(str(p) for p in images)  # ... each image exactly once


@pytest.fixture()
def album(tmp_path: Path) -> list[Path]:
    """Eight decodable images of two sizes and one that is not an image, in a folder."""
    folder = tmp_path / "images"
    write_folder(folder, {"a": 5, "b": 3}, size=40)
    for i, path in enumerate(sorted(folder.rglob("*.png"))[:3]):  # another size: a batch of two stacks
        Image.open(path).resize((48 + i, 40)).save(path)
    (folder / "b" / "bad.png").write_bytes(b"not a png")
    return sorted(folder.rglob("*.png"))


def test_predict_two_processes_match_one(tiny_dir: Path, album: list[Path], traced, tmp_path: Path) -> None:
    env, logs = traced
    folder = tmp_path / "images"
    stdin = f"{album[1]}\n{album[-1]}\n".encode()  # read by the main process only, once
    args = ["predict", folder / "a", "-", folder / "missing.png", folder / "b", album[0], "--model", tiny_dir,
            "-f", "json", "-b", "2", "--workers", "1", "-r"]  # fmt: skip
    two = _torchrun(*args, env=env, stdin=stdin)
    assert two.returncode == 1, two.stderr.decode()[-3000:]
    sys_stdin = sys.stdin
    sys.stdin = io.TextIOWrapper(io.BytesIO(stdin))
    try:
        code, out, err = run_main(*args)
    finally:
        sys.stdin = sys_stdin
    assert code == 1
    assert two.stdout.decode() == out  # the same rows, in the same order, with the same scores
    assert "bad.png" in out and "missing.png: no such file or folder" in out
    assert err.count("bad.png: not an image") == 2  # listed on stdin and in b/: two rows, two lines
    for line in set(err.splitlines()):  # the failures are named by the main process alone
        assert two.stderr.decode().count(line) == err.count(line), line
    _assert_each_opened_once_by_one_process(logs, album)


def test_embed_two_processes_match_one(tiny_dir: Path, album: list[Path], traced, tmp_path: Path) -> None:
    env, logs = traced
    args = ["embed", tmp_path / "images", "-r", "--model", tiny_dir, "-b", "2", "--workers", "0"]
    two = _torchrun(*args, "-o", tmp_path / "two.safetensors", env=env)
    assert two.returncode == 1, two.stderr.decode()[-3000:]  # bad.png
    assert run_main(*args, "-o", tmp_path / "one.safetensors")[0] == 1
    assert (tmp_path / "two.safetensors").read_bytes() == (tmp_path / "one.safetensors").read_bytes()
    _assert_each_opened_once_by_one_process(logs, album)


def test_eval_two_processes_match_one(tiny_dir: Path, traced, tmp_path: Path) -> None:
    env, logs = traced
    data = tmp_path / "images"
    write_folder(data, {"apple": 5, "banana": 6, "cherry": 4}, size=24)  # 15 images: 4 batches, the last short
    args = ["eval", data, "--model", tiny_dir, "-f", "json", "-b", "4", "--workers", "1"]
    two = _torchrun(*args, env=env)
    assert two.returncode == 0, two.stderr.decode()[-3000:]
    code, out, err = run_main(*args)
    assert (code, err) == (0, "")
    assert two.stdout.decode() == out  # loss summed in the same order: the same float, to the last bit
    _assert_each_opened_once_by_one_process(logs, sorted(data.rglob("*.png")))


def test_eval_report_two_processes_match_one(tiny_dir: Path, tmp_path: Path) -> None:
    """--report under torchrun: every process evaluates its share, the main one alone writes the report (and
    draws the pictures), the same bytes as one process writes."""
    data = tmp_path / "images"
    write_folder(data, {"apple": 5, "banana": 6, "cherry": 4}, size=24)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    args = ["eval", data, "--model", tiny_dir, "-f", "json", "-b", "4", "--workers", "1", "--report"]
    two = _torchrun(*args, tmp_path / "two", env=env)
    assert two.returncode == 0, two.stderr.decode()[-3000:]
    code, out, err = run_main(*args, tmp_path / "one")
    assert code == 0, err
    assert two.stdout.decode() == out
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    assert len(files) > 4  # the page, two CSV files, the marker and pictures
    assert sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*") if p.is_file()) == files
    for name in files:
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
