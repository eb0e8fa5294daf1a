"""Splits and class order alike in every source: an unsplit source has no validation set (issue 20, item 1),
integer labels are ordered by number (item 2), FILE:SPLIT names a split of a label file, parquet or
save_to_disk folder (item 10), and a save_to_disk folder's JSON files cannot name files outside it (item 14)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_main, write_folder
from finetune.helpers import FAST, read_weights

from .conftest import folder_rows, interleave, linked, write_csv, write_jsonl

ARGS = ["--steps", "1", "--batch-size", "4", "--eval-every", "0", *FAST]
UNSPLIT = ["folder", "csv", "jsonl", "parquet", "saved"]


def unsplit(kind: str, sources: dict[str, Path], tmp_path: Path) -> Path:
    """The 24 training images of the sources, as one source of `kind` without splits."""
    root = sources["csv"].parent
    rows = interleave(folder_rows(root, "train"))
    if kind == "folder":
        return sources["folder"] / "train"
    if kind == "csv":
        return write_csv(linked(tmp_path, sources) / "plain.csv", rows)
    if kind == "jsonl":
        return write_jsonl(linked(tmp_path, sources) / "plain.jsonl", rows)
    from .conftest import image_dataset

    if kind == "parquet":
        image_dataset(root, rows).to_parquet(tmp_path / "plain.parquet")
        return tmp_path / "plain.parquet"
    image_dataset(root, rows).save_to_disk(tmp_path / "saved")
    return tmp_path / "saved"


def plan_of(run: Path) -> dict:
    return json.loads((run / "finetune_config.json").read_text())


@pytest.mark.parametrize("kind", UNSPLIT)
def test_an_unsplit_source_has_no_validation_set_and_val_split_holds_one_out(
    kind: str, sources: dict[str, Path], tmp_path: Path
) -> None:
    data = unsplit(kind, sources, tmp_path)
    code, _, err = run_main("finetune", data, "--output", tmp_path / "a", *ARGS)
    assert code == 0, err
    assert "\n  validation  none (pass --val DIR or --val-split F)\n" in err
    plan = plan_of(tmp_path / "a")
    assert (plan["train_examples"], plan["val_examples"], plan["validation"]) == (24, 0, None)
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["val_examples"] == 0

    code, _, err = run_main("finetune", data, "--output", tmp_path / "b", *ARGS, "--val-split", "0.25")
    assert code == 0, err
    plan = plan_of(tmp_path / "b")
    assert (plan["train_examples"], plan["val_examples"]) == (18, 6)
    assert plan["validation"] == f"0.25 of every class of {data} (seed 0)"


# ----------------------------------------------------------------------------------------------------------
# Integer labels


NUMBERS = [str(n) for n in range(12)]


@pytest.fixture(scope="module")
def numbered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Classes 0..11, two images each, as a class folder, a CSV, a JSONL, a parquet file whose label column
    holds integers (no ClassLabel) and a save_to_disk folder of the same; rows mixed across classes."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset, Features, Image, Value

    root = tmp_path_factory.mktemp("numbered")
    write_folder(root / "digits", dict.fromkeys(NUMBERS, 2))
    rows = [(f"digits/{n}/{i:03d}.png", n) for i in range(2) for n in reversed(NUMBERS)]
    images = [(root / p).read_bytes() for p, _ in rows]
    pq.write_table(pa.table({"image": images, "label": [int(n) for _, n in rows]}), root / "digits.parquet")
    Dataset.from_dict(
        {"image": [{"bytes": b, "path": None} for b in images], "label": [int(n) for _, n in rows]},
        features=Features({"image": Image(), "label": Value("int64")}),
    ).save_to_disk(root / "saved")
    return {
        "folder": root / "digits", "csv": write_csv(root / "digits.csv", rows),
        "jsonl": write_jsonl(root / "digits.jsonl", [(p, int(n)) for p, n in rows]),  # JSON numbers
        "parquet": root / "digits.parquet", "saved": root / "saved",
    }  # fmt: skip


def test_integer_labels_are_ordered_by_number_and_train_the_same_model_in_every_source(
    numbered: dict[str, Path], tmp_path: Path
) -> None:
    weights = {}
    for kind, data in numbered.items():
        code, _, err = run_main("finetune", data, "--output", tmp_path / kind, "--steps", "2", "--batch-size", "8",
                                "--eval-every", "0", *FAST)  # fmt: skip
        assert code == 0, err
        assert plan_of(tmp_path / kind)["classes"] == NUMBERS, kind
        config = json.loads((tmp_path / kind / "config.json").read_text())
        assert config["id2label"] == {n: n for n in NUMBERS}, kind
        weights[kind] = read_weights(tmp_path / kind / "model.safetensors")
    for kind, theirs in weights.items():
        assert all(torch.equal(weights["folder"][k], theirs[k]) for k in theirs), f"{kind} trained other weights"


# ----------------------------------------------------------------------------------------------------------
# FILE:SPLIT


def eval_json(data: object, model: Path) -> dict:
    code, out, err = run_main("eval", data, "--model", model, "--format", "json")
    assert code == 0, err
    return json.loads(out)


def test_file_split_evaluates_that_split_of_a_label_file(sources: dict[str, Path], model: Path, tmp_path: Path) -> None:
    """Rows marked test are evaluated as `FILE:test`; `bit eval FILE` says how to reach them."""
    root = sources["csv"].parent
    rows = [(p, c, "train") for p, c in folder_rows(root, "train")] + [
        (p, c, "test") for p, c in folder_rows(root, "val")
    ]
    linked(tmp_path, sources)
    reference = eval_json(sources["folder"] / "val", model)
    for table in (write_csv(tmp_path / "t.csv", rows, "path,label,split"),
                  write_jsonl(tmp_path / "t.jsonl", rows, ("path", "label", "split"))):  # fmt: skip
        code, out, err = run_main("eval", table, "--model", model)
        assert (code, out) == (1, ""), err
        assert err == (
            f"Error: {table}: has train rows but no val rows; mark the rows to evaluate with split val, or name "
            f"the split to evaluate ({table}:test)\n"
        )
        result = eval_json(f"{table}:test", model)
        assert result["count"] == 9
        assert result == reference
        assert eval_json(f"{table}:train", model)["count"] == 24
        code, _, err = run_main("eval", f"{table}:validation", "--model", model)
        assert (code, err) == (1, f"Error: {table}: no row has split 'validation' (splits: train, test)\n")
    # --val FILE:SPLIT validates on those rows
    code, _, err = run_main("finetune", sources["folder"] / "train", "--output", tmp_path / "run", *ARGS,
                            "--val", f"{tmp_path / 't.csv'}:test")  # fmt: skip
    assert code == 0, err
    assert plan_of(tmp_path / "run")["val_examples"] == 9
    assert f"\n  validation  9 images ({tmp_path / 't.csv'} (split test))\n" in err
    # without a split column, every row is evaluated; FILE:SPLIT says there are no splits
    plain = write_csv(tmp_path / "plain.csv", [r[:2] for r in rows])
    assert eval_json(plain, model)["count"] == 33
    code, _, err = run_main("eval", f"{plain}:test", "--model", model)
    assert (code, err) == (
        1,
        f"Error: {plain}: has no split column, so no split 'test'; pass {plain} to use every row\n",
    )


def test_file_split_of_parquet_and_save_to_disk(sources: dict[str, Path], model: Path, tmp_path: Path) -> None:
    reference = eval_json(sources["folder"] / "val", model)
    for data in (sources["parquet"], sources["saved"]):
        for split in ("validation", "val"):
            assert eval_json(f"{data}:{split}", model) == reference
        assert eval_json(f"{data}:train", model)["count"] == 24
        code, _, err = run_main("eval", f"{data}:test", "--model", model)
        assert (code, err) == (1, f"Error: {data}: has no split 'test' (splits: train, validation)\n")
    # shards named val-*: `:val` is their split, as `:validation` is
    (tmp_path / "pq").mkdir()
    for shard in (sources["parquet"] / "data").iterdir():
        (tmp_path / "pq" / shard.name.replace("validation-", "val-")).symlink_to(shard)
    assert eval_json(f"{tmp_path / 'pq'}:val", model) == reference
    # a parquet file has no splits
    code, _, err = run_main("eval", f"{sources['val_parquet']}:test", "--model", model)
    assert (code, err) == (1, (
        f"Error: {sources['val_parquet']}: has no splits (shard names or a DatasetDict give them), so no split "
        f"'test'; pass {sources['val_parquet']} to use every row\n"
    ))  # fmt: skip


def test_a_path_holding_a_colon_is_taken_as_it_is(sources: dict[str, Path], model: Path, tmp_path: Path) -> None:
    (tmp_path / "a:val").symlink_to(sources["folder"] / "val")
    assert eval_json(tmp_path / "a:val", model)["count"] == 9
    colon = linked(tmp_path / "x:y", sources) if (tmp_path / "x:y").mkdir() is None else None
    table = write_csv(colon / "t.csv", [(p, c, "val") for p, c in folder_rows(colon, "val")], "path,label,split")
    assert eval_json(f"{table}:val", model)["count"] == 9  # the split val of x:y/t.csv


# ----------------------------------------------------------------------------------------------------------
# save_to_disk's JSON files


def test_save_to_disk_names_stay_inside_the_folder(sources: dict[str, Path], tmp_path: Path) -> None:
    saved = tmp_path / "saved"
    shutil.copytree(sources["saved"], saved)
    outside = tmp_path / "outside"
    shutil.copytree(sources["saved"] / "train", outside)
    state = json.loads((saved / "train" / "state.json").read_text())
    escaped = dict(state, _data_files=[{"filename": str(outside / state["_data_files"][0]["filename"])}])
    (saved / "train" / "state.json").write_text(json.dumps(escaped))
    name = json.dumps(escaped["_data_files"][0]["filename"])
    code, out, err = run_main("finetune", saved, "--output", tmp_path / "run", *ARGS)
    assert (code, out) == (1, "")
    assert err == (
        f"Error: {saved}/train/state.json: data file {name} is not a name inside the folder; save the data set "
        "again with save_to_disk\n"
    )
    assert not (tmp_path / "run").exists()
    (saved / "train" / "state.json").write_text(json.dumps(state))
    (saved / "dataset_dict.json").write_text(json.dumps({"splits": ["../outside", "validation"]}))
    code, out, err = run_main("eval", saved, "--model", tmp_path / "unused")
    assert (code, err) == (1, (
        f'Error: {saved}/dataset_dict.json: split "../outside" is not a name inside the folder; save the data set '
        "again with save_to_disk\n"
    ))  # fmt: skip


def _damaged(saved: Path, name: str, change) -> None:
    data = json.loads((saved / name).read_text())
    change(data)
    (saved / name).write_text(json.dumps(data))


@pytest.mark.parametrize(
    "name, change, message",
    [
        ("dataset_dict.json", lambda d: d.update(splits=[]), "dataset_dict.json: lists no splits"),
        ("dataset_dict.json", lambda d: d.update(splits=None), "dataset_dict.json: lists no splits"),
        ("dataset_dict.json", lambda d: d.update(splits="train"), "dataset_dict.json: 'splits' is not a list of split names"),
        ("train/state.json", lambda d: d.update(_data_files=5), "train/state.json: '_data_files' is not a list of data files"),
        ("train/state.json", lambda d: d.update(_data_files=True), "train/state.json: '_data_files' is not a list of data files"),
        ("train/state.json", lambda d: d.update(_data_files=["x.arrow"]),
         'train/state.json: data file entry "x.arrow" is not an object with a filename'),
        ("train/dataset_info.json", lambda d: d["features"]["label"].update(names=12),
         "train/dataset_info.json: the ClassLabel names of column 'label' are 12, not a list of class names"),
        ("train/dataset_info.json", lambda d: d["features"]["label"].update(names="abc"),
         "train/dataset_info.json: the ClassLabel names of column 'label' are \"abc\", not a list of class names"),
        ("train/dataset_info.json", lambda d: d["features"]["label"].update(names=["a"] * 12),
         "train/dataset_info.json: the ClassLabel of column 'label' names class 'a' twice"),
    ],
    ids=["no-splits", "null-splits", "splits-text", "data-files-number", "data-files-true", "data-file-text",
         "names-number", "names-text", "names-repeated"],
)  # fmt: skip
def test_damaged_save_to_disk_metadata_is_one_line(
    sources: dict[str, Path], tmp_path: Path, name: str, change, message: str
) -> None:
    """Review of issue 20: each was an internal error (TypeError, IndexError in eval; exit 3), or for names "abc"
    three classes a, b, c and for ["a"] * 12 a head of twelve classes all named 'a'."""
    saved = tmp_path / "saved"
    shutil.copytree(sources["saved"], saved)
    _damaged(saved, name, change)
    line = f"Error: {saved}/{message}; save the data set again with save_to_disk\n"
    code, out, err = run_main("eval", saved, "--model", tmp_path / "unused")
    assert (code, out, err) == (1, "", line)
    code, out, err = run_main("finetune", saved, "--output", tmp_path / "run", *ARGS)
    assert (code, out, err) == (1, "", line)
    assert not (tmp_path / "run").exists()


def test_a_parquet_file_s_class_names_must_be_distinct_strings(sources: dict[str, Path], tmp_path: Path) -> None:
    """The features a parquet file's schema carries are checked as dataset_info.json's are."""
    import pyarrow.parquet as pq

    table = pq.read_table(sources["val_parquet"])
    meta = json.loads(table.schema.metadata[b"huggingface"])
    meta["info"]["features"]["label"]["names"] = ["red", "red", "blue"]
    bad = tmp_path / "bad.parquet"
    pq.write_table(table.replace_schema_metadata({b"huggingface": json.dumps(meta).encode()}), bad)
    code, out, err = run_main("eval", bad, "--model", tmp_path / "unused")
    assert (code, out, err) == (1, "", (
        f"Error: {bad}: the ClassLabel of column 'label' names class 'red' twice; write the data set again with "
        "datasets, or name another --label-column\n"
    ))  # fmt: skip


def test_eval_picks_the_validation_split_by_one_rule_in_every_source(
    sources: dict[str, Path], model: Path, tmp_path: Path
) -> None:
    """Review of issue 20: a label file with val and test rows (no train rows) evaluated every row, test rows
    too, while a DatasetDict of validation and test evaluates validation only. Now both evaluate the
    validation split (and say so), and a source of test rows alone is evaluated whole."""
    root = sources["csv"].parent
    val = [(p, c, "val") for p, c in folder_rows(root, "val")]
    test = [(p, c, "test") for p, c in folder_rows(root, "train")]
    linked(tmp_path, sources)
    reference = eval_json(sources["folder"] / "val", model)
    table = write_csv(tmp_path / "vt.csv", val + test, "path,label,split")
    jsonl = write_jsonl(tmp_path / "vt.jsonl", val + test, ("path", "label", "split"))
    from .conftest import image_dataset

    dataset_rows = [(p, c) for p, c, _ in val]
    from datasets import DatasetDict

    DatasetDict(
        {"validation": image_dataset(root, dataset_rows), "test": image_dataset(root, dataset_rows * 3)}
    ).save_to_disk(tmp_path / "vt_saved")
    for data, part in ((table, f"{table} (split validation)"), (jsonl, f"{jsonl} (split validation)"),
                       (tmp_path / "vt_saved", f"{tmp_path / 'vt_saved'}:validation")):  # fmt: skip
        code, out, err = run_main("eval", data, "--model", model, "--format", "json")
        assert (code, err) == (0, f"evaluating the validation split {part}\n"), data
        assert json.loads(out) == reference, data
    # test rows alone: the only split, evaluated whole (as DATA/test alone is)
    only = write_csv(tmp_path / "t.csv", test, "path,label,split")
    code, out, err = run_main("eval", only, "--model", model, "--format", "json")
    assert (code, err, json.loads(out)["count"]) == (0, "", 24)


def test_validating_on_the_training_data_is_warned_about(sources: dict[str, Path], tmp_path: Path) -> None:
    """Review of issue 20: `finetune labels.csv --val labels.csv` validated on the training rows without a word.
    It is allowed (it shows that training runs) with one warning; the validation split of the same file is
    other rows, and no warning."""
    from bitcli.sources.features import Columns
    from bitcli.sources.locate import training_parts, validation_part

    data = unsplit("csv", sources, tmp_path)
    code, _, err = run_main("finetune", data, "--val", tmp_path / "." / data.name, "--output", tmp_path / "run", *ARGS)
    assert code == 0, err
    warning = (
        f"warning: --val {tmp_path / data.name}: validates on the training data ({data}), so its accuracy says "
        "nothing about new images; pass the rows held out for validation\n"
    )
    assert err.count("warning: --val") == 1 and warning in err
    assert plan_of(tmp_path / "run")["val_examples"] == 24
    columns = Columns()
    for train_data, val_data, same in [
        (sources["csv"], sources["csv"], False),  # train rows, then the val rows of the same file
        (sources["csv"], f"{sources['csv']}:train", True),
        (sources["folder"], sources["folder"] / "train", True),
        (sources["folder"], sources["folder"] / "val", False),
        (sources["saved"], f"{sources['saved']}:train", True),
        (sources["saved"], sources["saved"], False),
    ]:
        train, _ = training_parts(train_data, columns)
        assert validation_part(val_data, columns).same_rows(train) is same, (train_data, val_data)


def test_a_file_named_like_file_split_says_how_to_reach_the_split(
    sources: dict[str, Path], model: Path, tmp_path: Path
) -> None:
    """Review of issue 20: with a file `t.csv:test` beside `t.csv`, `t.csv:test` is that file, and the error
    said only that it is a file and to pass a label file (.csv ...), which it looked like."""
    root = sources["csv"].parent
    rows = [(p, c, "train") for p, c in folder_rows(root, "train")] + [
        (p, c, "test") for p, c in folder_rows(root, "val")
    ]
    table = write_csv(linked(tmp_path, sources) / "t.csv", rows, "path,label,split")
    (tmp_path / "t.csv:test").write_text("notes\n")
    code, out, err = run_main("eval", f"{table}:test", "--model", model)
    assert (code, out, err) == (1, "", (
        f"Error: {table}:test: is a file of that whole name, so it is not read as split 'test' of {table} (a path "
        f"that exists is taken as it is), and it is no data source; to use that split, rename or move {table}:test, "
        f"or spell the split in another case ({table}:TEST)\n"
    ))  # fmt: skip
    assert eval_json(f"{table}:TEST", model)["count"] == 9  # as the hint says
    (tmp_path / "plain:test").write_text("notes\n")  # no data source before the ':': the error as before
    code, _, err = run_main("eval", tmp_path / "plain:test", "--model", model)
    assert (code, err) == (1, (
        f"Error: {tmp_path / 'plain:test'}: is a file; pass a class folder, a label file (.csv, .jsonl), a .parquet "
        "file or hf://datasets/OWNER/NAME\n"
    ))  # fmt: skip
