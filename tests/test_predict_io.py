"""`bit predict`'s inputs and outputs: argument order, repeats, stdin lists, the output format, names that look
like markup or hold control characters."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from conftest import run_main, save_hf_model

from bitcli import predict, ui
from bitcli.engine import Engine
from bitcli.errors import BitError

MARKUP_LABELS = ["[bold]cat[/bold]", "line\nbreak", "[red]dog", "plain"]


@pytest.fixture(scope="module")
def markup_model(tmp_path_factory) -> Path:
    """A tiny model whose label names are rich markup and a newline."""
    from conftest import BIT50_PREPROCESSOR

    return save_hf_model(
        tmp_path_factory.mktemp("markup") / "model",
        {**BIT50_PREPROCESSOR, "size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}},
        embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1], num_groups=8,
        id2label=dict(enumerate(MARKUP_LABELS)), label2id={n: i for i, n in enumerate(MARKUP_LABELS)},
    )  # fmt: skip


@pytest.fixture()
def album(tmp_path, photos, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "250")  # the table is as wide as the terminal: keep names unfolded
    shutil.copy(photos["chelsea.png"], tmp_path / "first.png")
    shutil.copy(photos["rocket.jpg"], tmp_path / "last.jpg")
    return tmp_path


def _stdin(monkeypatch, data: bytes) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv", "table"])
@pytest.mark.parametrize("to_file", [False, True])
def test_failures_keep_argument_order(album, tiny_dir, fmt, to_file):
    args = ["predict", "first.png", "missing.jpg", "last.jpg", "--model", tiny_dir, "-f", fmt]
    if to_file:
        args += ["-o", "out.txt"]
    code, out, err = run_main(*args)
    assert code == 1, err
    text = Path("out.txt").read_text() if to_file else out
    if fmt == "json":
        paths = [r["path"] for r in json.loads(text)]
    elif fmt == "jsonl":
        paths = [json.loads(line)["path"] for line in text.splitlines()]
    elif fmt == "csv":
        paths = list(dict.fromkeys(r["path"] for r in csv.DictReader(io.StringIO(text))))
    else:
        paths = sorted(["first.png", "missing.jpg", "last.jpg"], key=text.index)
    assert paths == ["first.png", "missing.jpg", "last.jpg"]
    assert err == "error: missing.jpg: no such file or folder\n"


def test_streamed_jsonl_is_an_in_order_prefix_when_interrupted(album, tiny_dir, monkeypatch):
    """jsonl on stdout streams every row as soon as the rows before it are done; Ctrl-C keeps that prefix."""
    calls = []
    real = Engine.logits

    def logits(self, batch):
        calls.append(len(batch))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, batch)

    monkeypatch.setattr(Engine, "logits", logits)
    args = ["first.png", "missing.jpg", "last.jpg", "first.png"]
    code, out, err = run_main("predict", *args, "--model", tiny_dir, "-f", "jsonl", "-b", "1", "--workers", "1")
    assert code == 130
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["path"] for r in rows] == ["first.png", "missing.jpg"]
    assert "predictions" in rows[0] and rows[1]["error"] == "missing.jpg: no such file or folder"
    assert err == (
        "error: missing.jpg: no such file or folder\n"
        "interrupted: 2 of 4 images done; the results above are complete for those\n"
    )
    assert calls == [1, 1]


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


def test_repeated_path_is_decoded_once(album, tiny_dir, monkeypatch):
    decoded = []
    real = predict.decode
    monkeypatch.setattr(predict, "decode", lambda path, pre: decoded.append(path) or real(path, pre))
    code, out, err = run_main("predict", "first.png", "last.jpg", "first.png", "--model", tiny_dir, "-f", "json")
    assert code == 0, err
    assert [r["path"] for r in json.loads(out)] == ["first.png", "last.jpg", "first.png"]
    assert sorted(decoded) == ["first.png", "last.jpg"]


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


def test_stdin_misuse(album, tiny_dir, monkeypatch):
    _stdin(monkeypatch, b"\n\n")
    code, out, err = run_main("predict", "-", "first.png", "--model", tiny_dir, "-f", "jsonl")
    assert code == 1
    assert json.loads(out.splitlines()[0]) == {"path": "-", "error": "-: stdin lists no paths"}

    _stdin(monkeypatch, b"first.png\n")
    code, out, err = run_main("predict", "-", "-", "--model", tiny_dir)
    assert (code, out) == (2, "")
    assert err == "Error: `-` (read paths from stdin) may be given only once\n"


def test_output_suffix_picks_the_format(album, tiny_dir):
    parsers = {
        "p.json": lambda t: [r["path"] for r in json.loads(t)],
        "p.JSONL": lambda t: [json.loads(line)["path"] for line in t.splitlines()],
        "p.csv": lambda t: [r["path"] for r in csv.DictReader(io.StringIO(t))][::5],  # top-5: five rows
        "p.txt": lambda t: ["first.png"] if t.startswith("┏") and "│ first.png " in t else t,  # any other: table
    }
    for name, parse in parsers.items():
        code, out, err = run_main("predict", "first.png", "--model", tiny_dir, "-o", name)
        assert (code, out, err) == (0, "", "")
        assert parse(Path(name).read_text()) == ["first.png"], name


@pytest.mark.parametrize(
    "fmt, name", [("csv", "p.json"), ("table", "p.csv"), ("json", "p.jsonl"), ("jsonl", "out.JSON")]
)
def test_format_contradicting_the_suffix_is_refused_before_loading(album, fmt, name):
    code, out, err = run_main("predict", "first.png", "--model", "no/such-model", "-f", fmt, "-o", name)
    assert (code, out) == (2, "")
    assert err.startswith(f"Error: --format {fmt} contradicts --output {name} ") and err.count("\n") == 1
    assert not Path(name).exists()


def test_format_matching_the_suffix_in_any_case(album, tiny_dir):
    code, out, err = run_main(
        "predict", "first.png", "--model", tiny_dir, "-f", "JSON", "-o", "p.Json", "--precision", "FP32"
    )
    assert (code, out, err) == (0, "", "")
    assert json.loads(Path("p.Json").read_text())[0]["path"] == "first.png"


def test_names_and_labels_are_printed_literally(album, markup_model):
    shutil.copy(album / "first.png", album / "photo [red]1.jpg")
    shutil.copy(album / "first.png", album / "two\nlines.png")
    args = ["photo [red]1.jpg", "two\nlines.png", "[bold]gone.jpg"]
    code, out, err = run_main("predict", *args, "--model", markup_model, "-k", "4")
    assert code == 1
    assert "│ photo [red]1.jpg " in out and "│ two\\nlines.png " in out
    assert "error: [bold]gone.jpg: no files match this pattern" in out
    for i, label in enumerate(MARKUP_LABELS):
        assert f" {label.replace(chr(10), chr(92) + 'n')} ({i}) " in out
    # 3 image rows of 4, 4 and 1 line, each row framed: no data line breaks a row apart
    lines = out.splitlines()
    assert len(lines) == 1 + 1 + 1 + 4 + 1 + 4 + 1 + 1 + 1, out
    assert all(line[0] in "┏┃┡│├└" and line[-1] in "┓┃┩│┤┘" for line in lines)
    assert err == "error: [bold]gone.jpg: no files match this pattern\n"

    code, out, err = run_main("predict", *args, "--model", markup_model, "-k", "4", "-f", "json")
    rows = json.loads(out)
    assert [r["path"] for r in rows] == args  # machine formats keep the exact strings
    assert sorted(p["label"] for p in rows[0]["predictions"]) == sorted(MARKUP_LABELS)


def test_control_characters_in_errors_stay_on_one_stderr_line(album, tiny_dir):
    code, out, err = run_main("predict", "no\nsuch.jpg", "--model", tiny_dir, "-f", "json")
    assert code == 1
    assert json.loads(out) == [{"path": "no\nsuch.jpg", "error": "no\nsuch.jpg: no such file or folder"}]
    assert err == "error: no\\nsuch.jpg: no such file or folder\n"


def test_visible_escapes_only_what_breaks_a_line():
    assert (
        ui.visible("a\nb\tc\r\x1b[31m\u2028\u202e ok [x] é 猫") == "a\\nb\\tc\\r\\u001b[31m\\u2028\\u202e ok [x] é 猫"
    )


def test_an_exception_without_a_message_still_names_its_type(album, tiny_dir, monkeypatch):
    """A decoder failure that is not bitcli's own becomes that image's error row, never an empty text."""
    real = predict.decode

    def decode(path, pre):
        if path == "last.jpg":
            raise RuntimeError()  # str() is ""
        if path == "first.png":
            raise BitError("")
        return real(path, pre)

    monkeypatch.setattr(predict, "decode", decode)
    shutil.copy(album / "first.png", album / "ok.png")
    code, out, err = run_main("predict", "first.png", "last.jpg", "ok.png", "--model", tiny_dir, "-f", "json")
    assert code == 1
    rows = json.loads(out)
    assert rows[:2] == [
        {"path": "first.png", "error": "first.png: BitError"},
        {"path": "last.jpg", "error": "last.jpg: cannot decode image (RuntimeError)"},
    ]
    assert len(rows[2]["predictions"]) == 5
    assert err == "error: first.png: BitError\nerror: last.jpg: cannot decode image (RuntimeError)\n"
    # a multi-line message stays one line
    assert predict.failure("a.png", ValueError("bad\n  header")) == "a.png: cannot decode image (bad header)"


def test_a_folder_that_cannot_be_listed_is_one_error_row(album, tiny_dir, monkeypatch):
    (album / "locked").mkdir()
    real = predict.list_images

    def list_images(folder, recursive):
        if folder.name == "locked":
            raise BitError(f"{folder}: cannot list folder (Permission denied)")
        return real(folder, recursive)

    monkeypatch.setattr(predict, "list_images", list_images)
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


@pytest.fixture(scope="module")
def uncropped_model(tmp_path_factory) -> Path:
    """A tiny model whose preprocessing keeps the aspect ratio (shortest edge 32, no crop)."""
    from conftest import BIT50_PREPROCESSOR, TINY_LABELS

    return save_hf_model(
        tmp_path_factory.mktemp("uncropped") / "model",
        {**BIT50_PREPROCESSOR, "size": {"shortest_edge": 32}, "do_center_crop": False},
        embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1], num_groups=8,
        id2label=dict(enumerate(TINY_LABELS)), label2id={n: i for i, n in enumerate(TINY_LABELS)},
    )  # fmt: skip


def test_uncropped_checkpoint_batches_equal_sizes(album, uncropped_model, monkeypatch):
    """Images of different shapes cannot stack: each batch holds one size, and batching changes no result."""
    from PIL import Image

    photo = Image.open(album / "first.png").convert("RGB")
    names = ["wide1.png", "tall1.png", "wide2.png", "tall2.png", "wide3.png"]
    for i, name in enumerate(names):
        size = (64, 40) if name.startswith("wide") else (40, 64)  # 51x32 and 32x51 after resizing
        photo.rotate(10 * i).resize(size).save(album / name)
    shapes = []
    real = Engine.logits
    monkeypatch.setattr(Engine, "logits", lambda self, batch: shapes.append(batch.shape) or real(self, batch))
    code, out, err = run_main("predict", *names, "--model", uncropped_model, "-f", "json", "-b", "4", "-k", "10")
    assert (code, err) == (0, "")
    assert shapes == [(2, 32, 51, 3), (2, 51, 32, 3), (1, 32, 51, 3)]  # chunks of 4, one batch per size
    together = json.loads(out)
    assert [r["path"] for r in together] == names
    code, out, err = run_main("predict", *names, "--model", uncropped_model, "-f", "json", "-b", "1", "-k", "10")
    for alone, batched in zip(json.loads(out), together):
        assert [p["index"] for p in alone["predictions"]] == [p["index"] for p in batched["predictions"]]
        assert [p["score"] for p in alone["predictions"]] == pytest.approx(
            [p["score"] for p in batched["predictions"]], abs=1e-5
        )


def test_progress_description_is_literal(monkeypatch):
    """A description may name data (a folder); it is shown as spelled, never as markup."""
    from rich.console import Console

    from bitcli import ui

    buf = io.StringIO()
    monkeypatch.setattr(
        ui, "stderr_console", lambda: Console(file=buf, force_terminal=True, width=100, color_system=None)
    )
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    with ui.progress_bar("album [red]2024[/red]", total=3, unit="img") as advance:
        advance(1)
    assert "album [red]2024[/red]" in buf.getvalue()


def test_paths_piped_into_a_real_process(album, tiny_dir):
    """`find ... | bit predict -` in a real process: stdin is the pipe's bytes."""
    import subprocess

    result = subprocess.run(
        [sys.executable, "-m", "bitcli", "predict", "-", "--model", str(tiny_dir), "-f", "jsonl"],
        input=b"last.jpg\nfirst.png\n", capture_output=True, cwd=album, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["path"] for line in result.stdout.splitlines()] == ["last.jpg", "first.png"]
