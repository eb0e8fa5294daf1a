"""Calibration that cannot be fitted (issue 24 review): validation images of one class leave the temperature at
1 with a note (the NLL would fall to the bound 0.05), and a fit that ends at a bound of [0.05, 20] warns."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from conftest import run_main, write_folder

from bitcli.finetune.selection import Logits, calibrate

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


def test_finetune_with_a_one_class_validation_folder_keeps_temperature_one(dataset: Path, tmp_path: Path) -> None:
    write_folder(tmp_path / "val", {"red": 3}, seed=2)
    run = tmp_path / "run"
    code, _, err = run_main("finetune", dataset / "train", "--val", tmp_path / "val", "--output", run, "--steps", "2",
                            "--batch-size", "8", "--eval-every", "0", *FAST)  # fmt: skip
    assert code == 0, err
    assert (
        "calibration skipped: the validation images are all of class 'red', so no temperature can be fitted; "
        "the temperature stays 1\n"
    ) in err
    assert json.loads((run / "summary.json").read_text())["calibration"]["temperature"] == 1.0
    assert json.loads((run / "config.json").read_text()).get("bitcli_temperature", 1.0) == 1.0
