"""The promise: the same images with the same labels in the same order train a bit-identical model from a
class folder, a CSV, a JSONL, parquet shards or a save_to_disk folder, and `bit eval` gives the same numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_main
from finetune.helpers import FAST, read_weights

KINDS = ["folder", "csv", "jsonl", "parquet", "saved"]
ARGS = ["--steps", "4", "--batch-size", "8", "--eval-every", "0", *FAST]


@pytest.fixture(scope="module")
def runs(sources: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    out = tmp_path_factory.mktemp("runs")
    done = {}
    for kind in KINDS:
        code, _, err = run_main("finetune", sources[kind], "--output", out / kind, *ARGS)
        assert code == 0, err
        done[kind] = (out / kind, err)
    return done


@pytest.mark.parametrize("kind", KINDS[1:])
def test_every_source_trains_the_folder_s_weights(runs, kind: str) -> None:
    reference, theirs = (
        read_weights(runs["folder"][0] / "model.safetensors"),
        read_weights(runs[kind][0] / "model.safetensors"),
    )
    assert reference.keys() == theirs.keys()
    assert all(torch.equal(reference[k], theirs[k]) for k in reference), f"{kind} trained other weights"
    plan = json.loads((runs[kind][0] / "finetune_config.json").read_text())
    assert plan["classes"] == ["blue", "green", "red"] and plan["train_examples"] == 24 and plan["val_examples"] == 9
    summary, folder_summary = (json.loads((runs[k][0] / "summary.json").read_text()) for k in (kind, "folder"))
    assert summary["val_top1"] == folder_summary["val_top1"]


@pytest.mark.parametrize("kind", [*KINDS, "val_parquet"])
def test_eval_gives_the_same_numbers_on_every_source(runs, sources: dict[str, Path], kind: str) -> None:
    model = runs["folder"][0]
    code, reference, err = run_main("eval", sources["folder"], "--model", model, "--format", "json")
    assert code == 0, err
    code, stdout, err = run_main("eval", sources[kind], "--model", model, "--format", "json")
    assert code == 0, err
    ours, theirs = json.loads(reference), json.loads(stdout)
    assert theirs["count"] == 9
    assert {k: v for k, v in theirs.items() if k != "data"} == {k: v for k, v in ours.items() if k != "data"}
