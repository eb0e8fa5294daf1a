"""`bit predict`'s outputs: rows in argument order in every format, the format from the output's suffix, names
that look like markup or hold control characters. (Its inputs: test_inputs.py; the pipeline: test_pipeline.py.)"""

from __future__ import annotations

import csv
import io
import json
import shutil
import sys
from pathlib import Path

import pytest
from conftest import run_main, save_hf_model

from bitcli import ui

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
