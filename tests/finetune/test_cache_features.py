"""--head-only --cache-features: the linear probe on cached features. The head equals plain SGD on the
features of the eval transform (the same steps' images, no augmentation), the backbone is untouched, a second
run computes no feature, and the flags it cannot go with are refused before any work."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_main

from bitcli import hyperrule
from bitcli.data import StepSampler, eval_transform
from bitcli.finetune.start import build_start_model, start_point
from bitcli.hub import load_checkpoint
from bitcli.preprocess import load_image
from bitcli.sources.folder import scan

from .helpers import read_weights

FLAGS = ["--steps", "6", "--batch-size", "8", "--batch-split", "2", "--seed", "3", "--resolution", "16",
         "--eval-every", "0", "--workers", "0", "--head-only", "--cache-features"]  # fmt: skip


def reference_head(dataset: Path, tiny_dir: Path, steps: int, boundaries: list[int], lr: float,
                   balanced: bool = False) -> dict:  # fmt: skip
    """The head that SGD with BiT's momentum gives on the start model's features (16-px eval transform);
    `balanced`: the steps draw --sampler balanced's images."""
    start, mean, std = build_start_model(start_point(str(tiny_dir), False, None, 3), 3, seed=0)
    ds = scan(dataset / "train", None)
    tf = eval_transform(16, mean, std)
    images = np.stack([tf.to_uint8(load_image(p)) for p in ds.paths])
    with torch.no_grad():
        features = start.eval().pre_logits(tf.normalize(torch.from_numpy(images)))
    head = torch.nn.Linear(features.shape[1], 3)
    torch.nn.init.zeros_(head.weight), torch.nn.init.zeros_(head.bias)
    sgd = torch.optim.SGD(head.parameters(), lr=0.0, momentum=0.9)
    by_class = {"by_class": ds.by_class()} if balanced else {}
    sampler, targets = StepSampler(len(ds), 8, 3, max_offset=0, mixup=None, **by_class), torch.tensor(list(ds.targets))
    for step in range(steps):
        for group in sgd.param_groups:
            group["lr"] = hyperrule.learning_rate(step, hyperrule.Schedule(tuple(boundaries)), lr)
        idx = torch.from_numpy(sampler.indices(step))
        torch.nn.functional.cross_entropy(head(features[idx]), targets[idx]).backward()
        sgd.step()
        sgd.zero_grad()
    return {"head.weight": head.weight.detach(), "head.bias": head.bias.detach()}


def test_the_head_is_sgd_on_cached_features_and_a_second_run_computes_none(
    dataset: Path, tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BITCLI_CACHE", str(tmp_path / "cache"))
    code, _, err = run_main("finetune", dataset, "--output", tmp_path / "one", "--model", tiny_dir, *FLAGS)
    assert code == 0, err
    assert "--cache-features: 36 training images embedded (36 computed, 0 from the cache)" in err
    assert ", on cached features (--cache-features: no augmentation)" in err
    assert (
        "resolution  no crop or flip (--cache-features: each image's features of the eval transform, once); eval "
        "resize 16x16" in err
    )
    plan = json.loads((tmp_path / "one/finetune_config.json").read_text())
    assert plan["cache_features"] is True and plan["mixup"] is None

    model = load_checkpoint(str(tmp_path / "one")).build_model().state_dict()
    want = reference_head(dataset, tiny_dir, plan["steps"], plan["boundaries"], plan["lr"])
    for k, v in want.items():
        torch.testing.assert_close(model[k], v, rtol=1e-4, atol=1e-5)
    start = read_weights(tiny_dir / "model.safetensors")
    written = read_weights(tmp_path / "one/model.safetensors")
    assert all(torch.equal(written[k], start[k]) for k in written if not k.startswith("classifier."))

    code, _, err = run_main("finetune", dataset, "--output", tmp_path / "two", "--model", tiny_dir, *FLAGS)
    assert code == 0, err
    assert "(0 computed, 36 from the cache)" in err
    again = read_weights(tmp_path / "two/model.safetensors")
    assert all(torch.equal(again[k], written[k]) for k in written)
    assert len(os.listdir(tmp_path / "cache/embeddings")) == 1

    code, shown, err = run_main("report", tmp_path / "one")  # what the run did to its images, as the plan said
    assert code == 0 and "lr 0.003, cached features (no crop or flip), no mixup;" in shown, err
    code, shown, err = run_main("push", tmp_path / "one", "alice/probe", "--dry-run")
    assert code == 0, err
    assert (
        "| Resolution | train: features of the eval transform, no crop or flip (cached); eval: resize to 16 x 16"
        in shown
    )


def test_the_balanced_sampler_draws_the_cached_features_steps(dataset: Path, tiny_dir: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """--sampler balanced with --cache-features: the head is SGD on the images the balanced sampler draws."""
    monkeypatch.setenv("BITCLI_CACHE", str(tmp_path / "cache"))
    code, _, err = run_main("finetune", dataset, "--output", tmp_path / "b", "--model", tiny_dir, *FLAGS,
                            "--sampler", "balanced", "--no-calibrate")  # fmt: skip
    assert code == 0, err
    plan = json.loads((tmp_path / "b/finetune_config.json").read_text())
    model = load_checkpoint(str(tmp_path / "b")).build_model().state_dict()
    want = reference_head(dataset, tiny_dir, plan["steps"], plan["boundaries"], plan["lr"], balanced=True)
    for k, v in want.items():
        torch.testing.assert_close(model[k], v, rtol=1e-4, atol=1e-5)


def test_cache_features_needs_head_only_and_no_augmentation_flag(dataset: Path, tiny_dir: Path, tmp_path: Path) -> None:
    code, _, err = run_main("finetune", dataset, "--output", tmp_path / "a", "--model", tiny_dir, "--cache-features")
    assert code == 2 and "--cache-features trains the head on fixed features: add --head-only" in err
    code, _, err = run_main("finetune", dataset, "--output", tmp_path / "b", "--model", tiny_dir, "--head-only",
                            "--cache-features", "--mixup", "0.2")  # fmt: skip
    assert code == 2 and "--mixup 0.2 with --cache-features" in err
    code, _, err = run_main("finetune", dataset, "--output", tmp_path / "c", "--model", tiny_dir, "--head-only",
                            "--cache-features", "--no-flip")  # fmt: skip
    assert code == 2 and "--no-flip with --cache-features: cached features are not augmented; drop --no-flip" in err
    assert not any((tmp_path / name).exists() for name in "abc")
