"""Scores (bitcli.scores) and the metrics of calibration: softmax at a temperature and the mean over test-time
views against numpy, the fitted temperature against a dense grid search, and the accumulated NLL, ECE, loss
and balanced accuracy against scikit-learn and a direct numpy computation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, log_loss

from bitcli import scores
from bitcli.metrics import Accumulator


def numpy_softmax(z: np.ndarray, temperature: float) -> np.ndarray:
    z = z.astype(np.float64) / temperature
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def numpy_ece(probs: np.ndarray, y_true: np.ndarray, bins: int = 15) -> float:
    """15 equal-width bins (lower, upper] of the top-1 score; the sum over bins of |accuracy - mean score|
    weighted by the bin's share of the images."""
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == y_true
    ece = 0.0
    for lower, upper in itertools.pairwise(np.linspace(0.0, 1.0, bins + 1)):
        inside = (confidence > lower) & (confidence <= upper)
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return ece


def logits_and_labels(n: int = 400, classes: int = 7, seed: int = 0, scale: float = 3.0):
    """Logits of a classifier that is right about two thirds of the time, and overconfident (scale > 1)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    z = rng.normal(size=(n, classes))
    z[np.arange(n), y] += 1.5
    return torch.from_numpy((scale * z).astype(np.float32)), y


def test_probabilities_are_the_softmax_at_the_temperature_and_the_mean_over_views() -> None:
    z, _ = logits_and_labels(50)
    views = torch.stack([z, z.flip(1) * 0.5], dim=1)  # [B, 2, C]
    for t in (1.0, 0.7, 2.5):
        np.testing.assert_allclose(scores.probabilities(z, t).numpy(), numpy_softmax(z.numpy(), t), rtol=1e-5)
        want = (numpy_softmax(views[:, 0].numpy(), t) + numpy_softmax(views[:, 1].numpy(), t)) / 2
        np.testing.assert_allclose(scores.probabilities(views, t).numpy(), want, rtol=1e-5)
        np.testing.assert_allclose(scores.log_probabilities(views, t).numpy(), np.log(want), rtol=1e-5, atol=1e-6)
    # one view is exactly its softmax (predict without --tta keeps its numbers)
    assert torch.equal(scores.probabilities(z[:, None], 1.0), torch.softmax(z, dim=-1))
    assert torch.equal(scores.log_probabilities(z[:, None], 2.0), torch.log_softmax(z / 2.0, dim=-1))


def test_views_are_the_batch_and_its_mirror_image() -> None:
    batch = np.random.default_rng(0).integers(0, 256, (2, 3, 5, 3), dtype=np.uint8)
    (same,) = scores.views(batch, None)
    assert same is batch
    plain, flipped = scores.views(batch, "flip")
    assert plain is batch and flipped.flags.c_contiguous
    assert np.array_equal(flipped, batch[:, :, ::-1]) and np.array_equal(flipped[:, :, 0], batch[:, :, 4])


def grid_nll(z: torch.Tensor, y: np.ndarray, temperatures: np.ndarray) -> np.ndarray:
    """The validation NLL at each temperature, in numpy (float64)."""
    s = z.numpy().astype(np.float64)[None] / np.asarray(temperatures, dtype=np.float64)[:, None, None]
    top = s.max(axis=2, keepdims=True)
    lse = np.log(np.exp(s - top).sum(axis=2)) + top[..., 0]
    return np.mean(lse - s[:, np.arange(len(y)), y], axis=1)


@pytest.mark.parametrize("scale, seed", [(3.0, 0), (0.3, 1), (1.0, 2)])  # over-, under- and about right
def test_fitted_temperature_minimises_the_nll_on_a_dense_grid(scale: float, seed: int) -> None:
    z, y = logits_and_labels(scale=scale, seed=seed)
    t = scores.fit_temperature(z, torch.from_numpy(y))
    coarse = np.exp(np.linspace(np.log(scores.MIN_TEMPERATURE), np.log(scores.MAX_TEMPERATURE), 2001))
    around = coarse[np.argmin(grid_nll(z, y, coarse))]
    fine = around * np.exp(np.linspace(-0.01, 0.01, 2001))  # 3e-3 either side, in steps of 1e-5 of log T
    nll = grid_nll(z, y, fine)
    assert t == pytest.approx(fine[nll.argmin()], rel=2e-5)
    assert grid_nll(z, y, np.array([t]))[0] <= nll.min() + 1e-12
    assert (t > 1.0) == (scale > 1.5)  # overconfident logits are softened, underconfident ones sharpened
    assert scores.fit_temperature(z, torch.from_numpy(y)) == t  # deterministic


def test_separable_logits_end_at_the_lowest_temperature() -> None:
    """Every answer right by a margin: the NLL falls all the way down, and the fit stops at the bound."""
    z = torch.tensor([[4.0, 0.0], [0.0, 4.0], [5.0, 1.0]])
    assert scores.fit_temperature(z, torch.tensor([0, 1, 0])) == pytest.approx(scores.MIN_TEMPERATURE, rel=1e-12)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
@pytest.mark.parametrize("temperature, tta", [(1.0, False), (1.7, False), (0.6, True)])
def test_accumulated_calibration_metrics_equal_their_oracles(temperature: float, tta: bool) -> None:
    """The evaluated folders hold 4 of the model's 7 classes; NLL and ECE are over the model's whole softmax (a
    prediction outside the folders is wrong); loss is the NLL at temperature 1."""
    z, y = logits_and_labels(scale=2.0)
    keep = np.isin(y, [0, 2, 3, 6])
    z, y = z[keep], y[keep]
    folders = [6, 0, 3, 2]  # data-set class c is the model's class folders[c]
    targets = np.array([folders.index(v) for v in y])
    mirror = z + torch.from_numpy(np.random.default_rng(5).normal(size=z.shape).astype(np.float32))  # the other view
    views = torch.stack([z, mirror], dim=1) if tta else z
    acc = Accumulator(["six", "zero", "three", "two"], folders, 7, temperature=temperature, tta="flip" if tta else None)
    for start in range(0, len(y), 37):  # in uneven batches
        acc.update(views[start : start + 37], targets[start : start + 37])
    result = acc.result()

    def probs_at(t: float) -> np.ndarray:
        if not tta:
            return numpy_softmax(z.numpy(), t)
        return (numpy_softmax(views[:, 0].numpy(), t) + numpy_softmax(views[:, 1].numpy(), t)) / 2

    probs = probs_at(temperature)
    labels = np.arange(7)
    assert result.nll == pytest.approx(log_loss(y, probs, labels=labels), rel=1e-5)
    assert result.loss == pytest.approx(log_loss(y, probs_at(1.0), labels=labels), rel=1e-5)
    assert result.ece == pytest.approx(numpy_ece(probs, y), abs=1e-6)
    assert result.top1 == pytest.approx(np.mean(probs.argmax(1) == y), abs=1e-12)
    assert result.balanced_accuracy == pytest.approx(balanced_accuracy_score(y, probs.argmax(1)), abs=1e-12)
    rel = result.reliability
    assert sum(rel["count"]) == len(y) and len(rel["count"]) == 15
    assert (result.to_dict()["temperature"], result.to_dict()["tta"]) == (temperature, "flip" if tta else None)


def test_a_score_on_a_bin_edge_counts_in_the_lower_bin() -> None:
    """Bins are (lower, upper]: a top-1 score of exactly 0.6 (= 9/15) is in bin 8, 1.0 in the last."""
    acc = Accumulator(["a", "b"], [0, 1], 2)
    z = torch.tensor([[np.log(0.6 / 0.4), 0.0], [30.0, -30.0]], dtype=torch.float64).float()
    acc.update(z, np.array([1, 0]))
    counts = acc.result().reliability["count"]
    assert counts[8] == 1 and counts[14] == 1 and sum(counts) == 2
