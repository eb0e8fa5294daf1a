"""One small three-class data set written as every source: class folders, CSV, JSONL, parquet shards, a
save_to_disk folder; the same images with the same labels, in the same order within each class."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import write_folder

CLASSES = ["blue", "green", "red"]


def folder_rows(root: Path, split: str) -> list[tuple[str, str]]:
    """(path relative to root, class) of a class folder split, in the folder's order."""
    return [
        (p.relative_to(root).as_posix(), c) for c in CLASSES for p in sorted((root / "folder" / split / c).iterdir())
    ]


def interleave(rows: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Rows of all classes mixed (round robin), each class's rows still in order: a source's row order."""
    by_class = [[r for r in rows if r[1] == c] for c in CLASSES]
    return [r for group in zip(*by_class) for r in group]


def image_dataset(root: Path, rows: list[tuple[str, str]]):
    from datasets import ClassLabel, Dataset, Features, Image

    features = Features({"image": Image(), "label": ClassLabel(names=CLASSES)})
    return Dataset.from_dict(
        {
            "image": [{"bytes": (root / p).read_bytes(), "path": None} for p, _ in rows],
            "label": [CLASSES.index(c) for _, c in rows],
        },
        features=features,
    )


@pytest.fixture(scope="session")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    write_folder(root / "folder" / "train", {"red": 8, "green": 8, "blue": 8})
    write_folder(root / "folder" / "val", {"red": 3, "green": 3, "blue": 3}, seed=1)
    train, val = interleave(folder_rows(root, "train")), interleave(folder_rows(root, "val"))
    labelled = [(p, c, "train") for p, c in train] + [(p, c, "val") for p, c in val]
    (root / "labels.csv").write_text("path,label,split\n" + "".join(f"{p},{c},{s}\n" for p, c, s in labelled))
    (root / "labels.jsonl").write_text(
        "".join(json.dumps({"path": p, "label": c, "split": s}) + "\n" for p, c, s in labelled)
    )
    half = len(train) // 2
    (root / "parquet" / "data").mkdir(parents=True)
    image_dataset(root, train[:half]).to_parquet(root / "parquet" / "data" / "train-00000-of-00002.parquet")
    image_dataset(root, train[half:]).to_parquet(root / "parquet" / "data" / "train-00001-of-00002.parquet")
    image_dataset(root, val).to_parquet(root / "parquet" / "data" / "validation-00000-of-00001.parquet")
    from datasets import DatasetDict

    DatasetDict({"train": image_dataset(root, train), "validation": image_dataset(root, val)}).save_to_disk(
        root / "saved"
    )
    return {
        "folder": root / "folder", "csv": root / "labels.csv", "jsonl": root / "labels.jsonl", "parquet": root / "parquet",
        "saved": root / "saved", "val_parquet": root / "parquet" / "data" / "validation-00000-of-00001.parquet",
    }  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread():
    """Bit-identical weights need the same intra-op thread count in every run (and one is fastest here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def linked(tmp_path: Path, sources: dict[str, Path]) -> Path:
    """tmp_path with `folder` linking to the sources' images: a label file written there lists them by the
    same relative paths as labels.csv does."""
    if not (tmp_path / "folder").exists():
        (tmp_path / "folder").symlink_to(sources["folder"])
    return tmp_path


def write_csv(path: Path, rows: list[tuple[str, ...]], header: str = "path,label") -> Path:
    path.write_text(header + "\n" + "".join(",".join(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_jsonl(path: Path, rows: list[tuple[str, ...]], columns: tuple[str, ...] = ("path", "label")) -> Path:
    path.write_text("".join(json.dumps(dict(zip(columns, row))) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def model(sources: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model fine-tuned (2 steps) on the sources' folder: blue, green, red."""
    from conftest import run_main
    from finetune.helpers import FAST

    run = tmp_path_factory.mktemp("model") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code, _, err = run_main("finetune", sources["folder"], "--output", run, "--steps", "2", "--batch-size", "8",
                                "--eval-every", "0", *FAST)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    return run
