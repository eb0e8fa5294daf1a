"""Calibration that cannot be fitted (issue 24 review): validation images of one class leave the temperature at
1 with a note (the NLL would fall to the bound 0.05), and a fit that ends at a bound of [0.05, 20] warns."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_main, write_folder

from bitcli.finetune import selection
from bitcli.finetune.selection import Logits, calibrate
from bitcli.scores import MAX_TEMPERATURE

from .helpers import FAST


def _logits(rows: list[list[float]], classes: list[int]) -> Logits:
    kept = Logits()
    kept(torch.tensor(rows)[:, None], np.asarray(classes))  # [b, views, classes]
    return kept


def test_one_class_validation_skips_the_fit() -> None:
    cal = calibrate(_logits([[3.0, 0.0, 1.0], [2.0, 1.0, 0.0]], [0, 0]), ("red", "green", "blue"))
    assert cal.temperature == 1.0 and cal.before == cal.after
    assert cal.describe() == (
        "calibration skipped: the validation images are all of class 'red', so no temperature can be fitted; "
        "the temperature stays 1"
    )
    assert cal.to_dict()["skipped"] == "the validation images are all of class 'red', so no temperature can be fitted"


def test_a_fit_at_a_bound_warns() -> None:
    cal = calibrate(_logits([[5.0, 0.0], [0.0, 5.0]], [0, 1]), ("a", "b"))  # confident and right: T falls to 0.05
    assert abs(cal.temperature - 0.05) < 1e-12
    line, warning = cal.describe().split("\n")
    assert line.startswith("calibrated: temperature 0.05 fitted on 2 validation images; ECE ")
    assert warning == (
        "warning: the temperature is at the bound 0.05 of [0.05, 20]: the validation set is too small or too easy "
        "to fit it; --no-calibrate leaves the scores at temperature 1"
    )
    inside = calibrate(_logits([[2.0, 0.0], [1.0, 0.0], [0.0, 1.0]], [0, 1, 1]), ("a", "b"))
    assert 0.05 < inside.temperature < 20 and "\n" not in inside.describe() and "skipped" not in inside.to_dict()


SKIPPED = "the validation images are all of class 'red', so no temperature can be fitted"


def test_finetune_with_a_one_class_validation_folder_keeps_temperature_one(dataset: Path, tmp_path: Path) -> None:
    """The final model and --keep-best's best/ (fitted on their own validations) both say that the fit was
    skipped, in the run's output, summary.json and `bit report`."""
    write_folder(tmp_path / "val", {"red": 3}, seed=2)
    run = tmp_path / "run"
    code, _, err = run_main("finetune", dataset / "train", "--val", tmp_path / "val", "--output", run, "--steps", "2",
                            "--batch-size", "8", "--eval-every", "1", "--keep-best", "loss", *FAST)  # fmt: skip
    assert code == 0, err
    summary = json.loads((run / "summary.json").read_text())
    step = summary["best"]["step"]
    assert f"calibration skipped: {SKIPPED}; the temperature stays 1\n" in err
    assert f"best/ (after step {step + 1}): calibration skipped: {SKIPPED}; the temperature stays 1\n" in err
    assert summary["calibration"]["temperature"] == summary["best"]["temperature"] == 1.0
    assert summary["calibration"]["skipped"] == summary["best"]["calibration"]["skipped"] == SKIPPED
    for model in (run, run / "best"):
        assert json.loads((model / "config.json").read_text()).get("bitcli_temperature", 1.0) == 1.0
    code, out, err = run_main("report", run)
    assert code == 0, err
    # no temperature is claimed where none was fitted (it read "calibrated  temperature 1.0000 ...")
    assert f"\ncalibration none: {SKIPPED}; scores at temperature 1\n" in out
    assert "calibrated  " not in out and "temperature 1.0000" not in out
    assert f"best        loss {summary['best']['value']:.4f} after step {step + 1} (not calibrated: {SKIPPED}): " \
           f"{run / 'best'}\n" in out  # fmt: skip


def test_a_best_model_fitted_at_a_bound_warns_as_the_final_one(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fit that ends at a bound (here: made to) warns for best/ as it does for the final model, and
    summary.json and `bit report` record it for both."""
    monkeypatch.setattr(selection, "fit_temperature", lambda logits, targets: MAX_TEMPERATURE)
    run = tmp_path / "run"
    code, _, err = run_main("finetune", dataset / "train", "--val", dataset / "val", "--output", run, "--steps", "2",
                            "--batch-size", "8", "--eval-every", "1", "--keep-best", "top1", *FAST)  # fmt: skip
    assert code == 0, err
    summary = json.loads((run / "summary.json").read_text())
    best, step = summary["best"], summary["best"]["step"]
    warning = (
        "warning: the temperature is at the bound 20 of [0.05, 20]: the validation set is too small or too easy to "
        "fit it; --no-calibrate leaves the scores at temperature 1\n"
    )
    assert err.count(warning) == 2
    assert f"best/ (after step {step + 1}): calibrated: temperature 20 fitted on 12 validation images; ECE " in err
    assert best["temperature"] == best["calibration"]["temperature"] == MAX_TEMPERATURE
    assert best["calibration"]["at_bound"] == summary["calibration"]["at_bound"] == MAX_TEMPERATURE
    assert json.loads((run / "best" / "config.json").read_text())["bitcli_temperature"] == MAX_TEMPERATURE
    code, out, err = run_main("report", run)
    assert code == 0, err
    note = "at the bound 20.00 of its range: the validation set is too small or too easy to fit it"
    assert f" ({note})\n" in out
    assert f"after step {step + 1} (temperature 20.0000, {note}): {run / 'best'}\n" in out
