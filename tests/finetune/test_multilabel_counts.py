"""Multi-label data counts every label of a row (issue 24 review): class counts, the decode check, the plan's
histogram, --val-split and --shots; and training does not depend on the order of the labels within a row."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from conftest import run_main

from bitcli.data import few_shot, split_validation
from bitcli.errors import BitError
from bitcli.sources.labelfile import read_label_file

from .helpers import FAST
from .test_multilabel import label_sets, write_images

# "red" is never the first label of a row (and "blue" always is where it occurs): with first labels only,
# red would have no image at all
SETS = [["blue", "red"], ["green", "red"], ["blue"], ["green"], ["blue", "green", "red"], ["green", "red"]] * 4


def _jsonl(root: Path, sets: list[list[str]], name: str) -> Path:
    files = write_images(root / "images", sets)
    path = root / name
    path.write_text("".join(json.dumps({"path": f"images/{f}", "label": s}) + "\n" for f, s in zip(files, sets)))
    return path


def test_counts_by_class_shots_and_split_use_every_label(tmp_path: Path) -> None:
    ds = read_label_file(_jsonl(tmp_path, SETS, "labels.jsonl")).scan(None, None)
    assert ds.classes == ("blue", "green", "red")
    hot = ds.multi_hot
    assert ds.counts() == [12, 16, 16]
    assert [m.tolist() for m in ds.by_class()] == [np.flatnonzero(hot[:, c]).tolist() for c in range(3)]
    # --shots 3: every class carried by at least 3 of the chosen images, the same images for the same seed
    shots = few_shot(ds, 3, seed=5)
    assert min(shots.counts()) >= 3 and len(shots) <= 9
    assert [shots.relative(i) for i in range(len(shots))] == [
        x.relative(i) for x in [few_shot(ds, 3, seed=5)] for i in range(len(x))
    ]
    # an image that does not decode is skipped and the next of its class taken; too few is one error line
    asked: list[list[int]] = []

    def undecodable(indices: list[int]) -> set[int]:
        asked.append(indices)
        return {i for i in indices if i in chosen}

    first = {shots.relative(i) for i in range(len(shots))}
    chosen = {i for i in range(len(ds)) if ds.relative(i) in first}  # the images the first pick took fail
    retried = few_shot(ds, 3, seed=5, undecodable=undecodable)
    names = {retried.relative(i) for i in range(len(retried))}
    assert min(retried.counts()) >= 3 and names.isdisjoint(ds.relative(i) for i in chosen)
    assert sorted(i for batch in asked for i in batch) == sorted({i for batch in asked for i in batch})  # once each
    try:
        few_shot(ds, 13, seed=5)
    except BitError as exc:
        assert (
            str(exc)
            == f"--shots 13: class 'blue' has only 12 training image(s) ({ds.where(0)}); lower --shots or add images"
        )
    else:
        raise AssertionError("--shots 13 with 12 blue images")
    # --val-split 0.25: at least a quarter of each class's images held out (the rarest class, blue, first:
    # exactly 3), every class kept in training
    train, val = split_validation(ds, 0.25, seed=0)
    assert len(train) + len(val) == len(ds)
    assert {train.relative(i) for i in range(len(train))}.isdisjoint(val.relative(i) for i in range(len(val)))
    assert min(train.counts()) >= 1 and val.counts()[0] == 3 and min(val.counts()[1:]) >= 4


def test_label_order_within_a_row_changes_nothing(tmp_path: Path) -> None:
    """The same rows with each row's labels in reverse order: the plan's class histogram counts every label, and
    --val-split, --shots and training give byte-identical weights."""
    sets = label_sets(40, 3)
    flags = ["--steps", "2", "--batch-size", "8", "--val-split", "0.25", "--shots", "4", "--eval-every", "2", *FAST]
    runs, plans = [], []
    for name, rows in [("ordered", sets), ("reversed", [s[::-1] for s in sets])]:
        labels = _jsonl(tmp_path / name, rows, "labels.jsonl")
        code, _, err = run_main("finetune", labels, "--output", tmp_path / name / "run", *flags)
        assert code == 0, err
        runs.append(tmp_path / name / "run")
        plans.append(next(line for line in err.splitlines() if line.startswith("  classes  ")))
    a, b = (json.loads((run / "finetune_config.json").read_text())["class_sizes"] for run in runs)
    assert a == b and min(a) >= 4  # every class carried by at least 4 training images (--shots 4)
    assert a == [4, 5, 4]  # blue, green, red: two classes share the smallest size
    assert plans == ["  classes     3: smallest 2 classes of 4 images ('blue', 'red'), largest 'green' (5); imbalance "
                     "ratio 1.25:1"] * 2  # fmt: skip
    assert (runs[0] / "model.safetensors").read_bytes() == (runs[1] / "model.safetensors").read_bytes()


def test_imbalanced_multilabel_plan_counts_every_label_and_suggests_no_single_label_flag(tmp_path: Path) -> None:
    import torch

    from bitcli.distributed import Dist
    from bitcli.finetune.datasets import Datasets
    from bitcli.finetune.plan import describe, make_plan
    from bitcli.finetune.start import random_init_config
    from bitcli.model import BitModel
    from bitcli.options import FinetuneOptions

    sets = [["red"]] * 12 + [["blue", "red"]] * 2  # red is not the first label of the blue rows
    ds = read_label_file(_jsonl(tmp_path, sets, "labels.jsonl")).scan(None, None)
    opts = FinetuneOptions(data=tmp_path / "labels.jsonl", model="tiny", output=tmp_path / "out", random_init=True,
                           batch_split=1)  # fmt: skip
    model = BitModel(random_init_config("tiny", 2))
    plan = make_plan(
        opts, Datasets(ds, None, None), model, Dist(), device=torch.device("cpu"), dtype=torch.float32, saved=None
    )
    lines = describe(plan)
    assert plan.class_sizes == (2, 14)
    assert "  classes     2: smallest 'blue' (2 images), largest 'red' (14); imbalance ratio 7:1" in lines
    # the note names no flag this run would refuse (the balancing flags are single-label; no validation set here)
    assert [line for line in lines if line.startswith("  note        the classes")] == [
        "  note        the classes are imbalanced: --class-weights and --sampler are single-label only"
    ]
