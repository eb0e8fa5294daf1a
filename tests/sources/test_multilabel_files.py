"""Multi-label label files (issue 24 review): in JSONL only a JSON list is several labels (a string holding `;`
is one label), in CSV `;` separates them; the messages for an empty list, an empty label in a list and an
image listed in two rows of a multi-label file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_main
from finetune.helpers import FAST
from finetune.test_multilabel import write_images

from bitcli.errors import BitError
from bitcli.sources.labelfile import read_label_file


def test_a_jsonl_string_with_a_semicolon_is_one_label(tmp_path: Path) -> None:
    write_images(tmp_path, [["red"], ["green"], ["blue"]])
    jsonl = tmp_path / "labels.jsonl"
    jsonl.write_text('{"path": "000.png", "label": "rock;roll"}\n{"path": "001.png", "label": "jazz"}\n')
    ds = read_label_file(jsonl).scan(None, None)
    assert ds.classes == ("jazz", "rock;roll") and ds.multi_hot is None
    csv = tmp_path / "labels.csv"
    csv.write_text('path,label\n000.png,"rock;roll"\n001.png,jazz\n')
    ds = read_label_file(csv).scan(None, None)  # CSV: `;` separates labels (docs/labels.md warns)
    assert ds.classes == ("jazz", "rock", "roll") and ds.multi_hot is not None


@pytest.mark.parametrize(
    ("row", "said"),
    [
        ('"label": []', "the label list is empty; give every row at least one label"),
        ('"label": ["red", ""]', "an empty label in the list; remove it or write the label"),
        ('"label": ["red", " "]', "an empty label in the list; remove it or write the label"),
    ],
)
def test_empty_lists_and_empty_labels_say_which(tmp_path: Path, row: str, said: str) -> None:
    write_images(tmp_path, [["red"]])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"path": "000.png", "label": ["red"]}\n{"path": "000.png", ' + row + "}\n")
    code, out, err = run_main("eval", bad, "--model", "x")
    assert (code, out, err) == (1, "", f"Error: {bad}:2: {said}\n")
    csv = tmp_path / "bad.csv"
    csv.write_text("path,label\n000.png,red;;green\n")
    with pytest.raises(BitError) as caught:
        read_label_file(csv)
    assert (
        str(caught.value)
        == f"{csv}:2: an empty label in the `;`-separated list; remove the extra `;` or write the label"
    )


def test_an_image_in_two_multilabel_rows_says_to_merge_them(tmp_path: Path) -> None:
    write_images(tmp_path, [["red"], ["green"]])
    table = tmp_path / "dup.jsonl"
    table.write_text('{"path": "000.png", "label": ["red", "blue"]}\n{"path": "001.png", "label": "green"}\n'
                     '{"path": "000.png", "label": ["green"]}\n')  # fmt: skip
    with pytest.raises(BitError) as caught:
        read_label_file(table)
    assert str(caught.value) == (
        f"{table}:3: 000.png is labelled 'green' here but 'blue', 'red' on line 1; list each image in one row, "
        "with all its labels in that row's list: merge the rows"
    )
    same = tmp_path / "same.jsonl"  # the same labels in another order: a repeated row (a warning), not a conflict
    same.write_text('{"path": "000.png", "label": ["red", "blue"]}\n{"path": "001.png", "label": "green"}\n'
                    '{"path": "000.png", "label": ["blue", "red", "red"]}\n')  # fmt: skip
    assert len(read_label_file(same).scan(None, None)) == 3


@pytest.mark.parametrize(
    ("values", "classes", "rows"),
    [  # rows grouped by their lowest class, in row order within one
        ([["owl", "cat"], ["dog"], ["cat", "cat"]], ("cat", "dog", "owl"), [[1, 0, 1], [1, 0, 0], [0, 1, 0]]),
        ([[10, 2], [1], [2, 2]], ("1", "2", "10"), [[1, 0, 0], [0, 1, 1], [0, 1, 0]]),
    ],
)
def test_a_plain_list_label_column_is_multilabel(tmp_path: Path, values: list, classes: tuple, rows: list) -> None:
    """A parquet label column of plain lists (list<string>, list<int>) is multi-label as a JSONL list is: the
    classes are the values in class order (integers by number), a repeated label counts once."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bitcli.sources.features import Columns
    from bitcli.sources.locate import training_parts

    files = write_images(tmp_path / "images", [["red"], ["green"], ["blue"]])
    images = [{"bytes": (tmp_path / "images" / f).read_bytes(), "path": None} for f in files]
    data = tmp_path / "train.parquet"
    pq.write_table(pa.table({"image": images, "label": values}), data)
    ds = training_parts(data, Columns())[0].scan(None)
    assert ds.classes == classes and ds.multi_label
    assert ds.multi_hot.tolist() == rows
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"image": images, "label": [["a"], ["b", " "], ["c"]]}), bad)
    with pytest.raises(BitError) as caught:
        training_parts(bad, Columns())[0].scan(None)
    assert str(caught.value) == f"{bad} row 1: an empty label in the list; remove it or write the label"


def semicolon_refused(where: str, label: str) -> str:
    return (
        f"Error: {where}: multi-label class '{label}' holds ';', which separates a row's labels in CSV (label files, "
        "bit predict's image_label), so it would read back as several labels; rename the class without ';'\n"
    )


def test_a_multilabel_class_holding_a_semicolon_is_refused_from_every_source(tmp_path: Path) -> None:
    """`;` separates a multi-label row's labels in CSV, so a multi-label class holding it could not be written
    to a CSV and read back: one line naming the row (the label shown literally), exit 1, no run folder. A JSONL
    string holding `;` in a single-label file stays one label (test above)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import ClassLabel, Dataset, Features, Image, Sequence

    files = write_images(tmp_path, [["red"], ["green"], ["blue"]])
    listed = tmp_path / "listed.jsonl"  # in a list, or a string in a file that another row makes multi-label
    listed.write_text(
        '{"path": "000.png", "label": ["red"]}\n{"path": "001.png", "label": ["green", "rock;\\nroll"]}\n'
    )
    plain = tmp_path / "plain.jsonl"
    plain.write_text('{"path": "000.png", "label": ["red"]}\n{"path": "001.png", "label": "[b];c"}\n')
    images = [{"bytes": (tmp_path / f).read_bytes(), "path": None} for f in files]
    parquet = tmp_path / "lists.parquet"
    pq.write_table(pa.table({"image": images, "label": [["red"], ["red"], ["a; b", "red"]]}), parquet)
    features = Features({"image": Image(), "label": Sequence(ClassLabel(names=["cat", "x;y"]))})
    saved = tmp_path / "saved"
    Dataset.from_dict({"image": images, "label": [[0], [1, 0], [1]]}, features=features).save_to_disk(saved)
    shard = next(saved.glob("*.arrow"))
    for data, where, label in [(listed, f"{listed}:2", "rock;\\nroll"), (plain, f"{plain}:2", "[b];c"),
                               (parquet, f"{parquet} row 2", "a; b"), (saved, f"{shard} row 1", "x;y")]:  # fmt: skip
        code, out, err = run_main("finetune", data, "--output", tmp_path / "run", "--steps", "1", *FAST)
        assert (code, out, err) == (1, "", semicolon_refused(where, label)), data
        assert not (tmp_path / "run").exists()
        code, out, err = run_main("eval", data, "--model", "x")
        assert (code, out, err) == (1, "", semicolon_refused(where, label)), data


def test_write_clean_keeps_every_label_of_a_multilabel_row(tmp_path: Path, tiny_dir: Path) -> None:
    """`bit audit --write-clean FILE.jsonl` on multi-label data: each kept row lists all its labels (a JSON
    list, in class order), so the clean file reads back with the same labels; FILE.csv is refused (a CSV whose
    rows each keep one label would read back as single-label: tests/test_audit_multilabel.py)."""
    sets = [["red"], ["green", "red"], ["blue"], ["blue", "green", "red"], ["green"], ["red", "blue"]] * 4
    files = write_images(tmp_path, sets)  # (4 images a set: the held-out heads see a few of each)
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(f'{{"path": "{f}", "label": {json.dumps(s)}}}\n' for f, s in zip(files, sets)))
    code, _, err = run_main(
        "audit",
        labels,
        "-m",
        tiny_dir,
        "--write-clean",
        tmp_path / "clean.jsonl",
        "--workers",
        "0",
        "--threshold",
        "0.999",
    )
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "clean.jsonl").read_text(encoding="utf-8").splitlines()]
    written = {r["path"]: r["label"] for r in rows}
    assert written == {f: sorted(s) for f, s in zip(files, sets) if f in written}  # (class order: by name)
    assert list(written) == sorted(written)  # the file's order
    assert len(written) >= 12 and any(len(label) > 1 for label in written.values()), "too few rows kept: nothing tested"
    clean, source = (read_label_file(path).scan(None, None) for path in (tmp_path / "clean.jsonl", labels))
    wanted = {source.relative(i): source.multi_hot[i].tolist() for i in range(len(source))}
    assert {clean.relative(i): clean.multi_hot[i].tolist() for i in range(len(clean))} == {
        f: wanted[f] for f in written
    }
