"""`bit eval`'s numbers against independent oracles: logits from transformers (its own PIL processor and model on
the same files), metrics from scikit-learn, loss from torch's cross_entropy."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from conftest import BIT50_PREPROCESSOR, run_main, save_hf_model, write_folder
from PIL import Image
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)

from bitcli.metrics import NO_TOP5, OTHER, Accumulator, EvalResult, render_table

LABELS = ["tabby, tabby cat", "goldfish, Carassius auratus", "hen", "ostrich", "robin", "jay", "kite", "toucan"]
# Class folders: a first name, an index and two full labels; in the model's order: tabby(0), 1(1), hen(2), kite(6)
FOLDERS = {"tabby": 0, "1": 1, "hen": 2, "kite": 6}
AXIS = ["tabby", "1", "hen", "kite"]
EVAL_KEYS = ["top1", "top5", "loss", "nll", "ece", "count", "per_class", "precision", "recall", "f1", "macro_f1",
             "balanced_accuracy", "confusion", "labels", "other", "reliability", "temperature", "tta"]  # fmt: skip


@pytest.fixture(scope="module", params=["crop", "no-crop"])
def model8(request, tmp_path_factory) -> Path:
    """An 8-class tiny BiT with spread logits (no near-ties); `no-crop` keeps each image's aspect ratio (64 px
    shortest edge), so that one batch holds images of several sizes."""
    pre = {**BIT50_PREPROCESSOR, "size": {"shortest_edge": 64}, "crop_size": {"height": 64, "width": 64}}
    if request.param == "no-crop":
        pre["do_center_crop"] = False
    return save_hf_model(
        tmp_path_factory.mktemp("model8") / request.param, pre, head_scale=20.0, embedding_size=16,
        hidden_sizes=[32, 64], depths=[1, 1], num_groups=8,
        id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)},
    )  # fmt: skip


@pytest.fixture(scope="module")
def folder8(tmp_path_factory, photos) -> tuple[Path, list[Path], np.ndarray]:
    """(folder, image paths, model index of each image's class): real photos of several sizes and aspect
    ratios, and small synthetic images, in four class folders."""
    root = tmp_path_factory.mktemp("eval8") / "data"
    write_folder(root, dict.fromkeys(FOLDERS, 3), seed=4)
    for i, photo in enumerate(photos.values()):
        shutil.copy(photo, root / list(FOLDERS)[i % 4] / photo.name)
    paths = sorted(p for p in root.rglob("*") if p.is_file())
    return root, paths, np.array([FOLDERS[p.parent.name] for p in paths])


def oracle_logits(model_dir: Path, paths: list[Path]) -> torch.Tensor:
    """transformers' model on transformers' PIL preprocessing of each file, one image at a time (any size)."""
    model = transformers.BitForImageClassification.from_pretrained(model_dir).eval()
    processor = transformers.BitImageProcessorPil.from_pretrained(model_dir)
    with torch.no_grad():
        return torch.cat([model(processor(Image.open(p), return_tensors="pt")["pixel_values"]).logits for p in paths])


def numpy_ece(probs: np.ndarray, y_true: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error, written out: 15 equal-width bins (lower, upper] of the top-1 score, the sum
    over bins of |accuracy - mean top-1 score| weighted by the bin's share of the images."""
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == y_true
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lower, upper in itertools.pairwise(edges):
        inside = (confidence > lower) & (confidence <= upper)
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return ece


def oracle_confusion(y_true: np.ndarray, y_pred: np.ndarray, axis: list[int]) -> np.ndarray:
    """scikit-learn's confusion matrix over the evaluated classes, predictions of any other class in one last
    (other) column (its row is all zero: no image belongs to it)."""
    other = -1
    pred = np.where(np.isin(y_pred, axis), y_pred, other)
    return confusion_matrix(y_true, pred, labels=[*axis, other])


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")  # the (other) predictions
def test_eval_metrics_equal_scikit_learn_on_transformers_logits(model8: Path, folder8) -> None:
    root, paths, y_true = folder8
    logits = oracle_logits(model8, paths)
    ranked = logits.sort(dim=1, descending=True).values
    # The oracle's top-1 and top-5 are clear-cut (no near-ties): rounding differences cannot change them
    assert (ranked[:, 0] - ranked[:, 1]).min() > 1e-3 and (ranked[:, 4] - ranked[:, 5]).min() > 1e-3
    y_pred = logits.argmax(1).numpy()
    expected = oracle_confusion(y_true, y_pred, sorted(FOLDERS.values()))
    assert expected[:, -1].any()  # some images are predicted as a class outside the folder: (other) is exercised

    code, out, err = run_main(
        "eval", root, "--model", model8, "--format", "json", "--device", "cpu", "--batch-size", "5", "--workers", "2"
    )
    assert (code, err) == (0, "")
    result = json.loads(out)
    assert list(result) == EVAL_KEYS
    assert result["count"] == len(paths) == 20
    assert result["labels"] == [*AXIS, OTHER]
    assert result["other"] == OTHER  # the label of the catch-all column
    assert result["confusion"] == expected.tolist()
    assert result["top1"] == accuracy_score(y_true, y_pred)
    assert result["top5"] == top_k_accuracy_score(y_true, logits.numpy(), k=5, labels=np.arange(len(LABELS)))
    assert result["loss"] == pytest.approx(
        torch.nn.functional.cross_entropy(logits, torch.from_numpy(y_true)).item(), rel=1e-4
    )
    assert result["per_class"] == {name: expected[i, i] / expected[i].sum() for i, name in enumerate(AXIS)}  # recall
    # scikit-learn's precision, recall and F1 over the evaluated classes: a prediction outside them (the (other)
    # column) is a false negative of the true class and a false positive of none of them
    evaluated = [FOLDERS[name] for name in result["per_class"]]
    precision, recall, f1, _ = precision_recall_fscore_support(y_true, y_pred, labels=evaluated, zero_division=0)
    names = list(result["per_class"])
    assert result["precision"] == dict(zip(names, precision.tolist()))
    assert result["recall"] == dict(zip(names, recall.tolist())) == result["per_class"]
    assert result["f1"] == dict(zip(names, f1.tolist()))
    assert result["macro_f1"] == f1_score(y_true, y_pred, labels=evaluated, average="macro", zero_division=0)
    assert result["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_true, y_pred), abs=1e-12)
    # NLL and ECE over the model's whole softmax: a prediction outside the evaluated classes is wrong
    probs = torch.softmax(logits.double(), dim=1).numpy()
    assert result["nll"] == pytest.approx(log_loss(y_true, probs, labels=np.arange(len(LABELS))), rel=1e-4)
    assert result["nll"] == pytest.approx(result["loss"], rel=1e-6)  # temperature 1, no test-time augmentation
    assert result["ece"] == pytest.approx(numpy_ece(probs, y_true), abs=1e-5)
    assert (result["temperature"], result["tta"]) == (1.0, None)

    code, table, err = run_main("eval", root, "--model", model8, "--device", "cpu")
    assert (code, err) == (0, "")
    assert table.splitlines()[:5] == [
        f"images  {len(paths)}",
        f"top-1   {result['top1']:.4f}",
        f"top-5   {result['top5']:.4f}",
        f"loss    {result['loss']:.4f}",
        f"macro F1 {result['macro_f1']:.4f}",
    ]
    for name in AXIS:  # the per-class row: top-1 (recall), images, precision, F1
        cells = [
            c.strip()
            for c in next(line for line in table.splitlines() if line.startswith(f"│ {name} ")).split("│")[1:-1]
        ]
        count = int(expected[AXIS.index(name)].sum())
        assert cells == [
            name,
            f"{result['recall'][name]:.4f}",
            str(count),
            f"{result['precision'][name]:.4f}",
            f"{result['f1'][name]:.4f}",
        ]


def test_accumulator_exact_counts() -> None:
    # Data classes (b, a) map to model labels 2 and 0 of a 4-class model.
    acc = Accumulator(["b", "a"], class_to_model=[2, 0], num_model_classes=4)
    logits = torch.tensor(
        [
            [0.0, 0.1, 0.9, 0.2],  # true b(2), predicted 2: right
            [0.9, 0.1, 0.0, 0.2],  # true b(2), predicted 0 (a): wrong
            [0.9, 0.0, 0.1, 0.2],  # true a(0), predicted 0: right
            [0.1, 0.9, 0.0, 0.2],  # true a(0), predicted 1: a label outside the data -> (other)
        ]
    )
    acc.update(logits[:2], np.array([0, 0]))
    acc.update(logits[2:], np.array([1, 1]))
    r = acc.result()
    assert (r.top1, r.top5, r.count) == (0.5, None, 4)  # 4 classes: top-5 would hold every answer
    assert r.per_class == {"b": 0.5, "a": 0.5}
    assert r.labels == ["a", "b", OTHER]  # model order, then (other)
    assert r.confusion == [[1, 0, 1], [1, 1, 0], [0, 0, 0]]
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor([2, 2, 0, 0])).item()
    assert r.loss == pytest.approx(expected)


def test_table_shows_the_other_column_without_an_other_row() -> None:
    """Predictions outside the evaluated classes get an (other) column; no image is of class (other), so the
    table has no (other) row (the JSON keeps the square matrix, its last row zero)."""
    result = EvalResult(top1=0.5, top5=None, loss=0.7, count=4, per_class={"b": 0.5, "a": 0.5}, labels=["a", "b", OTHER],
                        confusion=[[1, 0, 1], [1, 1, 0], [0, 0, 0]])  # fmt: skip
    text = render_table(result, color=False)
    assert text.split("confusion matrix (rows: true class, columns: predicted class)\n")[1] == (
        "┏━━━┳━━━┳━━━┳━━━━━━━━━┓\n"
        "┃   ┃ a ┃ b ┃ (other) ┃\n"
        "┡━━━╇━━━╇━━━╇━━━━━━━━━┩\n"
        "│ a │ 1 │ 0 │       1 │\n"
        "│ b │ 1 │ 1 │       0 │\n"
        "└───┴───┴───┴─────────┘\n"
    )


@pytest.mark.parametrize(
    ("classes", "other"),
    [(["(other)", "b"], "(other, not evaluated)"),
     (["(other)", "(other, not evaluated)"], "(other, not evaluated 2)")],
)  # fmt: skip
def test_a_class_named_other_keeps_the_catch_all_column_apart(classes: list[str], other: str) -> None:
    """Review of issue 20: a class named (other) and the catch-all column had one name: the table showed two
    (other) columns and the JSON labels were ['(other)', 'b', '(other)']."""
    acc = Accumulator(classes, class_to_model=[0, 1], num_model_classes=3)
    logits = torch.tensor([[0.9, 0.0, 0.1], [0.0, 0.1, 0.9], [0.0, 0.9, 0.1]])  # right, outside (model class 2), right
    acc.update(logits, np.array([0, 0, 1]))
    result = acc.result()
    assert result.labels == [*classes, other]
    assert result.to_dict()["other"] == other
    assert result.confusion == [[1, 0, 1], [0, 1, 0], [0, 0, 0]]
    table = render_table(result, color=False).split("columns: predicted class)\n")[1]
    header = table.splitlines()[1]
    assert [cell.strip() for cell in header.strip("┃").split("┃")] == ["", *classes, other]
    assert len(table.splitlines()) == 6  # two class rows; the catch-all column has no row
    plain = Accumulator(["a", "b"], class_to_model=[0, 1], num_model_classes=3)
    plain.update(logits[:1], np.array([0]))
    assert plain.result().to_dict()["other"] is None  # no prediction outside: no catch-all column


def test_accumulator_top5_counts_rank_five_and_not_six() -> None:
    acc = Accumulator(["x"], class_to_model=[0], num_model_classes=6)
    ranks = torch.tensor([[0.0, 5, 4, 3, 2, 1], [1.0, 5, 4, 3, 2, 0]])  # class 0 ranked sixth, then fifth
    acc.update(ranks, np.array([0, 0]))
    assert (acc.result().top1, acc.result().top5) == (0.0, 0.5)


def test_top5_is_null_and_explained_for_five_classes_or_fewer(tmp_path: Path) -> None:
    names = ["a", "b", "c", "d", "e"]
    model = save_hf_model(
        tmp_path / "five", {**BIT50_PREPROCESSOR, "size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}},
        embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1], num_groups=8,
        id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
    )  # fmt: skip
    write_folder(tmp_path / "data", {"a": 2, "e": 1})
    code, out, err = run_main("eval", tmp_path / "data", "--model", model, "--format", "json", "--device", "cpu")
    assert (code, err) == (0, "")
    result = json.loads(out)
    assert result["top5"] is None and result["count"] == 3
    assert '"top5": null' in out
    code, table, err = run_main("eval", tmp_path / "data", "--model", model, "--device", "cpu")
    assert (code, err) == (0, "")
    assert table.splitlines()[2] == "top-5   n/a (the model has 5 classes or fewer)" == f"top-5   {NO_TOP5}"


def test_table_prints_class_names_literally_on_one_line() -> None:
    """Class folder names are data: "[bold]cat[/bold]" is not markup, and a newline does not break a row."""
    names = ["[bold]cat[/bold]", "a\nb", "[red]"]
    result = EvalResult(top1=0.5, top5=1.0, loss=0.7, count=6, per_class=dict.fromkeys(names, 0.5), labels=names,
                        confusion=[[1, 1, 0], [0, 1, 1], [1, 0, 1]])  # fmt: skip
    text = render_table(result, color=False)
    for name in ("[bold]cat[/bold]", "a\\nb", "[red]"):  # per-class row, confusion row and column
        assert text.count(name) == 3, text
    rows = [line for line in text.splitlines() if line.startswith("│")]  # body rows (headers use ┃)
    assert len(rows) == 3 + 3  # per-class and confusion: one line per class
    assert len({len(line) for line in rows[3:]}) == 1  # the confusion matrix's rows line up
    assert text.splitlines()[:4] == ["images  6", "top-1   0.5000", "top-5   1.0000", "loss    0.7000"]


def test_headless_checkpoint_cannot_be_evaluated(tmp_path: Path) -> None:
    """A features-only checkpoint has no labels to match folders against: the head is what is missing."""
    folder = save_hf_model(
        tmp_path / "headless", embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1], num_groups=8, num_labels=0
    )
    write_folder(tmp_path / "data", {"red": 1})
    code, out, err = run_main("eval", tmp_path / "data", "--model", folder, "--device", "cpu")
    assert (code, out) == (1, "")
    assert err == f"Error: {folder}: checkpoint has no classification head; it gives features, not labels\n"


def test_precision_recall_f1_equal_scikit_learn_where_undefined() -> None:
    """Zero where scikit-learn's zero_division=0 gives zero: a class never predicted (precision 0/0), a class
    never right (F1 0); predictions of a label outside the data count against the true class's recall only."""
    acc = Accumulator(["a", "b", "c"], class_to_model=[0, 1, 2], num_model_classes=4)
    y_true = np.array([0, 0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 3, 1, 0, 0, 3, 3])  # b is never right, c is never predicted, 3 is outside the data
    acc.update(torch.nn.functional.one_hot(torch.from_numpy(y_pred), 4).float(), y_true)
    r = acc.result()
    p, rc, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=[0, 1, 2], zero_division=0)
    assert r.precision == dict(zip("abc", p.tolist())) == {"a": 1 / 3, "b": 0.0, "c": 0.0}
    assert r.recall == dict(zip("abc", rc.tolist())) == {"a": 1 / 3, "b": 0.0, "c": 0.0}
    assert r.f1 == dict(zip("abc", f.tolist()))
    assert r.macro_f1 == f1_score(y_true, y_pred, labels=[0, 1, 2], average="macro", zero_division=0) == 1 / 9
    assert r.labels == ["a", "b", "c", OTHER]
