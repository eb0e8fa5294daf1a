"""BiT's fine-tuning recipe pinned detail by detail (issue 12): the MixUp loss and images mixed by one λ, the
new head at exactly zero when training starts, inputs in [-1, 1], uniform crop offsets and a flip rate of
one half. (The whole backbone training: test_loop.py; `bit eval` == summary.json: tests/test_eval.py.)

The statistical tests use fixed seeds, so they are deterministic; their bounds are the p = 0.001 critical
values, so that a changed distribution fails them while the fixed draw passes."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import run_main
from PIL import Image

from bitcli import hyperrule
from bitcli.data import StepSample, StepSampler, eval_transform
from bitcli.finetune import loop
from bitcli.torch_engine import TorchEngine

from .helpers import FAST

CHI2_999_DF32 = 62.487  # scipy.stats.chi2.ppf(0.999, 32)
Z_9995 = 3.2905  # scipy.stats.norm.ppf(0.9995): two-sided p = 0.001


def _bit_input(pixels: np.ndarray) -> np.ndarray:
    """uint8 NHWC -> BiT's input by hand: /255, then mean 0.5 and std 0.5, i.e. [0, 255] -> [-1, 1]."""
    return (pixels.astype(np.float64) / 255.0 - 0.5) / 0.5


def _cross_entropy(logits: np.ndarray, y: np.ndarray) -> float:
    """Mean over the batch of -log softmax(logits)[label], by hand in float64."""
    top = logits.max(axis=1, keepdims=True)
    log_probs = logits - top - np.log(np.exp(logits - top).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(y)), y].mean())


def test_mixup_loss_is_lambda_ce_of_own_labels_plus_one_minus_lambda_ce_of_partner_labels() -> None:
    logits = torch.randn(6, 5, generator=torch.Generator().manual_seed(0)) * 3
    y, y_mix = torch.tensor([0, 1, 2, 3, 4, 0]), torch.tensor([4, 4, 0, 1, 2, 3])
    logits[torch.arange(6), y] += 4.0  # the model favours the own labels: CE(y_a) << CE(y_b)
    ce_a, ce_b = (_cross_entropy(logits.double().numpy(), labels.numpy()) for labels in (y, y_mix))
    assert abs(ce_a - ce_b) > 0.5  # the two terms differ, so a swapped or dropped weight shows
    for lam in (0.3, 0.9):
        got = float(loop.mixup_cross_entropy(logits, y, y_mix, lam))
        assert got == pytest.approx(lam * ce_a + (1 - lam) * ce_b, rel=1e-6)
    assert float(loop.mixup_cross_entropy(logits, y, None, 1.0)) == pytest.approx(ce_a, rel=1e-6)  # no MixUp


def test_mix_blends_each_image_with_its_partner_by_lambda_and_returns_both_labels() -> None:
    engine = TorchEngine(torch.nn.Identity(), eval_transform(4, (0.5,) * 3, (0.5,) * 3), torch.device("cpu"),
                         torch.float32, channels_last=False)  # fmt: skip
    batch = 6
    indices = np.array([10, 11, 12, 13, 14, 15])  # data-set index of each batch position
    partners = np.array([3, 0, 5, 1, 2, 4])  # position mixed into each position
    sample = StepSample(indices, np.zeros(batch, int), np.zeros(batch, int), np.zeros(batch, bool), partners, 0.3)
    targets = np.arange(16) % 4
    own = np.array([0, 1, 2])  # this micro-batch: positions 0-2; their partners 3, 0, 5 come from the others
    needed = np.unique(np.concatenate([own, partners[own]]))
    decoded = np.random.default_rng(0).integers(0, 256, (len(needed), 4, 4, 3), dtype=np.uint8)
    image = {int(p): decoded[r] for r, p in enumerate(needed)}

    x, y, y_mix = loop._mix(decoded, needed, own, sample, targets=targets, engine=engine)
    want = np.stack([0.3 * _bit_input(image[p]) + 0.7 * _bit_input(image[int(partners[p])]) for p in own])
    np.testing.assert_allclose(x.permute(0, 2, 3, 1).numpy(), want, rtol=0, atol=1e-6)
    assert y.tolist() == targets[indices[own]].tolist() == [2, 3, 0]
    assert y_mix.tolist() == targets[indices[partners[own]]].tolist() == [1, 2, 3]

    plain = StepSample(indices, sample.tops, sample.lefts, sample.flips, None, 1.0)
    x, y, y_mix = loop._mix(
        decoded[: len(own)], own, own, plain, targets=targets, engine=engine
    )  # no MixUp: the images as they are
    np.testing.assert_allclose(x.permute(0, 2, 3, 1).numpy(), _bit_input(decoded[: len(own)]), rtol=0, atol=1e-6)
    assert y_mix is None and y.tolist() == [2, 3, 0]


def _record(monkeypatch: pytest.MonkeyPatch) -> dict[str, list]:
    """What the training loop hands the model and the loss, micro-batch by micro-batch."""
    seen: dict[str, list] = {"mix": [], "loss": [], "sampler": []}
    real_mix, real_loss, real_sampler = loop._mix, loop.mixup_cross_entropy, loop.StepSampler

    def mix(decoded, needed, own, sample, *, targets, engine):
        x, y, y_mix = real_mix(decoded, needed, own, sample, targets=targets, engine=engine)
        seen["mix"].append((decoded.copy(), needed.copy(), own.copy(), sample, x.detach().clone(), y, y_mix))
        return x, y, y_mix

    def loss(logits, y, y_mix, lam):
        seen["loss"].append((logits.detach().clone(), y, y_mix, lam))
        return real_loss(logits, y, y_mix, lam)

    def sampler(*args, **keywords):  # (num_examples, batch_size, seed, max_offset, mixup), however they are passed
        seen["sampler"].append((*args, *keywords.values()))
        return real_sampler(*args, **keywords)

    monkeypatch.setattr(loop, "_mix", mix)
    monkeypatch.setattr(loop, "mixup_cross_entropy", loss)
    monkeypatch.setattr(loop, "StepSampler", sampler)
    return seen


def test_training_mixes_images_and_weights_the_loss_by_the_same_lambda(dataset: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    seen = _record(monkeypatch)
    code, _, err = run_main("finetune", dataset, "--output", tmp_path / "run", "--steps", "2", "--batch-size", "8",
                            "--batch-split", "2", "--mixup", "0.4", "--eval-every", "0", "--seed", "3", *FAST)  # fmt: skip
    assert code == 0, err
    assert seen["sampler"] == [(36, 8, 3, 20 - 16, 0.4)]  # crop offsets drawn over [0, resize - crop]
    reference = StepSampler(36, 8, 3, 4, mixup=0.4)
    assert len(seen["mix"]) == len(seen["loss"]) == 4  # 2 steps x 2 micro-batches
    for i, (mixed, loss_args) in enumerate(zip(seen["mix"], seen["loss"])):
        (decoded, needed, own, sample, x, y, y_mix), (_, loss_y, loss_y_mix, lam) = mixed, loss_args
        step_lam = reference.sample(i // 2).lam
        assert 0 < step_lam < 1 and abs(step_lam - 0.5) > 0.05  # a swap of λ and 1-λ would show
        assert lam == sample.lam == step_lam  # the loss's λ is the one the images were mixed with
        assert torch.equal(loss_y, y) and torch.equal(loss_y_mix, y_mix)
        image = {int(p): decoded[r] for r, p in enumerate(needed)}
        partner = sample.partners[own]
        assert any(image[int(a)].tobytes() != image[int(b)].tobytes() for a, b in zip(own, partner))
        want = np.stack([lam * _bit_input(image[int(a)]) + (1 - lam) * _bit_input(image[int(b)])
                         for a, b in zip(own, partner)])  # fmt: skip
        np.testing.assert_allclose(x.permute(0, 2, 3, 1).numpy(), want, rtol=0, atol=1e-6)


def _grey_levels(root: Path) -> dict[str, int]:
    """Three classes of flat images: black, mid-grey and white, so every input pixel is known exactly."""
    levels = {"a_black": 0, "b_grey": 51, "c_white": 255}
    for name, level in levels.items():
        (root / name).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (24, 24), (level,) * 3).save(root / name / f"{i}.png")
    return levels


@pytest.mark.parametrize("start", ["checkpoint", "random-init"])
def test_inputs_are_in_minus_one_to_one_and_the_new_head_starts_at_exactly_zero(
    start: str, tmp_path: Path, tiny_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BiT checkpoints (mean = std = 0.5, as tiny_dir's preprocessing says) and --random-init train on
    pixels / 127.5 - 1; from a checkpoint, the first step's logits are exactly 0 (the zero head)."""
    levels = _grey_levels(tmp_path / "data")
    seen = _record(monkeypatch)
    model = ["--model", tiny_dir, "--resolution", "16", "--workers", "0"] if start == "checkpoint" else FAST
    code, _, err = run_main("finetune", tmp_path / "data", "--output", tmp_path / "run", "--steps", "2", "--batch-size", "8",
                            "--batch-split", "1", "--eval-every", "0", *model)  # fmt: skip
    assert code == 0, err
    value = {c: level / 127.5 - 1 for c, level in enumerate(levels.values())}  # -1, -0.6, 1 by class index
    xs = [(x, y) for _, _, _, _, x, y, _ in seen["mix"]]
    assert len(xs) == 2 and all(x.shape == (8, 3, 16, 16) for x, _ in xs)
    for x, y in xs:
        for image, label in zip(x, y.tolist()):
            torch.testing.assert_close(image, torch.full_like(image, value[label]), rtol=0, atol=1e-6)
    both = torch.cat([x for x, _ in xs])
    assert (float(both.min()), float(both.max())) == (-1.0, 1.0)  # black is -1 and white +1 exactly
    if start == "checkpoint":
        first_logits = seen["loss"][0][0]
        assert first_logits.shape == (8, 3) and torch.count_nonzero(first_logits) == 0
        assert math.isclose(float(F.cross_entropy(first_logits, seen["loss"][0][1])), math.log(3), rel_tol=1e-6)


def test_crop_offsets_are_uniform_over_zero_to_resize_minus_crop_and_half_the_images_flip() -> None:
    """40 steps of 512 under the HyperRule's 160 -> 128 (512 -> 480 has the same 32-px margin)."""
    for area in (50 * 50, 500 * 500):
        res = hyperrule.resolution(area)
        assert res.resize - res.crop == 32
    sampler = StepSampler(1000, 512, seed=0, max_offset=32, mixup=0.1)
    samples = [sampler.sample(step) for step in range(40)]
    tops, lefts = (np.concatenate([getattr(s, k) for s in samples]) for k in ("tops", "lefts"))
    flips = np.concatenate([s.flips for s in samples])
    n = len(tops)
    assert n == 20_480
    for offsets in (tops, lefts):
        assert offsets.min() == 0 and offsets.max() == 32  # both ends of [0, resize - crop] occur
        counts = np.bincount(offsets, minlength=33)
        assert len(counts) == 33
        chi2 = float(((counts - n / 33) ** 2 / (n / 33)).sum())
        assert chi2 < CHI2_999_DF32, chi2
    corr = float(np.corrcoef(tops, lefts)[0, 1])
    assert abs(corr) < Z_9995 / math.sqrt(n), corr  # top and left are drawn independently
    rate = float(flips.mean())
    assert abs(rate - 0.5) < Z_9995 * math.sqrt(0.25 / n), rate
    # Each position flips independently of its crop: the flip rate is one half at both ends of the margin.
    for side in (tops < 16, tops >= 16):
        m = int(side.sum())
        assert abs(float(flips[side].mean()) - 0.5) < Z_9995 * math.sqrt(0.25 / m)
