"""Split names have one table (bitcli.sources.splits): every source maps the same name to the same split, in
any case. `dev` is validation everywhere (it was refused in a label file's split column and as a folder), as
Hugging Face `datasets` reads it; `eval` and `evaluation` are test, `training` is train."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import run_main
from finetune.helpers import FAST

from bitcli.sources.folder import find_splits
from bitcli.sources.hub import parse
from bitcli.sources.labelfile import read_label_file
from bitcli.sources.parquet import split_of

from .conftest import folder_rows, linked, write_csv

# Written out here, not read from the table: what each name means is the behaviour under test.
NAMES = {
    "train": "train", "training": "train",
    "val": "validation", "valid": "validation", "validation": "validation", "dev": "validation",
    "test": "test", "testing": "test", "eval": "test", "evaluation": "test",
}  # fmt: skip
ARGS = ["--steps", "1", "--batch-size", "4", "--eval-every", "0", *FAST]


def spellings(name: str) -> list[str]:
    return [name, name.upper(), name.capitalize()]


@pytest.mark.parametrize("name", NAMES)
def test_every_source_maps_a_split_name_alike(name: str, tmp_path: Path) -> None:
    split = NAMES[name]
    (tmp_path / "a.png").write_bytes(b"")  # the label file checks that the image exists, not its bytes
    for i, spelling in enumerate(spellings(name)):
        # a label file's split column, and FILE:SPLIT of it
        table = write_csv(tmp_path / f"t{i}.csv", [("a.png", "cat", spelling)], "path,label,split")
        labels = read_label_file(table)
        assert labels.splits == {split}, spelling
        assert labels.key(spelling) == split, spelling
        # parquet shard and folder names
        assert split_of(f"data/{spelling}-00000-of-00001.parquet") == split, spelling
        assert split_of(f"{spelling}/0000.parquet") == split, spelling
        # hf://datasets/OWNER/NAME:SPLIT (and FILE:SPLIT of a parquet folder or save_to_disk folder, alike)
        assert parse(f"hf://datasets/o/n:{spelling}").key == split, spelling


@pytest.mark.parametrize("name", NAMES)
def test_class_folders_take_the_same_split_names(name: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / name).mkdir(parents=True)
    split = NAMES[name]
    if split == "train":
        (data / "val").mkdir()
        assert find_splits(data) == (data / name, data / "val")
    elif split == "validation":
        (data / "train").mkdir()
        assert find_splits(data) == (data / "train", data / name)
    else:  # a test folder is not validation data
        (data / "train").mkdir()
        assert find_splits(data) == (data / "train", None)
    upper = tmp_path / "upper"
    (upper / name.upper()).mkdir(parents=True)
    (upper / ("TRAIN" if split != "train" else "VAL")).mkdir()
    train, val = find_splits(upper)
    assert (train.name, val.name if val else None) == {
        "train": (name.upper(), "VAL"), "validation": ("TRAIN", name.upper()), "test": ("TRAIN", None),
    }[split]  # fmt: skip


def test_a_folder_with_two_validation_folders_takes_the_first_named(tmp_path: Path) -> None:
    for name in ("train", "dev", "validation", "valid", "val"):
        (tmp_path / name).mkdir()
    assert find_splits(tmp_path) == (tmp_path / "train", tmp_path / "val")
    (tmp_path / "val").rmdir()
    assert find_splits(tmp_path) == (tmp_path / "train", tmp_path / "valid")
    (tmp_path / "valid").rmdir()
    assert find_splits(tmp_path) == (tmp_path / "train", tmp_path / "validation")
    (tmp_path / "validation").rmdir()
    assert find_splits(tmp_path) == (tmp_path / "train", tmp_path / "dev")


def eval_json(data: object, model: Path) -> dict:
    code, out, err = run_main("eval", data, "--model", model, "--format", "json")
    assert code == 0, err
    return json.loads(out)


def test_dev_is_the_validation_split_of_every_source(sources: dict[str, Path], model: Path, tmp_path: Path) -> None:
    """`bit eval DATA` evaluates the dev part of each source, as it evaluates val/ of the class folders."""
    reference = eval_json(sources["folder"] / "val", model)
    root = sources["csv"].parent
    folder = tmp_path / "classes"
    folder.mkdir()
    (folder / "train").symlink_to(sources["folder"] / "train")
    (folder / "dev").symlink_to(sources["folder"] / "val")
    rows = [(p, c, "train") for p, c in folder_rows(root, "train")]
    rows += [(p, c, "dev") for p, c in folder_rows(root, "val")]
    table = write_csv(linked(tmp_path, sources) / "t.csv", rows, "path,label,split")
    parquet = tmp_path / "pq"
    parquet.mkdir()
    for shard in (sources["parquet"] / "data").iterdir():
        (parquet / shard.name.replace("validation-", "dev-")).symlink_to(shard)
    saved = tmp_path / "saved"
    shutil.copytree(sources["saved"], saved)
    (saved / "validation").rename(saved / "dev")
    (saved / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "dev"]}))
    for data in (folder, table, parquet, saved):
        assert eval_json(data, model) == reference, data
    for data in (table, parquet, saved):  # FILE:SPLIT (a class folder's split is its own folder)
        assert eval_json(f"{data}:dev", model) == reference, data
    # and a run validates on it
    for data in (folder, table):
        run = tmp_path / f"run-{data.name}"
        code, _, err = run_main("finetune", data, "--output", run, *ARGS)
        assert code == 0, err
        assert json.loads((run / "finetune_config.json").read_text())["val_examples"] == 9, data
