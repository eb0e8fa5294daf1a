"""Each bad input is one line naming its row (file:line, or the shard and row), with the fix; few-shot,
--val-split and resume work on a parquet source as on a folder."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import torch
from conftest import run_main
from finetune.helpers import FAST, read_weights

from bitcli.finetune import rundir

from .conftest import CLASSES, folder_rows, image_dataset

ARGS = ["--steps", "2", "--batch-size", "4", "--eval-every", "0", *FAST]


def finetune_error(data: object, tmp_path: Path, *flags: object) -> str:
    code, stdout, err = run_main("finetune", data, "--output", tmp_path / "run", *ARGS, *flags)
    assert (code, stdout) == (1, ""), err
    assert err.count("\n") == 1, err  # one line
    assert not (tmp_path / "run").exists()
    return err


def test_label_file_rows(sources: dict[str, Path], tmp_path: Path) -> None:
    root = sources["csv"].parent
    lines = sources["csv"].read_text().splitlines()
    bad = tmp_path / "missing.csv"
    bad.write_text("\n".join([lines[0], lines[1], "folder/train/red/nope.png,red,train", *lines[2:]]) + "\n")
    bad.with_name("folder").symlink_to(root / "folder")
    assert finetune_error(bad, tmp_path) == (
        f"Error: {bad}:3: {tmp_path}/folder/train/red/nope.png: no such file; fix the path (relative to {tmp_path}) or remove the row\n"
    )
    bad.write_text("\n".join([lines[0], lines[1].replace(",train", ",holdout")]) + "\n")
    assert (
        finetune_error(bad, tmp_path)
        == f"Error: {bad}:2: unknown split 'holdout'; use train, val or test (or leave the split column out)\n"
    )
    jsonl = tmp_path / "labels.jsonl"
    jsonl.write_text('{"path": "folder/train/red/000.png", "label": "red"}\n{"path": "folder/train/red/001.png"}\n')
    assert finetune_error(jsonl, tmp_path) == f"Error: {jsonl}:2: no label (each row needs path and label)\n"
    bad.write_text("file,label\nfolder/train/red/000.png,red\n")
    assert finetune_error(bad, tmp_path) == (
        f"Error: {bad}:1: the header has no path column (its columns: 'file', 'label'); the first row must name the "
        "columns: path,label[,split]\n"
    )


def test_parquet_rows_and_columns(sources: dict[str, Path], tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = sources["csv"].parent
    rows = folder_rows(root, "train")
    two = [r for r in rows if r[1] != "red"]  # a ClassLabel of 3 names, no row of "red"
    empty = tmp_path / "empty_class.parquet"
    image_dataset(root, two).to_parquet(empty)
    assert finetune_error(empty, tmp_path) == (
        f"Error: {empty}: class 'red' (ClassLabel index 2) has no rows; every class needs examples: add rows of it, "
        "or name another label column with --label-column\n"
    )
    no_image = tmp_path / "no_image.parquet"
    pq.write_table(pa.table({"n": list(range(len(rows))), "label": [c for _, c in rows]}), no_image)
    assert finetune_error(no_image, tmp_path) == (
        f"Error: {no_image}: no image column (an Image feature); name it with --image-column (columns: n, label)\n"
    )
    assert finetune_error(no_image, tmp_path, "--image-column", "n") == (
        f"Error: {no_image}: column 'n' holds int64, not images; name the image column with --image-column\n"
    )
    # Paths in a string column (relative to the parquet file) with --image-column: the folder's weights.
    paths = tmp_path / "paths.parquet"
    pq.write_table(pa.table({"file": [p for p, _ in rows], "label": [c for _, c in rows]}), paths)
    (tmp_path / "folder").symlink_to(root / "folder")
    code, _, err = run_main("finetune", paths, "--output", tmp_path / "a", *ARGS, "--image-column", "file")
    assert code == 0, err
    code, _, err = run_main("finetune", root / "folder" / "train", "--output", tmp_path / "b", *ARGS)
    assert code == 0, err
    a, b = read_weights(tmp_path / "a" / "model.safetensors"), read_weights(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    code, _, err = run_main(
        "finetune", sources["parquet"], "--output", tmp_path / "run", *ARGS, "--image-column", "picture"
    )
    assert (
        code == 2
        and err
        == f"Error: --image-column picture: {sources['parquet']}:train has no such column (columns: image, label)\n"
    )


def test_unreadable_image_cell_is_skipped_in_training_and_named_in_eval(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    """A cell that is not an image: finetune skips it before step 0 and names the row; eval stops naming it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(next((sources["parquet"] / "data").glob("train-00001-*")))
    images = table.column("image").to_pylist()
    images[5] = {"bytes": b"not an image", "path": None}
    broken = tmp_path / "broken.parquet"
    pq.write_table(
        table.set_column(0, "image", pa.array(images, type=table.schema.field("image").type)).replace_schema_metadata(
            table.schema.metadata
        ),
        broken,
    )
    code, _, err = run_main("finetune", broken, "--output", tmp_path / "run", *ARGS)
    assert code == 0, err
    line = f"skipped {broken} row 5: not an image PIL can read (empty, corrupt or another format)\n"
    assert line in err
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["skipped"] == [f"{broken} row 5"]
    code, _, err = run_main("eval", broken, "--model", tmp_path / "run")
    assert code == 1 and err.endswith(
        f"Error: {broken} row 5: not an image PIL can read (empty, corrupt or another format)\n"
    ), err


def test_without_pyarrow_one_line_names_the_extra(sources: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pyarrow" else real(name, *a))
    assert finetune_error(sources["parquet"], tmp_path) == (
        f"Error: reading {sources['parquet']} needs pyarrow, which is not installed: pip install 'bitcli[datasets]'\n"
    )


def test_val_split_on_parquet_is_the_folder_s_and_shots_take_k_per_class(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    train_shards = sources["parquet"] / "data"
    only_train = tmp_path / "train_only"
    only_train.mkdir()
    for shard in train_shards.glob("train-*"):
        (only_train / shard.name).symlink_to(shard)
    code, _, err = run_main(
        "finetune", sources["folder"] / "train", "--output", tmp_path / "a", *ARGS, "--val-split", "0.25"
    )
    assert code == 0, err
    code, _, err = run_main("finetune", only_train, "--output", tmp_path / "b", *ARGS, "--val-split", "0.25")
    assert code == 0, err
    a, b = read_weights(tmp_path / "a" / "model.safetensors"), read_weights(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["val_examples"] == 6  # 2 of every class

    shots = [run_main("finetune", only_train, "--output", tmp_path / f"s{i}", *ARGS, "--shots", "3") for i in range(2)]
    assert all(code == 0 for code, _, _ in shots), shots
    plans = [json.loads((tmp_path / f"s{i}" / "finetune_config.json").read_text()) for i in range(2)]
    assert plans[0]["train_examples"] == 9 and plans[0]["train_fingerprint"] == plans[1]["train_fingerprint"]


def test_resume_refuses_a_changed_parquet_source(sources: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    data = tmp_path / "data.parquet"
    root = sources["csv"].parent
    rows = folder_rows(root, "train")
    image_dataset(root, rows).to_parquet(data)
    args = [
        "finetune",
        data,
        "--output",
        tmp_path / "run",
        "--steps",
        "4",
        "--save-every",
        "1",
        "--batch-size",
        "4",
        *FAST,
    ]
    real_write = rundir.MetricsLog.write

    def interrupt(self, record: dict) -> None:
        if record["step"] == 2:
            raise KeyboardInterrupt
        real_write(self, record)

    monkeypatch.setattr(rundir.MetricsLog, "write", interrupt)
    assert run_main(*args)[0] == 130
    monkeypatch.setattr(rundir.MetricsLog, "write", real_write)
    image_dataset(root, [*rows[:-1], (rows[-1][0], CLASSES[0])]).to_parquet(data)  # one row relabelled
    code, _, err = run_main(*args, "--resume")
    assert code == 1 and re.fullmatch(
        rf"Error: --resume: the training data of {re.escape(str(tmp_path / 'run'))} changed since the run started "
        r"\(train_fingerprint [0-9a-f]{12}\.\.\. -> [0-9a-f]{12}\.\.\.\): restore the images and labels it started "
        r"with \(and its --val-split, if any\), or pass --overwrite to start again\n",
        err,
    ), err
