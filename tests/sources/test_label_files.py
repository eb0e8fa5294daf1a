"""CSV and JSONL label files as people write them (issue 20): a BOM, `Path,Label`, `;` or tabs (item 8); a
huge field or a stray quote (item 5); JSON values of the wrong type (item 9); rows naming a folder, a file that
is not an image, a label holding a comma, repeated rows and one image under two labels (item 11); and a file
read as a stream, its first bad row reported when reached, its rows kept packed (item 12)."""

from __future__ import annotations

import json
import os
import tracemalloc
from pathlib import Path

import pytest
from conftest import run_main
from finetune.helpers import FAST

from .conftest import folder_rows, interleave, linked, write_csv, write_jsonl
from .test_bad_inputs import finetune_error

ARGS = ["--steps", "1", "--batch-size", "4", "--eval-every", "0"]


def val_rows(tmp_path: Path, sources: dict[str, Path]) -> list[tuple[str, str]]:
    return interleave(folder_rows(linked(tmp_path, sources), "val"))


def eval_result(data: object, model: Path) -> tuple[dict, str]:
    code, out, err = run_main("eval", data, "--model", model, "--format", "json")
    assert code == 0, err
    return json.loads(out), err


def eval_error(data: object, model: Path) -> str:
    code, out, err = run_main("eval", data, "--model", model)
    assert (code, out) == (1, ""), err
    assert err.count("\n") == 1, err
    return err


# ----------------------------------------------------------------------------------------------------------
# Headers: BOM, case, delimiters, empty files (item 8)


def test_bom_case_and_delimiters_are_read(sources: dict[str, Path], model: Path, tmp_path: Path) -> None:
    rows = val_rows(tmp_path, sources)
    reference, _ = eval_result(sources["folder"] / "val", model)
    body = "".join(f"{p},{c}\n" for p, c in rows)
    files = {
        "bom.csv": "\ufeffpath,label\n" + body,  # Excel's "CSV UTF-8"
        "case.csv": "Path , LABEL\r\n" + body.replace("\n", "\r\n"),
        "semicolons.csv": "path;label\n" + body.replace(",", ";"),
        "tabs.csv": "label\tpath\n" + "".join(f"{c}\t{p}\n" for p, c in rows),
        "bom.jsonl": "\ufeff" + "".join(json.dumps({"path": p, "label": c}) + "\n" for p, c in rows),
        "case.jsonl": "".join(json.dumps({"Path": p, "Label": c}) + "\n" for p, c in rows),
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
        result, err = eval_result(tmp_path / name, model)
        assert (result, err) == (reference, ""), name


def test_image_and_label_column_flags_name_a_label_files_columns(
    sources: dict[str, Path], model: Path, tmp_path: Path
) -> None:
    """--image-column and --label-column apply to CSV and JSONL label files as to data sets (issue 21)."""
    rows = val_rows(tmp_path, sources)
    reference, _ = eval_result(sources["folder"] / "val", model)
    (tmp_path / "named.csv").write_text("Image;kind\n" + "".join(f"{p};{c}\n" for p, c in rows), encoding="utf-8")
    (tmp_path / "named.jsonl").write_text("".join(json.dumps({"img": p, "kind": c}) + "\n" for p, c in rows))
    for name, image in (("named.csv", "image"), ("named.jsonl", "img")):
        args = ["--image-column", image, "--label-column", "kind"]
        code, out, err = run_main("eval", tmp_path / name, "--model", model, "--format", "json", *args)
        assert (code, err) == (0, ""), name
        assert json.loads(out) == reference, name
    code, out, err = run_main("eval", tmp_path / "named.csv", "--model", model, "--image-column", "picture")
    assert (code, out) == (1, "")
    assert err == (
        f"Error: {tmp_path / 'named.csv'}:1: the header has no 'picture' (--image-column) or label column (its "
        "columns, split at semicolons: 'Image', 'kind'); the first row must name the columns: path,label[,split]\n"
    )


def test_header_errors_name_the_columns_found(sources: dict[str, Path], tmp_path: Path) -> None:
    linked(tmp_path, sources)
    bad = tmp_path / "bad.csv"
    bad.write_text("file;class\nfolder/train/red/000.png;red\n")
    assert finetune_error(bad, tmp_path) == (
        f"Error: {bad}:1: the header has no path or label column (its columns, split at semicolons: 'file', "
        "'class'); the first row must name the columns: path,label[,split]\n"
    )
    bad.write_text("path,name\nfolder/train/red/000.png,red\n")
    assert finetune_error(bad, tmp_path) == (
        f"Error: {bad}:1: the header has no label column (its columns: 'path', 'name'); the first row must name "
        "the columns: path,label[,split]\n"
    )
    for empty in (tmp_path / "empty.csv", tmp_path / "empty.jsonl"):
        empty.write_bytes(b"")
        example = "the first row must name the columns: path,label[,split]" if empty.suffix == ".csv" else (
            'write one object a line, e.g. {"path": "a.jpg", "label": "cat"}'
        )  # fmt: skip
        assert finetune_error(empty, tmp_path) == f"Error: {empty}: is empty; {example}\n"
    bad.write_text("\ufeffpath,label\n\n")
    assert finetune_error(bad, tmp_path) == (
        f"Error: {bad}: holds no rows; list one image a row with its path and label\n"
    )


# ----------------------------------------------------------------------------------------------------------
# A field over csv's limit, a stray quote (item 5)


def test_a_huge_field_or_a_stray_quote_names_its_line(sources: dict[str, Path], tmp_path: Path) -> None:
    rows = folder_rows(linked(tmp_path, sources), "train")
    huge = tmp_path / "huge.csv"
    huge.write_text("path,label\n" + "".join(f"{p},{c}\n" for p, c in rows[:2]) + f"{rows[2][0]},{'x' * 140_000}\n")
    assert finetune_error(huge, tmp_path) == (  # no quote in it (review of issue 20: it was blamed on a quote)
        f"Error: {huge}:4: a field runs over 131,072 characters, far longer than a path or label; fix the row or "
        "remove it\n"
    )
    # a stray quote in a big file: the field it opens grows past the limit
    swallowed = tmp_path / "swallowed.csv"
    lines = [f"{p},{c}" for p, c in rows] * 300
    lines[4] = lines[4].replace(",", ',"', 1)
    swallowed.write_text("path,label\n" + "\n".join(lines) + "\n")
    assert finetune_error(swallowed, tmp_path) == (
        f'Error: {swallowed}:6: a field runs over 131,072 characters: a quote (") opened in this row and never '
        "closed swallows the lines after it; close or remove the quote\n"
    )
    # ... or, in a small one, holds the lines after it
    small = tmp_path / "small.csv"
    small.write_text("path,label\n" + "\n".join(lines[:24]) + "\n")
    assert finetune_error(small, tmp_path) == (
        f'Error: {small}:6: the label holds a line break; a quote (") opened in this row is not closed before '
        "the next line: close or remove it\n"
    )


@pytest.mark.parametrize("end", ["\n", ""])
@pytest.mark.parametrize("stray", ['"{path},{label}', '{path},"{label}'])
def test_a_stray_quote_on_the_last_line_is_named_as_a_quote(
    sources: dict[str, Path], tmp_path: Path, stray: str, end: str
) -> None:
    """Review of issue 20: the quote swallows the rest of the row, so it was `no label` (a quote opened on the
    path) or taken as the label (on the label); now the quote is named, as mid-file."""
    rows = folder_rows(linked(tmp_path, sources), "train")
    table = tmp_path / "q.csv"
    last = stray.format(path=rows[2][0], label=rows[2][1])
    table.write_text("path,label\n" + "".join(f"{p},{c}\n" for p, c in rows[:2]) + last + end)
    assert finetune_error(table, tmp_path) == (
        f'Error: {table}:4: a quote (") opened in this row is not closed before the end of the file: close or '
        "remove it\n"
    )


# ----------------------------------------------------------------------------------------------------------
# JSON values (item 9)


@pytest.mark.parametrize(
    ("value", "said"),
    [
        ("0.5", "label 0.5 is a number with a fraction"),
        # review of issue 20: these were all "a number with a fraction"
        ("0.0", "label 0.0 is a number with a decimal point or exponent"),
        ("1e5", "label 100000.0 is a number with a decimal point or exponent"),
        ("NaN", "label NaN is not a number"),
        ("-Infinity", "label -Infinity is an infinite number"),
        ("true", "label true is a boolean"),
        ('[["x"]]', 'label ["x"] is a list'),  # a list of labels is multi-label data; a list in it is refused
        ('{"name": "x"}', 'label {"name": "x"} is an object'),
    ],
)
def test_a_json_label_of_another_type_says_what_it_is(
    value: str, said: str, sources: dict[str, Path], tmp_path: Path
) -> None:
    linked(tmp_path, sources)
    table = tmp_path / "labels.jsonl"
    table.write_text(
        '{"path": "folder/train/red/000.png", "label": "red"}\n'
        f'{{"path": "folder/train/red/001.png", "label": {value}}}\n'
    )
    assert finetune_error(table, tmp_path) == (
        f'Error: {table}:2: {said}; a label is a string or a whole number (e.g. "cat" or 3)\n'
    )


def test_a_null_label_and_a_missing_one(sources: dict[str, Path], tmp_path: Path) -> None:
    linked(tmp_path, sources)
    table = tmp_path / "labels.jsonl"
    table.write_text('{"path": "folder/train/red/000.png", "label": null}\n')
    assert finetune_error(table, tmp_path) == f"Error: {table}:1: label is null; give every row a label\n"
    table.write_text('{"path": 7, "label": "red"}\n')  # review of issue 20: it was read as the path ./7
    assert finetune_error(table, tmp_path) == f"Error: {table}:1: path 7 is a whole number; a path is a string\n"
    table.write_text('{"path": "folder/train/red/000.png", "label": "red", "split": 1}\n')
    assert finetune_error(table, tmp_path) == f"Error: {table}:1: split 1 is a whole number; a split is a string\n"
    table.write_text('{"path": 7.5, "label": "red"}\n')
    assert (
        finetune_error(table, tmp_path)
        == f"Error: {table}:1: path 7.5 is a number with a fraction; a path is a string\n"
    )


# ----------------------------------------------------------------------------------------------------------
# Rows (item 11)


def test_a_row_naming_a_folder_or_a_file_that_is_not_an_image_names_the_row(
    sources: dict[str, Path], model: Path, tmp_path: Path
) -> None:
    rows = val_rows(tmp_path, sources)
    table = write_csv(tmp_path / "labels.csv", [*rows[:1], ("folder/val/red", "red"), *rows[1:]])
    assert eval_error(table, model) == (
        f"Error: {table}:3: {tmp_path}/folder/val/red: is a folder, not an image; list each image in a row of its own\n"
    )
    (tmp_path / "notes.txt").write_text("not an image\n")
    table = write_csv(tmp_path / "labels.csv", [*rows[:1], ("notes.txt", "red"), *rows[1:]])
    assert eval_error(table, model) == (
        f"Error: {table}:3: {tmp_path}/notes.txt: not an image PIL can read (empty, corrupt or another format)\n"
    )
    train = folder_rows(tmp_path, "train")
    table = write_csv(tmp_path / "train.csv", [*train[:1], ("notes.txt", "red"), *train[1:]])
    code, _, err = run_main("finetune", table, "--output", tmp_path / "run", *ARGS, *FAST)
    assert code == 0, err
    assert (
        f"skipped {table}:3: {tmp_path}/notes.txt: not an image PIL can read (empty, corrupt or another format)\n"
        in err
    )
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["skipped"] == [f"{tmp_path}/notes.txt"]


def test_a_label_holding_a_comma_is_named_as_a_label(sources: dict[str, Path], model: Path, tmp_path: Path) -> None:
    rows = val_rows(tmp_path, sources)
    table = tmp_path / "labels.csv"
    table.write_text("path,label\n" + "".join(f'{p},"{c}, dark"\n' if c == "red" else f"{p},{c}\n" for p, c in rows))
    line = 2 + [c for _, c in rows].index("red")  # the first row of the class (review of issue 20: no FILE:LINE)
    assert line > 2
    assert eval_error(table, model) == (
        f"Error: {table}:{line}: class 'red, dark' is not a label of {model} ('blue', 'green', 'red'); label the "
        "rows with the model's labels (the full name, or its first name when unique) or class indices\n"
    )
    jsonl = write_jsonl(tmp_path / "labels.jsonl", [(p, "zebra" if c == "red" else c) for p, c in rows])
    assert eval_error(jsonl, model) == (
        f"Error: {jsonl}:{line - 1}: class 'zebra' is not a label of {model} ('blue', 'green', 'red'); label the "
        "rows with the model's labels (the full name, or its first name when unique) or class indices\n"
    )
    from datasets import Dataset, Features, Image, Value

    named = Features({"image": Image(), "label": Value("string")})
    cells = {"image": [{"bytes": (tmp_path / p).read_bytes(), "path": None} for p, _ in rows]}
    Dataset.from_dict({**cells, "label": ["zebra" if c == "red" else c for _, c in rows]}, features=named).to_parquet(
        tmp_path / "data.parquet"
    )
    assert eval_error(tmp_path / "data.parquet", model) == (
        f"Error: {tmp_path / 'data.parquet'} row {line - 2}: class 'zebra' is not a label of {model} ('blue', "
        "'green', 'red'); label the rows with the model's labels (the full name, or its first name when unique) or "
        "class indices\n"
    )


def test_two_labels_naming_one_class_are_named_by_a_row(sources: dict[str, Path], model: Path, tmp_path: Path) -> None:
    """Review of issue 20: `red` and `2` (red's index) name one class of the model; the error named only the
    file, and now the first row of the second one, as other row errors do."""
    rows = val_rows(tmp_path, sources)
    first = [c for _, c in rows].index("red")
    table = write_csv(tmp_path / "labels.csv", [(p, "2" if i == first else c) for i, (p, c) in enumerate(rows)])
    second = 2 + [c for _, c in rows].index("red", first + 1)  # the first row labelled 'red' (line 1: header)
    assert eval_error(table, model) == (
        f"Error: {table}:{second}: classes '2' and 'red' name the same class (2 'red'); relabel the rows of one\n"
    )


def test_repeated_rows_are_counted_and_an_image_under_two_labels_is_refused(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    train = interleave(folder_rows(linked(tmp_path, sources), "train"))
    val = interleave(folder_rows(tmp_path, "val"))
    rows = [(p, c, "train") for p, c in train] + [(p, c, "val") for p, c in val]
    repeated = [*rows, rows[3], (f"./{rows[5][0]}", rows[5][1], "train"), (rows[0][0], rows[0][1], "val")]
    table = write_csv(tmp_path / "labels.csv", repeated, "path,label,split")
    code, _, err = run_main("finetune", table, "--output", tmp_path / "run", *ARGS, *FAST)
    assert code == 0, err
    assert err.startswith(
        f"{table}: 3 row(s) repeat the image and label of an earlier row (first: line 35 repeats line 5); each row "
        "is used, so those images count more than once\n"
        f"{table}: 1 of them repeat a row of another split (first: line 37, split validation, repeats line 2, "
        "split train): those images are trained on and validated on\n"
    ), err
    plan = json.loads((tmp_path / "run" / "finetune_config.json").read_text())
    assert (plan["train_examples"], plan["val_examples"]) == (26, 10)
    relabelled = [*rows[:7], (rows[2][0], "red" if rows[2][1] != "red" else "blue", "val"), *rows[7:]]
    write_csv(table, relabelled, "path,label,split")
    (tmp_path / "again").mkdir()
    assert finetune_error(table, tmp_path / "again") == (
        f"Error: {table}:9: {rows[2][0]} is labelled {relabelled[7][1]!r} here but {rows[2][1]!r} on line 4; an "
        "image has one label: fix one of the rows or remove it\n"
    )


# ----------------------------------------------------------------------------------------------------------
# A stream, packed (item 12)


def test_the_first_bad_row_is_reported_before_later_rows_are_read(sources: dict[str, Path], tmp_path: Path) -> None:
    rows = folder_rows(linked(tmp_path, sources), "train")
    table = tmp_path / "labels.jsonl"
    table.write_text(
        "".join(json.dumps({"path": p, "label": c}) + "\n" for p, c in rows[:3])
        + json.dumps({"path": "folder/train/red/nope.png", "label": "red"}) + "\n"
        + "".join(json.dumps({"path": p, "label": c}) + "\n" for p, c in rows[3:])
        + "{not json\n"
    )  # fmt: skip
    assert finetune_error(table, tmp_path) == (
        f"Error: {table}:4: {tmp_path}/folder/train/red/nope.png: no such file; fix the path (relative to "
        f"{tmp_path}) or remove the row\n"
    )


def test_rows_are_kept_packed(tmp_path: Path) -> None:
    """40,000 rows cost well under 200 bytes a row at their peak (a dict and an object per row cost over 600)."""
    from bitcli.sources.labelfile import read_label_file

    (tmp_path / "images").mkdir()
    for i in range(200):
        (tmp_path / "images" / f"{i:03d}.png").write_bytes(b"")
    for d in range(200):
        os.symlink("images", tmp_path / f"d{d:03d}")
    table = tmp_path / "labels.csv"
    with open(table, "w") as f:
        f.write("path,label,split\n")
        for d in range(200):
            f.writelines(f"d{d:03d}/{i:03d}.png,class{i % 10},{'train' if d % 5 else 'val'}\n" for i in range(200))
    tracemalloc.start()
    try:
        labels = read_label_file(table)
        ds = labels.scan("train", None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak / 40_000 < 200, peak / 40_000
    from bitcli.sources.rows import RowPath, RowPaths

    assert isinstance(ds.paths, RowPaths) and len(ds) == 32_000
    assert ds.classes == tuple(f"class{i}" for i in range(10))
    first = ds.paths[0]
    assert isinstance(first, RowPath) and (first, first.row) == (f"{tmp_path}/d001/000.png", f"{table}:202")
    assert ds.subset([0, 5]).paths[1] == f"{tmp_path}/d001/050.png"  # class0 rows, in file order
