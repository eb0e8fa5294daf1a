"""What a run shows: curves.png and confusion.png at every validation (the bytes that the run's files give),
validation.json, TensorBoard scalars equal to metrics.jsonl across a resume, and `bit report` on finished,
running and interrupted runs; runs without a validation set or without matplotlib. (tests/finetune/test_report.py
tests `bit report` itself.)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run_main, write_folder
from test_plots import decoded, expected_size

from bitcli import plots
from bitcli.finetune import rundir, tensorboard
from bitcli.finetune.rundir import MetricsLog, lock_output
from bitcli.metrics import OTHER

from .helpers import FAST, RUN_FILES, VALIDATION_FILES, read_metrics

PICTURES = {"curves.png", "confusion.png"}
SHORT = ["--steps", "8", "--batch-size", "8", "--eval-every", "4", "--save-every", "3", *FAST]


def test_pictures_at_every_validation_are_what_the_files_give(dataset: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "run"
    drawn: list[bytes] = []  # curves.png as each validation finds it
    real = rundir.write_json

    def watch_pictures(path: Path, data: dict) -> None:  # validation.json is written before the pictures
        if (out / "curves.png").exists():
            drawn.append((out / "curves.png").read_bytes())
        real(path, data)

    monkeypatch.setattr("bitcli.finetune.watch.write_json", watch_pictures)
    code, _, err = run_main("finetune", dataset, "--output", out, *SHORT)
    assert code == 0, err
    assert "  pictures    curves.png, confusion.png: redrawn at every validation\n" in err
    assert {p.name for p in out.iterdir()} == RUN_FILES | VALIDATION_FILES == RUN_FILES | PICTURES | {"validation.json"}
    # the second validation found the first one's picture: drawn from the 4 steps logged then
    assert drawn == [plots.curves_png(read_metrics(out)[:4], 8, "training curves: 4 of 8 steps")]

    validation = json.loads((out / "validation.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert validation["step"] == 7 and validation["labels"] == ["blue", "green", "red"]
    assert (validation["top1"], validation["per_class"]) == (summary["val_top1"], summary["val_per_class"])
    assert sum(map(sum, validation["confusion"])) == validation["count"] == 12
    assert decoded(out / "curves.png").shape == (800, 800, 3)
    assert decoded(out / "confusion.png").shape[1::-1] == expected_size(
        ["blue", "green", "red"], ["blue", "green", "red"], [4, 4, 4]
    )

    # the pictures are what the run's files give, byte for byte (at any time: drawing is deterministic)
    assert (out / "curves.png").read_bytes() == plots.curves_png(read_metrics(out), 8, "training curves: 8 of 8 steps")
    heading = "validation after 8 of 8 steps"
    assert (out / "confusion.png").read_bytes() == plots.evaluation_png(validation, heading, OTHER)

    before = {name: (out / name).read_bytes() for name in PICTURES}
    code, report, err = run_main("report", out)
    assert (code, err) == (0, "")
    assert {name: (out / name).read_bytes() for name in PICTURES} == before  # report lists them, never draws
    lines = report.splitlines()
    assert "status      finished" in lines
    assert f"validation  step 8: top-1 {summary['val_top1']:.4f}, top-5 n/a, loss {summary['val_loss']:.4f}" in report
    assert (
        f"  {out / 'model.safetensors'}  the fine-tuned model" in report
        and f"  {out / 'metrics.jsonl'}  one line per step" in report
    )
    assert lines[-1] == f"pictures    {out / 'curves.png'}, {out / 'confusion.png'}"


def test_tensorboard_scalars_equal_metrics_across_a_resume(dataset: Path, tmp_path: Path, monkeypatch) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    out = tmp_path / "run"
    args = ["finetune", dataset, "--output", out, "--steps", "12", "--batch-size", "8", "--eval-every", "4",
            "--save-every", "3", "--tensorboard", *FAST]  # fmt: skip
    write = MetricsLog.write

    def interrupted(self, record):  # Ctrl-C at step 7: its checkpoint is step 6's, step 6 is logged already
        if record["step"] == 7:
            raise KeyboardInterrupt
        write(self, record)

    monkeypatch.setattr(MetricsLog, "write", interrupted)
    code, _, err = run_main(*args)
    assert code == 130, err
    assert "TensorBoard events in tensorboard/" in err
    code, report, err = run_main("report", out)
    assert (code, err) == (0, "")
    assert "status      interrupted after 7 of 12 steps; --resume continues from the checkpoint of step 6\n" in report
    with lock_output(out):  # as while a run goes
        assert "status      running: 7 of 12 steps done\n" in run_main("report", out)[1]

    monkeypatch.setattr(MetricsLog, "write", write)
    code, _, err = run_main(*args, "--resume")
    assert code == 0, err

    files = sorted((out / "tensorboard").iterdir())
    assert len(files) == 2 and all(f.name.startswith(tensorboard.EVENT_PREFIX) for f in files)
    logged = [
        e.step
        for f in files
        for e in EventFileLoader(str(f)).Load()
        if any(v.tag == "train/loss" for v in e.summary.value)
    ]
    assert logged.count(6) == 2  # the interrupted run's step 6 is on disk: the resume's purge hides it

    board = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    board.Reload()
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == list(range(12))
    assert set(board.Tags()["scalars"]) == set(tensorboard.TAGS) - {"val/top5", "val/mAP"}  # 3 classes, single-label
    for tag, key in tensorboard.TAGS.items():
        expected = [(m["step"], float(np.float32(m[key]))) for m in metrics if m.get(key) is not None]
        events = board.Scalars(tag) if tag in board.Tags()["scalars"] else []
        assert [(e.step, e.value) for e in events] == expected, tag  # TensorBoard stores float32
    assert [e.step for e in board.Scalars("val/top1")] == [3, 7, 11]


def test_no_pictures_without_a_validation_set(tmp_path: Path) -> None:
    write_folder(tmp_path / "flat", {"red": 6, "green": 6})
    out = tmp_path / "run"
    code, _, err = run_main("finetune", tmp_path / "flat", "--output", out, "--steps", "2", "--batch-size", "4", *FAST)
    assert code == 0, err
    assert "  pictures    none: no validation set\n" in err
    assert {p.name for p in out.iterdir()} == RUN_FILES
    code, report, err = run_main("report", out)
    assert (code, err) == (0, "")
    assert report.splitlines()[-1] == "pictures    none: the run has no validation set"
    assert "status      finished" in report


def test_without_matplotlib_training_runs_and_report_says_what_to_install(
    dataset: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    out = tmp_path / "run"
    code, _, err = run_main("finetune", dataset, "--output", out, *SHORT)
    assert code == 0, err
    assert "  pictures    none: matplotlib is not installed (pip install 'bitcli[plots]')\n" in err
    assert {p.name for p in out.iterdir()} == RUN_FILES | {"validation.json"}  # the numbers for later pictures
    code, report, err = run_main("report", out)  # it draws nothing, so it needs no matplotlib: it says how
    assert (code, err) == (0, "")
    assert "status      finished\n" in report
    assert report.splitlines()[-1] == (
        "pictures    none: training draws them at every validation when matplotlib is installed "
        f"(pip install 'bitcli[plots]'); `bit eval DATA --model {out} --plot confusion.png` draws a confusion matrix"
    )
    assert {p.name for p in out.iterdir()} == RUN_FILES | {"validation.json"}


def test_tensorboard_missing_or_not_a_run(dataset: Path, tmp_path: Path, monkeypatch) -> None:
    code, out, err = run_main("report", tmp_path)
    assert (code, out) == (1, "")
    assert (
        err
        == f"Error: {tmp_path}: holds no bit finetune run (finetune_config.json); pass the --output folder of a run\n"
    )
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    code, _, err = run_main("finetune", dataset, "--output", tmp_path / "run", "--tensorboard", *SHORT)
    assert code == 1
    assert (
        err
        == "Error: --tensorboard needs the tensorboard package, which is not installed: pip install 'bitcli[tensorboard]'\n"
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("keep", [False, True])
def test_overwrite_removes_the_event_files_only(dataset: Path, tmp_path: Path, keep: bool) -> None:
    out = tmp_path / "run"
    assert run_main("finetune", dataset, "--output", out, "--tensorboard", *SHORT)[0] == 0
    if keep:
        (out / "tensorboard" / "notes.txt").write_text("mine")
    code, _, err = run_main("finetune", dataset, "--output", out, "--overwrite", *SHORT)
    assert code == 0, err
    if keep:  # a file bitcli did not write stays, and so does its folder
        assert [p.name for p in (out / "tensorboard").iterdir()] == ["notes.txt"]
    else:
        assert not (out / "tensorboard").exists()
