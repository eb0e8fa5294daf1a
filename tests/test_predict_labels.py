"""A multi-label model's labels in `bit predict`'s outputs (issue 24 review): the table shows a row's labels one
per line (a label may hold `, `), CSV's image_label joins them with `;`, which no multi-label class name may
hold (a model with one is refused for CSV, before any image is read), and JSON keeps real lists."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from conftest import BIT50_PREPROCESSOR, run_main, save_hf_model
from PIL import Image

from bitcli.options import PredictFormat
from bitcli.render import Row, predictions_text

LABELS = ["cat, dog", "[red]", "x;y"]


def label_cells(table: str) -> list[str]:
    """The label column's cell lines of a table without colour (the box's second column, after its padding)."""
    return [line.split("│")[2][1:].rstrip() for line in table.splitlines() if line.count("│") == 4]


def score_cells(table: str) -> list[str]:
    """The score column's cell lines of a table without colour."""
    return [line.split("│")[3].strip() for line in table.splitlines() if line.count("│") == 4]


def test_the_table_shows_each_label_on_its_own_line_literally() -> None:
    predictions = [{"label": name, "index": i, "score": s} for i, (name, s) in enumerate(zip(LABELS, (0.9, 0.8, 0.1)))]
    rows = [Row("a.png", predictions=predictions, labels=predictions[:2]), Row("b.png", predictions=predictions,
                                                                              labels=[])]  # fmt: skip
    table = predictions_text(rows, PredictFormat.table, color=False)
    assert label_cells(table) == ["labels:", "  cat, dog", "  [red]", "cat, dog (0)", "[red] (1)", "x;y (2)",
                                  "labels: (none above its threshold)", "cat, dog (0)", "[red] (1)", "x;y (2)"]  # fmt: skip
    assert score_cells(table) == ["", "0.9000", "0.8000", "0.9000", "0.8000", "0.1000",
                                  "", "0.9000", "0.8000", "0.1000"]  # fmt: skip
    # a label outside the top-k (-k 1) still shows its score: the table has it nowhere else
    table = predictions_text([Row("c.png", predictions=predictions[:1], labels=predictions[:2])], PredictFormat.table,
                             color=False)  # fmt: skip
    assert list(zip(label_cells(table), score_cells(table))) == [
        ("labels:", ""), ("  cat, dog", "0.9000"), ("  [red]", "0.8000"), ("cat, dog (0)", "0.9000")
    ]  # fmt: skip
    lines = predictions_text(rows, PredictFormat.csv, color=False).splitlines()
    assert lines[1:4] == ['a.png,1,"cat, dog",0,0.900000,,"cat, dog;[red]"', 'a.png,2,[red],1,0.800000,,"cat, dog;[red]"',
                          'a.png,3,x;y,2,0.100000,,"cat, dog;[red]"']  # fmt: skip


def test_a_multilabel_model_with_a_semicolon_in_a_class_is_refused_for_csv(tmp_path: Path) -> None:
    """A transformers folder marked multi-label (thresholds 0.5) whose id2label holds `;`: CSV is refused in one
    line naming the class and the formats that work, exit 1, no file; JSON gives the labels as lists."""
    model = save_hf_model(tmp_path / "model", {**BIT50_PREPROCESSOR, "size": {"shortest_edge": 32},
                                               "crop_size": {"height": 32, "width": 32}},
                          embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1], num_groups=8,
                          problem_type="multi_label_classification", id2label=dict(enumerate(LABELS)),
                          label2id={n: i for i, n in enumerate(LABELS)})  # fmt: skip
    image = tmp_path / "a.png"
    Image.fromarray(np.full((32, 32, 3), 90, dtype=np.uint8)).save(image)
    refused = (f"Error: {model}: multi-label class 'x;y' holds ';', which separates the labels in CSV's image_label "
               "column, so it would read back as several labels; use --format json or jsonl (their labels are lists)\n")  # fmt: skip
    for flags in (["-o", tmp_path / "out.csv"], ["--format", "csv"]):
        code, out, err = run_main("predict", image, "--model", model, *flags)
        assert (code, out, err) == (1, "", refused)
    assert not (tmp_path / "out.csv").exists()
    code, out, err = run_main("predict", image, "--model", model, "--format", "json", "--top-k", "3")
    assert code == 0, err
    (row,) = json.loads(out)
    assert sorted(p["label"] for p in row["predictions"]) == sorted(LABELS)
    assert row["labels"] == [p for p in row["predictions"] if p["score"] >= 0.5]
