"""Multi-label data (issue 24): label files with several labels a row, the metrics against scikit-learn
(average_precision_score, precision_recall_fscore_support, f1_score), the thresholds against a brute-force F1
search, the MixUp binary cross-entropy against a direct computation, and a fine-tuned multi-label model end to
end: its thresholds in config.json (problem_type multi_label_classification), safetensors and ONNX metadata,
`bit predict`'s labels list, `bit eval`'s mAP, and transformers' BitForImageClassification giving the same
sigmoid scores from the run's folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import run_main
from PIL import Image
from sklearn.metrics import average_precision_score, f1_score, precision_recall_curve, precision_recall_fscore_support

from bitcli import multilabel
from bitcli.finetune import loop
from bitcli.sources.labelfile import read_label_file

from .helpers import FAST, read_metrics, read_weights
from .test_head_only import _interrupt_at

NAMES = ["red", "green", "blue"]


def random_multilabel(n: int = 200, classes: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Multi-hot truth and scores that mostly agree with it, rounded to 2 places (ties in every class)."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, classes)) < 0.3).astype(np.uint8)
    s = np.clip(0.35 * y + rng.random((n, classes)) * 0.65, 0, 1).round(2).astype(np.float32)
    return y, s


def test_average_precision_equals_scikit_learn_with_ties() -> None:
    y, s = random_multilabel()
    for c in range(y.shape[1]):
        assert multilabel.average_precision(y[:, c], s[:, c]) == pytest.approx(
            average_precision_score(y[:, c], s[:, c]), abs=1e-12
        )
    assert multilabel.average_precision(np.zeros(4, dtype=np.uint8), np.arange(4.0)) is None  # no positive


def test_thresholds_maximise_f1_as_a_brute_force_search_does() -> None:
    """scikit-learn's precision-recall curve gives every candidate threshold's precision and recall: the chosen
    threshold gives the highest F1 of all (f1_score confirms it), at the highest candidate of equal F1, lowered
    to the midpoint to the next lower score."""
    y, s = random_multilabel(seed=1)
    thresholds = multilabel.fit_thresholds(y, s)
    for c, t in enumerate(thresholds):
        precision, recall, candidates = precision_recall_curve(y[:, c], s[:, c])
        f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(precision),
                       where=precision + recall > 0)[:-1]  # fmt: skip
        best = f1.max()
        assert f1_score(y[:, c], s[:, c] >= t) == pytest.approx(best, abs=1e-12)
        chosen = candidates[np.isclose(f1, best, rtol=0, atol=1e-12)].max()
        lower = s[:, c][s[:, c] < chosen]
        assert t == (float(chosen) + (float(lower.max()) if lower.size else 0.0)) / 2
    assert multilabel.fit_thresholds(np.zeros((3, 1), dtype=np.uint8), np.ones((3, 1))) == [0.5]


def test_accumulated_metrics_equal_scikit_learn() -> None:
    """Data-set classes 0..3 are the model's 4, 1, 0, 2 (of 5); the logits arrive in uneven batches. The model's
    class 3 has no image in the data but is predicted on some: its false positives count (scikit-learn's
    labels= every class of the model), and its AP is undefined (None, left out of mAP)."""
    y, s = random_multilabel(n=150, classes=4, seed=2)
    s = np.clip(s, 0.01, 0.99)
    folders = [4, 1, 0, 2]
    logits = torch.zeros(len(y), 5)
    logits[:, folders] = torch.logit(torch.from_numpy(s).double()).float()
    logits[:, 3] = torch.linspace(-2, 2, len(y))  # above its threshold 0.6 on the last images
    thresholds = [0.3, 0.5, 0.45, 0.6, 0.7]  # the model's, by model index
    names = ["m0", "m1", "m2", "m3", "m4"]
    acc = multilabel.MultiLabelAccumulator(names, folders, thresholds)
    for start in range(0, len(y), 41):
        acc.update(logits[start : start + 41], y[start : start + 41])
    result = acc.result().to_dict()
    truth = np.zeros((len(y), 5), dtype=np.uint8)
    truth[:, folders] = y
    probs = torch.sigmoid(logits).numpy()
    predicted = probs >= np.asarray(thresholds, dtype=np.float32)  # compared at the scores' precision, float32
    assert 0 < predicted[:, 3].sum() < len(y)
    every = list(range(5))
    p, r, f, _ = precision_recall_fscore_support(truth, predicted, labels=every, average=None, zero_division=0)
    assert result["labels"] == names
    present = [0, 1, 2, 4]
    assert [result["ap"][names[c]] for c in present] == pytest.approx(
        [average_precision_score(truth[:, c], probs[:, c]) for c in present]
    )
    assert result["ap"]["m3"] is None
    assert result["mAP"] == pytest.approx(
        average_precision_score(truth[:, present], probs[:, present], average="macro"), abs=1e-12
    )
    assert result["micro_f1"] == pytest.approx(f1_score(truth, predicted, labels=every, average="micro"), abs=1e-12)
    assert result["macro_f1"] == pytest.approx(
        f1_score(truth, predicted, labels=every, average="macro", zero_division=0), abs=1e-12
    )
    only_present = f1_score(truth, predicted, labels=present, average="micro")
    assert abs(result["micro_f1"] - only_present) > 1e-3  # the absent class's false positives count
    assert list(result["precision"].values()) == pytest.approx(p.tolist(), abs=1e-12)
    assert list(result["recall"].values()) == pytest.approx(r.tolist(), abs=1e-12)
    assert list(result["f1"].values()) == pytest.approx(f.tolist(), abs=1e-12)
    assert list(result["thresholds"].values()) == thresholds
    bce = F.binary_cross_entropy_with_logits(logits, torch.from_numpy(truth.astype(np.float32)), reduction="sum")
    assert result["loss"] == pytest.approx(float(bce) / len(y), rel=1e-6)
    table = multilabel.render_table(acc.result(), color=False)
    assert "AP undefined (no image of the class), left out of mAP: 'm3'\n" in table


def test_mixup_binary_cross_entropy_is_the_mixed_sum_of_both_losses() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, generator=g)
    y = (torch.rand(6, 4, generator=g) < 0.4).float()
    y_mix = y[torch.randperm(6, generator=g)]

    def direct(target: torch.Tensor) -> torch.Tensor:  # sum over classes, mean over images
        p = torch.sigmoid(logits.double())
        return (-(target * p.log() + (1 - target) * (1 - p).log())).sum(1).mean()

    got = loop.mixup_binary_cross_entropy(logits, y, y_mix, 0.3)
    assert float(got) == pytest.approx(float(0.3 * direct(y) + 0.7 * direct(y_mix)), rel=1e-6)
    assert float(loop.mixup_binary_cross_entropy(logits, y, None, 1.0)) == pytest.approx(float(direct(y)), rel=1e-6)


def write_images(root: Path, rows: list[list[str]], seed: int = 0) -> list[str]:
    """One 16 px image a row, with the colour channel of each of its labels raised; their file names."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for i, labels in enumerate(rows):
        array = rng.integers(0, 60, (16, 16, 3), dtype=np.uint8)
        for label in labels:
            array[..., NAMES.index(label)] += 150
        Image.fromarray(array).save(root / f"{i:03d}.png")
        names.append(f"{i:03d}.png")
    return names


def write_split_label_file(root: Path, train: list[list[str]], val: list[list[str]]) -> list[str]:
    """root/labels.jsonl over write_images' images of `train` + `val` (a split column); the images' file names."""
    files = write_images(root / "images", train + val)
    with open(root / "labels.jsonl", "w") as f:
        for i, labels in enumerate(train + val):
            split = "train" if i < len(train) else "val"
            f.write(json.dumps({"path": f"images/{files[i]}", "label": labels, "split": split}) + "\n")
    return files


def label_sets(n: int, seed: int) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    sets = []
    for _ in range(n):
        chosen = [name for name in NAMES if rng.random() < 0.45] or [NAMES[int(rng.integers(3))]]
        sets.append(chosen)
    return sets


def test_label_files_give_multi_hot_rows(tmp_path: Path) -> None:
    write_images(tmp_path, [["red"], ["red", "blue"], ["green"]])
    jsonl = tmp_path / "labels.jsonl"
    jsonl.write_text('{"path": "000.png", "label": ["red"]}\n{"path": "001.png", "label": ["blue", "red"]}\n'
                     '{"path": "002.png", "label": "green"}\n')  # fmt: skip
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\n000.png,red\n001.png,blue;red\n002.png,green\n")
    for path in (jsonl, csv):
        ds = read_label_file(path).scan(None, None)
        assert ds.classes == ("blue", "green", "red")
        rows = {ds.relative(i): ds.multi_hot[i].tolist() for i in range(len(ds))}
        assert rows == {"000.png": [0, 0, 1], "001.png": [1, 0, 1], "002.png": [0, 1, 0]}, path
    single = tmp_path / "single.csv"
    single.write_text("path,label\n000.png,red\n002.png,green\n")
    assert read_label_file(single).scan(None, None).multi_hot is None  # single-label files stay as they were
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"path": "000.png", "label": []}\n')
    code, out, err = run_main("eval", bad, "--model", "x")
    assert (code, out) == (1, "")
    assert err == f"Error: {bad}:1: the label list is empty; give every row at least one label\n"


RUN = ["--steps", "6", "--batch-size", "8", "--batch-split", "2", "--mixup", "0.2", "--lr", "0.05", "--eval-every", "3",
       "--save-every", "2", *FAST]  # fmt: skip


@pytest.fixture(scope="module")
def multi_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str]]:
    """A tiny model fine-tuned on 48 multi-label rows (train) and validated on 24 (val), from one JSONL; the
    first 12 training images (predict's: the thresholds are validation scores, ties there are likely)."""
    root = tmp_path_factory.mktemp("multi")
    train, val = label_sets(48, 0), label_sets(24, 1)
    files = write_split_label_file(root, train, val)
    run = root / "run"
    threads = torch.get_num_threads()  # one thread, as the tests' runs have (conftest's one_thread is per test)
    torch.set_num_threads(1)
    try:
        code, _, err = run_main("finetune", root / "labels.jsonl", "--output", run, *RUN)
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    assert "  labels      multi-label (several labels a row): sigmoid outputs, binary cross-entropy" in err
    assert "could not draw" not in err  # the per-class AP picture stands in for the confusion matrix
    paths = [str(root / "images" / name) for name in files]
    return root, run, paths[:12], paths[len(train) :]


def test_multilabel_run_resumes_bit_identical(multi_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopped in step 5 (the checkpoint of step 4 on disk) and resumed: the weights, the losses (BCE on the
    MixUp-mixed targets, split over two micro-batches) and the thresholds of the uninterrupted run."""
    root, run = multi_run[0], multi_run[1]
    stopped = tmp_path / "stopped"
    with monkeypatch.context() as patch:
        _interrupt_at(patch, 5)
        code, _, err = run_main("finetune", root / "labels.jsonl", "--output", stopped, *RUN)
    assert code == 130, err
    code, _, err = run_main("finetune", root / "labels.jsonl", "--output", stopped, *RUN, "--resume")
    assert code == 0, err
    assert "resuming at step 5 of 6" in err
    a, b = read_weights(run / "model.safetensors"), read_weights(stopped / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m["loss"] for m in read_metrics(stopped)] == [m["loss"] for m in read_metrics(run)]
    assert (
        json.loads((stopped / "config.json").read_text())["bitcli_thresholds"]
        == json.loads((run / "config.json").read_text())["bitcli_thresholds"]
    )


def test_finetuned_multilabel_model_end_to_end(multi_run, tmp_path: Path) -> None:
    import transformers

    root, run, images, val_images = multi_run
    config = json.loads((run / "config.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    thresholds = summary["thresholds"]
    assert config["problem_type"] == "multi_label_classification" and config["bitcli_thresholds"] == thresholds
    assert len(thresholds) == 3 and summary["calibration"] is None
    validation = json.loads((run / "validation.json").read_text())
    assert list(validation["thresholds"].values()) == thresholds  # the last validation chose them

    # transformers loads the folder and gives the sigmoid scores bit predict reports
    model = transformers.BitForImageClassification.from_pretrained(run).eval()
    assert model.config.problem_type == "multi_label_classification"
    processor = transformers.BitImageProcessorPil.from_pretrained(run)

    def sigmoid_scores(paths: list[str]) -> np.ndarray:
        with torch.no_grad():
            pixels = processor([Image.open(p) for p in paths], return_tensors="pt")["pixel_values"]
            return torch.sigmoid(model(pixels).logits).numpy()

    want = sigmoid_scores(images)
    code, out, err = run_main("predict", *images, "--model", run, "--top-k", "3", "--format", "json")
    assert code == 0, err
    rows = json.loads(out)
    got = np.zeros_like(want)
    for i, row in enumerate(rows):
        for p in row["predictions"]:
            got[i, p["index"]] = p["score"]
        above = [(p["label"], p["index"]) for p in row["labels"]]
        expected = [(config["id2label"][str(c)], c) for c in np.argsort(-want[i], kind="stable")
                    if want[i, c] >= thresholds[c]]  # fmt: skip
        assert above == expected
        assert list(row) == ["path", "labels", "predictions"]
    np.testing.assert_allclose(got, want, atol=2e-6)
    assert np.abs(want - np.array(thresholds)).min() > 1e-5  # no score at a threshold: the labels are exact
    assert any(row["labels"] for row in rows) and any(len(row["labels"]) < 3 for row in rows)

    # bit eval on the val split: mAP and F1 of those scores at the stored thresholds (= the validation's)
    code, out, err = run_main("eval", f"{root / 'labels.jsonl'}:val", "--model", run, "--format", "json")
    assert code == 0, err
    result = json.loads(out)
    truth = np.array([[int(n in labels) for n in config["id2label"].values()] for labels in label_sets(24, 1)])
    val_scores = sigmoid_scores(val_images)
    assert result["mAP"] == pytest.approx(average_precision_score(truth, val_scores, average="macro"), abs=1e-5)
    assert list(result["ap"].values()) == pytest.approx(
        [average_precision_score(truth[:, c], val_scores[:, c]) for c in range(3)], abs=1e-5
    )
    assert result["macro_f1"] == pytest.approx(validation["macro_f1"], abs=1e-12)
    code, table, err = run_main("eval", f"{root / 'labels.jsonl'}:val", "--model", run)
    assert (code, err) == (0, "")
    assert f"mAP     {result['mAP']:.4f}\n" in table
    assert f"micro F1 {result['micro_f1']:.4f}  macro F1 {result['macro_f1']:.4f} (at the stored thresholds)" in table

    # the pictures: per-class AP and F1 instead of a confusion matrix, in the run and with eval --plot
    from bitcli import plots

    heading = f"validation after {validation['step'] + 1} of 6 steps"
    assert (run / "confusion.png").read_bytes() == plots.ap_png(validation, heading)
    code, _, err = run_main("eval", f"{root / 'labels.jsonl'}:val", "--model", run, "--plot", tmp_path / "ap.png")
    assert code == 0, err
    assert Image.open(tmp_path / "ap.png").size[0] == 700 and not (tmp_path / "ap-reliability.png").exists()
    assert result["mAP"] == pytest.approx(validation["mAP"], abs=1e-6)

    # the thresholds travel into a bitcli file and an ONNX export, whose predict gives the same labels
    for dst in ("m.safetensors", "m.onnx"):
        code, _, err = run_main("convert", run, tmp_path / dst)
        assert code == 0, err
        code, out, err = run_main("predict", *images, "--model", tmp_path / dst, "--top-k", "3", "-f", "json")
        assert code == 0, err
        assert [[p["label"] for p in r["labels"]] for r in json.loads(out)] == [
            [p["label"] for p in r["labels"]] for r in rows
        ], dst
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert json.loads(meta["bitcli.thresholds"]) == thresholds


def test_multilabel_refuses_the_single_label_flags(multi_run, tmp_path: Path) -> None:
    root = multi_run[0]
    code, out, err = run_main("finetune", root / "labels.jsonl", "--output", tmp_path / "r", "--class-weights",
                              "balanced", *FAST)  # fmt: skip
    assert (code, out) == (2, "")
    assert err == "Error: --class-weights balanced: not available for multi-label data yet; leave it out\n"
    assert not (tmp_path / "r").exists()


def test_min_score_is_refused_for_a_multilabel_model(multi_run, tmp_path: Path) -> None:
    """--min-score marks a single-label top score below P unknown; a multi-label model's thresholds do that."""
    run, images = multi_run[1], multi_run[2]
    code, out, err = run_main("predict", images[0], "--model", run, "--min-score", "0.5")
    assert (code, out) == (2, "")
    assert err == (
        f"Error: --min-score: {run} is a multi-label model, whose labels are the classes at or above their own "
        "thresholds (none: unknown); leave --min-score out\n"
    )


@pytest.mark.parametrize("layout", ["parquet", "save_to_disk"])
def test_sequence_of_classlabel_gives_multi_hot_rows(tmp_path: Path, layout: str) -> None:
    """A parquet file (or save_to_disk folder) whose label column is a Sequence(ClassLabel): each row's list of
    class indices becomes its multi-hot row; the validation split maps them to the training classes by name."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Sequence

    from bitcli.sources.features import Columns
    from bitcli.sources.locate import training_parts

    rows = [[0], [2, 1], [1], [0, 1, 2], [2]]
    files = write_images(tmp_path / "images", [[NAMES[c] for c in r] for r in rows])
    features = Features({"image": Image(), "tags": Sequence(ClassLabel(names=["cat", "dog", "owl"]))})

    def split(picked: list[int]) -> Dataset:
        return Dataset.from_dict({"image": [{"bytes": (tmp_path / "images" / files[i]).read_bytes(), "path": None}
                                            for i in picked], "tags": [rows[i] for i in picked]}, features=features)  # fmt: skip

    data = tmp_path / layout
    if layout == "parquet":
        (data / "data").mkdir(parents=True)
        split([0, 1, 2]).to_parquet(data / "data" / "train-00000-of-00001.parquet")
        split([3, 4]).to_parquet(data / "data" / "validation-00000-of-00001.parquet")
    else:
        DatasetDict({"train": split([0, 1, 2]), "validation": split([3, 4])}).save_to_disk(data)
    train_part, val_part = training_parts(data, Columns())
    train = train_part.scan(None)
    assert train.classes == ("cat", "dog", "owl") and train.multi_label
    # grouped by lowest class (whatever the order in the row), rows in order within one: cat, owl+dog, dog
    assert train.multi_hot.tolist() == [[1, 0, 0], [0, 1, 1], [0, 1, 0]]
    assert val_part is not None
    assert val_part.scan(train.classes).multi_hot.tolist() == [[1, 1, 1], [0, 0, 1]]
