"""`bit eval`: top-1/top-5, per-class accuracy and confusion matrix, as a table or one JSON object."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_main, write_folder

from bitcli.evaluate import OTHER, Accumulator


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data root with train/ and val/, the fine-tuned run folder)."""
    from bitcli.finetune import Options, run

    root = tmp_path_factory.mktemp("eval")
    write_folder(root / "data" / "train", {"red": 10, "green": 10, "blue": 10})
    write_folder(root / "data" / "val", {"red": 5, "green": 4, "blue": 3}, seed=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(Options(data=root / "data", model="tiny", output=root / "run", random_init=True, steps="12",
                    batch_size=8, resolution="16", lr=0.03, eval_every="0", workers=1))  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    return root / "data", root / "run"


@pytest.fixture
def cli():
    """Run the real `bit` entry point in this process: (exit code, stdout, stderr)."""
    return run_main


def test_eval_json_is_one_object_and_agrees_with_finetune(trained: tuple[Path, Path], cli) -> None:
    data, run = trained
    code, out, err = cli("eval", data / "val", "--model", run, "--format", "json", "--device", "cpu")
    assert code == 0, err
    result = json.loads(out)  # the whole of stdout is one JSON object
    assert set(result) >= {"top1", "top5", "per_class", "confusion", "labels"}
    assert result["labels"] == ["blue", "green", "red"]
    confusion = np.array(result["confusion"])
    assert confusion.shape == (3, 3) and confusion.sum() == result["count"] == 12
    assert confusion.sum(axis=1).tolist() == [3, 4, 5]  # rows are the true classes
    assert result["top1"] == pytest.approx(np.trace(confusion) / 12)
    for i, name in enumerate(result["labels"]):
        assert result["per_class"][name] == pytest.approx(confusion[i, i] / confusion[i].sum())
    assert result["top5"] == 1.0  # three classes: the top five always hold the answer
    summary = json.loads((run / "summary.json").read_text())  # finetune's final validation, same images
    assert result["top1"] == summary["val_top1"]
    assert result["loss"] == pytest.approx(summary["val_loss"], rel=1e-6)


def test_eval_table_and_split_layout(trained: tuple[Path, Path], cli) -> None:
    data, run = trained
    code, out, err = cli("eval", data, "--model", run)  # DATA/train + DATA/val: the val split is evaluated
    assert code == 0, err
    assert "evaluating the validation split" in err
    assert "images  12" in out and "top-1" in out and "top-5" in out
    assert "per-class top-1" in out and "confusion matrix (rows: true class" in out
    for name in ("red", "green", "blue"):
        assert name in out


def test_eval_subset_of_classes(trained: tuple[Path, Path], tmp_path: Path, cli) -> None:
    data, run = trained
    write_folder(tmp_path / "two", {"red": 3, "green": 2})
    code, out, err = cli("eval", tmp_path / "two", "--model", run, "--format", "json")
    assert code == 0, err
    result = json.loads(out)
    assert result["count"] == 5 and set(result["per_class"]) == {"red", "green"}
    assert result["labels"][:2] == ["green", "red"]  # in the model's label order
    if len(result["labels"]) == 3:  # some image was predicted as the absent class "blue"
        assert result["labels"][2] == OTHER and result["confusion"][2] == [0, 0, 0]


def test_eval_errors(trained: tuple[Path, Path], tmp_path: Path, cli) -> None:
    data, run = trained
    write_folder(tmp_path / "zoo", {"red": 1, "zebra": 1})
    code, _, err = cli("eval", tmp_path / "zoo", "--model", run)
    assert code == 1 and "class 'zebra' is not a label of" in err
    code, _, err = cli("eval", data / "val", "--model", run, "--format", "xml")
    assert code == 2 and "--format" in err and "'xml' is not one of 'table', 'json'" in err  # click checks the choice
    (tmp_path / "nosplit" / "train").mkdir(parents=True)
    code, _, err = cli("eval", tmp_path / "nosplit", "--model", run)
    assert code == 1 and "has train/ but no val/" in err


def test_accumulator_exact_counts() -> None:
    # Data classes (b, a) map to model labels 2 and 0 of a 4-class model.
    acc = Accumulator(["b", "a"], class_to_model=[2, 0], num_model_classes=4)
    logits = torch.tensor(
        [
            [0.0, 0.1, 0.9, 0.2],  # true b(2), predicted 2: right
            [0.9, 0.1, 0.0, 0.2],  # true b(2), predicted 0 (a): wrong; 2 is last of 4, still in the top 5
            [0.9, 0.0, 0.1, 0.2],  # true a(0), predicted 0: right
            [0.1, 0.9, 0.0, 0.2],  # true a(0), predicted 1: a label outside the data -> (other)
        ]
    )
    acc.update(logits[:2], np.array([0, 0]))
    acc.update(logits[2:], np.array([1, 1]))
    r = acc.result()
    assert (r.top1, r.top5, r.count) == (0.5, 1.0, 4)
    assert r.per_class == {"b": 0.5, "a": 0.5}
    assert r.labels == ["a", "b", OTHER]  # model order, then (other)
    assert r.confusion == [[1, 0, 1], [1, 1, 0], [0, 0, 0]]
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor([2, 2, 0, 0])).item()
    assert r.loss == pytest.approx(expected)


def test_table_prints_class_names_literally_on_one_line() -> None:
    """Class folder names are data: "[bold]cat[/bold]" is not markup, and a newline does not break a row."""
    from bitcli.evaluate import EvalResult, render_table

    names = ["[bold]cat[/bold]", "a\nb", "[red]"]
    result = EvalResult(top1=0.5, top5=1.0, loss=0.7, count=6, per_class=dict.fromkeys(names, 0.5), labels=names,
                        confusion=[[1, 1, 0], [0, 1, 1], [1, 0, 1]])  # fmt: skip
    text = render_table(result, color=False)
    for name in ("[bold]cat[/bold]", "a\\nb", "[red]"):  # per-class row, confusion row and column
        assert text.count(name) == 3, text
    rows = [line for line in text.splitlines() if line.startswith("│")]  # body rows (headers use ┃)
    assert len(rows) == 3 + 3  # per-class and confusion: one line per class
    assert len({len(line) for line in rows[3:]}) == 1  # the confusion matrix's rows line up


def test_ctrl_c_during_eval_says_how_far_it_got(trained: tuple[Path, Path], tmp_path: Path) -> None:
    """Ctrl-C in a terminal (progress bar and decode threads running): exit 130 and one line, no traceback."""
    import os
    import pty
    import re
    import signal
    import subprocess
    import sys
    import threading
    import time

    from PIL import Image

    _, run = trained
    big = tmp_path / "big.png"  # slow to decode: the pass takes many seconds, Ctrl-C comes after a few images
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (1200, 1200, 3), dtype=np.uint8)).save(big)
    for c in ("red", "green"):
        (tmp_path / "many" / c).mkdir(parents=True)
        for i in range(200):
            (tmp_path / "many" / c / f"{i:03d}.png").symlink_to(big)
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bitcli", "eval", str(tmp_path / "many"), "--model", str(run), "--batch-size", "2", "--workers", "1"],
        stdout=subprocess.PIPE, stderr=slave, env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "120", "TERM": "xterm"},
        # Ctrl-C as in a terminal (a shell may start background jobs with SIGINT ignored; children inherit that).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    os.close(slave)
    chunks: list[bytes] = []

    def read_terminal() -> None:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=read_terminal, daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while not re.search(rb"\b[1-9]\d*/400\b", b"".join(chunks)) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)  # until the bar shows images done
    proc.send_signal(signal.SIGINT)
    out = proc.stdout.read()
    code = proc.wait(timeout=60)
    reader.join(timeout=10)
    os.close(master)
    err = b"".join(chunks).decode("utf-8", "replace")
    assert code == 130, err
    done = re.findall(r"interrupted: (\d+) of 400 images done; accuracy is reported only for a whole pass", err)
    assert len(done) == 1 and 0 < int(done[0]) < 400, err
    assert "Traceback" not in err and "Error" not in err and out == b""
