"""What `bit predict` and `bit embed` take as inputs (bitcli.inputs): files, folders and globs expanded in argument
order, one row per occurrence, `-` for paths on stdin (as the file system spells them), folders that cannot be
listed, hidden files."""

from __future__ import annotations

import io
import json
import os
import shutil
import sys

from conftest import run_main

from bitcli import inputs
from bitcli.errors import BitError


def _stdin(monkeypatch, data: bytes) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))


def test_one_row_per_occurrence(album, tiny_dir):
    (album / "folder").mkdir()
    shutil.copy(album / "first.png", album / "folder" / "b.png")
    shutil.copy(album / "first.png", album / "folder" / "a.png")
    args = ["first.png", "first.png", "./first.png", "folder", "folder/a.png", "f*.png", "first.png"]
    code, out, err = run_main("predict", *args, "--model", tiny_dir, "-f", "json")
    assert code == 0, err
    rows = json.loads(out)
    assert [r["path"] for r in rows] == [
        "first.png", "first.png", "./first.png", "folder/a.png", "folder/b.png", "folder/a.png", "first.png", "first.png",
    ]  # fmt: skip
    assert all(r["predictions"] == rows[0]["predictions"] for r in rows)  # the same pixels everywhere


def test_stdin_lists_paths_in_place(album, tiny_dir, monkeypatch):
    (album / "folder").mkdir()
    shutil.copy(album / "last.jpg", album / "folder" / "x.jpg")
    odd = os.fsdecode(b"caf\xe9.png")  # not UTF-8: the bytes from stdin name the file as the file system does
    shutil.copy(album / "first.png", album / odd)
    _stdin(monkeypatch, b"last.jpg\n\n  \nfolder\r\nnope.png\ncaf\xe9.png\n*.jpg")  # no final newline
    code, out, err = run_main("predict", "first.png", "-", "first.png", "--model", tiny_dir, "-f", "json")
    assert code == 1, err
    rows = json.loads(out)
    assert [r["path"] for r in rows] == [
        "first.png", "last.jpg", "folder/x.jpg", "nope.png", "caf\ufffd.png", "last.jpg", "first.png",
    ]  # fmt: skip
    assert rows[3] == {"path": "nope.png", "error": "nope.png: no such file or folder"}
    assert rows[4]["predictions"] == rows[0]["predictions"]


def test_an_existing_file_wins_over_the_pattern_its_name_spells(album, tiny_dir, monkeypatch):
    """`[1].png` names that file when it exists (as an argument and as a line of stdin); a glob otherwise."""
    shutil.copy(album / "first.png", album / "[1].png")  # as a pattern: 1.png, which also exists
    shutil.copy(album / "last.jpg", album / "1.png")
    shutil.copy(album / "last.jpg", album / "2.png")
    _stdin(monkeypatch, b"[1].png\n[2].png\n")
    code, out, err = run_main("predict", "[1].png", "-", "--model", tiny_dir, "-f", "json")
    assert (code, err) == (0, "")
    rows = json.loads(out)
    assert [r["path"] for r in rows] == ["[1].png", "[1].png", "2.png"]


def test_stdin_misuse(album, tiny_dir, monkeypatch):
    _stdin(monkeypatch, b"\n\n")
    code, out, err = run_main("predict", "-", "first.png", "--model", tiny_dir, "-f", "jsonl")
    assert code == 1
    assert json.loads(out.splitlines()[0]) == {"path": "-", "error": "-: stdin lists no paths"}

    _stdin(monkeypatch, b"first.png\n")
    code, out, err = run_main("predict", "-", "-", "--model", tiny_dir)
    assert (code, out) == (2, "")
    assert err == "Error: `-` (read paths from stdin) may be given only once\n"


def test_a_folder_that_cannot_be_listed_is_one_error_row(album, tiny_dir, monkeypatch):
    (album / "locked").mkdir()
    real = inputs.list_images

    def list_images(folder, recursive):
        if folder.name == "locked":
            raise BitError(f"{folder}: cannot list folder (Permission denied)")
        return real(folder, recursive)

    monkeypatch.setattr(inputs, "list_images", list_images)
    code, out, _err = run_main("predict", "first.png", "locked", "last.jpg", "--model", tiny_dir, "-f", "jsonl")
    assert code == 1
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["path"] for r in rows] == ["first.png", "locked", "last.jpg"]
    assert rows[1] == {"path": "locked", "error": "locked: cannot list folder (Permission denied)"}
    assert "predictions" in rows[0] and "predictions" in rows[2]


def test_hidden_files_and_folders_are_not_listed(album, tiny_dir):
    """A folder expands like a data set does (bitcli.images.list_images): names starting with "." are skipped,
    so version-control folders and macOS `._*` files are not classified. A hidden file named outright is."""
    (album / "shots" / ".git").mkdir(parents=True)
    shutil.copy(album / "first.png", album / "shots" / "a.png")
    shutil.copy(album / "first.png", album / "shots" / "._a.png")
    shutil.copy(album / "first.png", album / "shots" / ".git" / "b.png")
    code, out, err = run_main("predict", "shots", "-r", "shots/._a.png", "--model", tiny_dir, "-f", "jsonl")
    assert (code, err) == (0, "")
    assert [json.loads(line)["path"] for line in out.splitlines()] == ["shots/a.png", "shots/._a.png"]


def test_paths_piped_into_a_real_process(album, tiny_dir):
    """`find ... | bit predict -` in a real process: stdin is the pipe's bytes."""
    import subprocess

    result = subprocess.run(
        [sys.executable, "-m", "bitcli", "predict", "-", "--model", str(tiny_dir), "-f", "jsonl"],
        input=b"last.jpg\nfirst.png\n", capture_output=True, cwd=album, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["path"] for line in result.stdout.splitlines()] == ["last.jpg", "first.png"]
