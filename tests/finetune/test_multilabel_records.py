"""A multi-label run's records speak multi-label (issue 24 review): every validation's metrics.jsonl record has
`val_mAP` (what `bit eval` reports as `mAP` for the same model and images, = scikit-learn's
average_precision_score on the same scores), `val_loss` and `val_macro_f1`, and no top-1, top-5 or balanced
accuracy; the progress lines, summary.json, TensorBoard, curves.png and `bit report` show mAP and the best mAP;
`--keep-best mAP` keeps the best model (with that validation's thresholds), and --keep-best refuses the metrics
of the other kind of data."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_main
from sklearn.metrics import average_precision_score

from bitcli import plots

from .helpers import FAST, read_metrics
from .test_multilabel import NAMES, label_sets, write_split_label_file

RUN = ["--steps", "4", "--batch-size", "8", "--eval-every", "2", "--lr", "0.05", "--keep-best", "mAP", "--tensorboard",
       *FAST]  # fmt: skip
PROGRESS = re.compile(r"^(\d+)/4 steps  lr \S+  loss \S+  val mAP (\S+)  macro F1 (\S+)$", flags=re.M)


@pytest.fixture(scope="module")
def ml_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str, list[str]]:
    """A tiny model fine-tuned for 4 steps on 32 multi-label rows, validated after steps 2 and 4 on 16, with
    --keep-best mAP and --tensorboard: (the label file, the run, its stderr, the validation images)."""
    root = tmp_path_factory.mktemp("mlrecords")
    train, val = label_sets(32, 0), label_sets(16, 1)
    files = write_split_label_file(root, train, val)
    run = root / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as conftest.one_thread, which a module's fixture runs outside of
    try:
        code, _, err = run_main("finetune", root / "labels.jsonl", "--output", run, *RUN)
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    return root / "labels.jsonl", run, err, [str(root / "images" / name) for name in files[len(train) :]]


def test_validation_records_are_bit_evals_multi_label_measures(ml_run) -> None:
    labels, run, err, val_images = ml_run
    records = read_metrics(run)
    validations = [m for m in records if "val_loss" in m]
    assert [m["step"] for m in validations] == [1, 3]
    for m in records:  # no single-label measure anywhere
        assert set(m) == {"step", "lr", "loss", "images_per_s"} | (
            {"val_mAP", "val_loss", "val_macro_f1"} if m in validations else set()
        )

    # the last validation's model is the final one, with that validation's thresholds: bit eval on the same
    # images gives its mAP, loss and macro F1, and scikit-learn gives the same mAP on bit predict's scores
    code, out, stderr = run_main("eval", f"{labels}:val", "--model", run, "--format", "json")
    assert code == 0, stderr
    evaluated, last = json.loads(out), validations[-1]
    assert last["val_mAP"] == pytest.approx(evaluated["mAP"], abs=1e-6)
    assert last["val_macro_f1"] == pytest.approx(evaluated["macro_f1"], abs=1e-12)
    assert last["val_loss"] == pytest.approx(evaluated["loss"], rel=1e-5)
    code, out, stderr = run_main("predict", *val_images, "--model", run, "--top-k", "3", "--format", "json")
    assert code == 0, stderr
    classes = json.loads((run / "config.json").read_text())["id2label"]
    scores = np.array([[next(p["score"] for p in row["predictions"] if p["index"] == c) for c in range(3)]
                       for row in json.loads(out)])  # fmt: skip
    truth = np.array([[int(classes[str(c)] in row) for c in range(3)] for row in label_sets(16, 1)])
    assert sorted(classes.values()) == sorted(NAMES) and 0 < truth.sum() < truth.size
    assert last["val_mAP"] == pytest.approx(average_precision_score(truth, scores, average="macro"), abs=1e-5)

    summary = json.loads((run / "summary.json").read_text())
    assert summary["val_mAP"] == last["val_mAP"] and summary["val_macro_f1"] == last["val_macro_f1"]
    assert summary["val_loss"] == last["val_loss"] and summary["val_ap"] == pytest.approx(evaluated["ap"], abs=1e-6)
    assert not {"val_top1", "val_top5", "val_balanced_accuracy", "val_per_class"} & set(summary)

    # the progress lines show mAP and macro F1, numbered k of "k/N steps" (the record's step + 1)
    shown = {int(k): (float(m), float(f1)) for k, m, f1 in PROGRESS.findall(err)}
    assert shown == {m["step"] + 1: (round(m["val_mAP"], 4), round(m["val_macro_f1"], 4)) for m in validations}
    assert "top-1" not in err and "top-5" not in err
    assert f"done: val mAP {last['val_mAP']:.4f}, macro F1 {last['val_macro_f1']:.4f} on 16 images\n" in err


def test_keep_best_map_and_the_report(ml_run) -> None:
    """best/ holds the validation of the highest mAP (the first of equals) with that validation's thresholds:
    bit eval gives it that mAP; `bit report` shows mAP and the best mAP at the progress line's step number."""
    labels, run, err, _ = ml_run
    validations = [m for m in read_metrics(run) if "val_loss" in m]
    chosen = max(validations, key=lambda m: (m["val_mAP"], -m["step"]))
    best = json.loads((run / "summary.json").read_text())["best"]
    assert (best["metric"], best["value"], best["step"]) == ("mAP", chosen["val_mAP"], chosen["step"])
    config = json.loads((run / "best" / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification" and len(config["bitcli_thresholds"]) == 3
    assert best["thresholds"] == config["bitcli_thresholds"]  # the thresholds best/ applies, recorded
    assert (f"\nbest/ (after step {best['step'] + 1}): mAP {best['value']:.4f}, with the thresholds chosen on that "
            "validation\n") in err  # the run's end says what best/ is, as a single-label run's does  # fmt: skip
    code, out, stderr = run_main("eval", f"{labels}:val", "--model", run / "best", "--format", "json")
    assert code == 0, stderr
    assert json.loads(out)["mAP"] == pytest.approx(best["value"], abs=1e-6)
    assert "  keep best   the validated model of the highest mAP also goes to best/" in err

    number = {round(m["val_mAP"], 4): m["step"] + 1 for m in validations}  # the progress line's k
    assert {float(m): int(k) for k, m, _ in PROGRESS.findall(err)} == number
    last = validations[-1]
    code, out, stderr = run_main("report", run)
    assert (code, stderr) == (0, "")
    assert (f"\nvalidation  step 4: mAP {last['val_mAP']:.4f}, loss {last['val_loss']:.4f}; best mAP "
            f"{best['value']:.4f} at step {number[round(best['value'], 4)]}\n") in out  # fmt: skip
    assert (f"\nbest        mAP {best['value']:.4f} after step {best['step'] + 1} (with the thresholds chosen on that "
            f"validation): {run / 'best'}\n") in out  # fmt: skip
    assert f"  {run / 'validation.json'}  the last validation, with each class's AP, threshold and F1\n" in out
    assert "top-1" not in out and "temperature" not in out and "calibrat" not in out


def test_tensorboard_and_curves_show_map(ml_run) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = ml_run[1]
    records = read_metrics(run)
    board = EventAccumulator(str(run / "tensorboard"))
    board.Reload()
    assert "val/top1" not in board.Tags()["scalars"] and "val/top5" not in board.Tags()["scalars"]
    assert [(e.step, e.value) for e in board.Scalars("val/mAP")] == [
        (m["step"], pytest.approx(m["val_mAP"], rel=1e-6)) for m in records if "val_mAP" in m
    ]
    # curves.png plots the validations' mAP (the records hold no top-1 to plot), redrawn from the files
    title = "training curves: 4 of 4 steps"
    assert (run / "curves.png").read_bytes() == plots.curves_png(records, 4, title)
    without = [{k: v for k, v in m.items() if k != "val_mAP"} for m in records]
    assert plots.curves_png(records, 4, title) != plots.curves_png(without, 4, title)  # the mAP is drawn


def test_keep_best_refuses_the_metrics_of_the_other_kind(ml_run, dataset: Path, tmp_path: Path) -> None:
    """top1 and balanced_accuracy count one label an image, mAP needs several: refused once the labels are read
    (exit 2, one line, nothing written)."""
    labels = ml_run[0]
    for metric in ("top1", "balanced_accuracy"):
        code, out, err = run_main("finetune", labels, "--output", tmp_path / "r", "--keep-best", metric, *FAST)
        assert (code, out) == (2, ""), err
        assert err == (f"Error: --keep-best {metric}: counts one label an image, and this data is multi-label "
                       "(several labels a row); use --keep-best mAP (or one of macro_f1, loss, mAP)\n")  # fmt: skip
    for typed in ("mAP", "map"):  # case-insensitive, as every choice
        code, out, err = run_main("finetune", dataset, "--output", tmp_path / "r", "--keep-best", typed, *FAST)
        assert (code, out) == (2, ""), err
        assert err == ("Error: --keep-best mAP: is for multi-label data, and this data has one label an image; use "
                       "--keep-best top1 (or one of top1, macro_f1, balanced_accuracy, loss)\n")  # fmt: skip
    assert not (tmp_path / "r").exists()
