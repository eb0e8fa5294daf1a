"""`bit eval --report` on every source: the same rows give the same report as the class folder (the same numbers
in the CSV files, the same pictures), with each image named as its source names it."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from conftest import run_main

from sources.conftest import folder_rows, interleave

KINDS = ["csv", "parquet", "saved"]


def report_of(data: Path, model: Path, folder: Path) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    code, _, err = run_main("eval", data, "--model", model, "--report", folder, "-f", "json")
    assert code == 0, err
    read = [
        list(csv.DictReader(open(folder / name, newline="", encoding="utf-8")))
        for name in ("predictions.csv", "errors.csv")
    ]
    return read[0], read[1]


@pytest.fixture(scope="module")
def reference(sources: dict[str, Path], model: Path, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("reports") / "folder"
    return folder, *report_of(sources["folder"], model, folder)


@pytest.mark.parametrize("kind", KINDS)
def test_every_source_gives_the_folder_s_report(reference, sources: dict[str, Path], model: Path, kind: str,
                                                tmp_path: Path) -> None:  # fmt: skip
    folder, predictions, errors = reference
    assert len(predictions) == 9 and errors, "the model makes no error: nothing to compare"
    ours, our_errors = report_of(sources[kind], model, tmp_path / kind)
    # predictions.csv lists the images in the source's own order: these rows interleave the classes, where the
    # class folder (and the evaluation) groups them by class
    by_path = {r["path"]: r for r in predictions}
    listed = [by_path[str(sources["folder"].parent / p)] for p, _ in interleave(folder_rows(sources["folder"].parent,
                                                                                            "val"))]  # fmt: skip
    assert [r["path"] for r in listed] != [r["path"] for r in predictions]
    without_path = [{k: v for k, v in r.items() if k != "path"} for r in listed]
    assert [{k: v for k, v in r.items() if k != "path"} for r in ours] == without_path
    assert len(our_errors) == len(errors)
    if kind == "csv":  # a label file names each image by its file
        assert [r["path"] for r in ours] == [r["path"] for r in listed]
    else:  # rows of a data set by their row, in row order
        (shard,) = {r["path"].rpartition(" row ")[0] for r in ours}  # the validation split's one file
        assert [r["path"] for r in ours] == [f"{shard} row {i}" for i in range(9)]
    pictures = sorted(p.name for p in (folder / "images").iterdir())
    assert sorted(p.name for p in (tmp_path / kind / "images").iterdir()) == pictures
    for name in pictures:  # the same images, decoded from the files or from the parquet cells
        assert (tmp_path / kind / "images" / name).read_bytes() == (folder / "images" / name).read_bytes()
