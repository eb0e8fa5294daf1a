"""Likely label errors: out-of-sample class probabilities from a k-fold linear head on the embeddings (no
backbone pass beyond the embedding pass: each fold trains a multinomial logistic regression on the other folds'
vectors, L-BFGS to convergence, in a second), then confident learning's rule as cleanlab implements it
(`cleanlab.filter.find_label_issues`, the `audit` extra): the flagged set is cleanlab's given these
probabilities, and each one's score is cleanlab's label quality (self-confidence: the probability of the given
label; lower is more suspect)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

FOLDS = 5
SEED = 0
WEIGHT_DECAY = 1e-3  # L2 on the head's weights (per example, as scikit-learn's C = 1 / (decay * n))
MAX_ITER = 200
SMALL = 2_000_000  # numbers in the embeddings below which the head trains in one thread


@dataclass(frozen=True)
class LabelIssue:
    example: int
    suggested: int  # the class the held-out head finds most likely
    score: float  # the probability the held-out head gives the given label


def folds_of(labels: np.ndarray, folds: int = FOLDS, seed: int = SEED) -> np.ndarray:
    """Each example's fold: every class's examples shuffled (fixed seed) and dealt round the folds, so each
    fold holds each class in proportion."""
    rng = np.random.default_rng(seed)
    fold = np.zeros(len(labels), dtype=np.int64)
    offset = 0
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        fold[members] = (np.arange(len(members)) + offset) % folds
        offset += len(members)  # small classes start where the last one ended: folds stay even
    return fold


def fit_linear(x: torch.Tensor, y: torch.Tensor, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A multinomial logistic regression (weights [classes, D], bias), full-batch L-BFGS from zero."""
    weight = torch.zeros(classes, x.shape[1], dtype=x.dtype, requires_grad=True)
    bias = torch.zeros(classes, dtype=x.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=MAX_ITER, tolerance_grad=1e-6,
                                  history_size=20, line_search_fn="strong_wolfe")  # fmt: skip

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        value = torch.nn.functional.cross_entropy(x @ weight.T + bias, y) + 0.5 * WEIGHT_DECAY * weight.square().sum()
        value.backward()
        return value

    optimizer.step(loss)
    return weight.detach(), bias.detach()


def standardize(train: torch.Tensor, other: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = train.mean(0), train.std(0, correction=0) + 1e-6
    return (train - mean) / std, (other - mean) / std


def out_of_sample_probs(vectors: np.ndarray, labels: np.ndarray, classes: int, folds: int = FOLDS) -> np.ndarray:
    """[N, classes] float64: each example's class probabilities from the head trained on the other folds."""
    x = torch.nn.functional.normalize(torch.from_numpy(np.asarray(vectors, dtype=np.float64)), dim=1)
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    fold = folds_of(labels, folds)
    probs = np.zeros((len(labels), classes), dtype=np.float64)
    with torch.enable_grad(), _threads_for(x.numel()):
        for f in range(folds):
            held, kept = np.flatnonzero(fold == f), np.flatnonzero(fold != f)
            if not len(held) or not len(kept):
                continue
            train, test = standardize(x[kept], x[held])
            weight, bias = fit_linear(train, y[kept], classes)
            probs[held] = torch.softmax(test @ weight.T + bias, dim=1).numpy()
    return probs


@contextlib.contextmanager
def _threads_for(numbers: int) -> Iterator[None]:
    """One thread for a small problem: each L-BFGS step is a few tiny kernels, and waking other threads for
    them costs more than they save (60x slower on a busy 2-core machine); a large one keeps torch's threads."""
    before = torch.get_num_threads()
    if numbers < SMALL:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def find_issues(labels: np.ndarray, probs: np.ndarray) -> list[LabelIssue]:
    """cleanlab's confident-learning label issues given out-of-sample `probs`, most suspect first."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    if probs.shape[1] < 2 or len(labels) < 2:
        return []
    flagged = find_label_issues(labels, probs, n_jobs=1)
    scores = get_label_quality_scores(labels, probs)
    suggested = probs.argmax(axis=1)
    issues = [LabelIssue(int(i), int(suggested[i]), round(float(scores[i]), 6)) for i in np.flatnonzero(flagged)]
    return sorted(issues, key=lambda issue: (issue.score, issue.example))
