"""Likely label errors: out-of-sample class probabilities from a k-fold linear head on the embeddings (no
backbone pass beyond the embedding pass: each fold trains a multinomial logistic regression on the other folds'
vectors, L-BFGS to convergence, in a second), then confident learning's rule as cleanlab implements it
(`cleanlab.filter.find_label_issues`, the `audit` extra): the flagged set is cleanlab's given these
probabilities, and each one's score is cleanlab's label quality (self-confidence: the probability of the given
label; lower is more suspect).

Multi-label data (several labels an image) takes the same steps one-vs-rest: each fold trains one logistic
regression a class (sigmoid, binary cross-entropy, the same L2), the held-out images get each class's
probability (they do not add up to 1), and cleanlab's multi-label rule flags the set
(`cleanlab.multilabel_classification.filter.find_label_issues`, what `cleanlab.filter.find_label_issues(...,
multi_label=True)` calls, less its deprecation warning); the score is cleanlab's multi-label label quality (the classes' self-confidences, aggregated by
its exponential moving average, worst first) and the suggestion is every class whose held-out probability is at
least SUGGEST_AT (at least the most probable one: a row needs a label)."""

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
SUGGEST_AT = 0.5  # a multi-label suggestion holds every class with at least this held-out probability


@dataclass(frozen=True)
class LabelIssue:
    example: int
    suggested: int  # the class the held-out head finds most likely
    score: float  # the probability the held-out head gives the given label (multi-label: cleanlab's quality)
    suggested_set: tuple[int, ...] = ()  # multi-label: the classes the held-out head suggests


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
    """A multinomial logistic regression (weights [classes, D], bias), full-batch L-BFGS from zero; with a
    multi-hot `y` ([n, classes] float), one binary logistic regression a class (one-vs-rest), each with the
    single-label head's L2, trained together (their losses are independent: the sum is each one's minimum)."""
    weight = torch.zeros(classes, x.shape[1], dtype=x.dtype, requires_grad=True)
    bias = torch.zeros(classes, dtype=x.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=MAX_ITER, tolerance_grad=1e-6,
                                  history_size=20, line_search_fn="strong_wolfe")  # fmt: skip

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        logits = x @ weight.T + bias
        if y.ndim == 2:  # the classes' binary cross-entropies, each a mean over the examples
            fit = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="sum") / len(y)
        else:
            fit = torch.nn.functional.cross_entropy(logits, y)
        value = fit + 0.5 * WEIGHT_DECAY * weight.square().sum()
        value.backward()
        return value

    optimizer.step(loss)
    return weight.detach(), bias.detach()


def standardize(train: torch.Tensor, other: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = train.mean(0), train.std(0, correction=0) + 1e-6
    return (train - mean) / std, (other - mean) / std


def out_of_sample_probs(vectors: np.ndarray, labels: np.ndarray, classes: int, folds: int = FOLDS, *,
                        multi_hot: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """[N, classes] float64: each example's class probabilities from the head trained on the other folds
    (softmax); with `multi_hot` ([N, classes]: every label of each example; `labels` its lowest, which deals
    the folds), each class's own sigmoid probability from the one-vs-rest head."""
    x = torch.nn.functional.normalize(torch.from_numpy(np.asarray(vectors, dtype=np.float64)), dim=1)
    if multi_hot is None:
        y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    else:
        y = torch.from_numpy(np.asarray(multi_hot, dtype=np.float64))
    fold = folds_of(labels, folds)
    probs = np.zeros((len(labels), classes), dtype=np.float64)
    with torch.enable_grad(), _threads_for(x.numel()):
        for f in range(folds):
            held, kept = np.flatnonzero(fold == f), np.flatnonzero(fold != f)
            if not len(held) or not len(kept):
                continue
            train, test = standardize(x[kept], x[held])
            weight, bias = fit_linear(train, y[kept], classes)
            logits = test @ weight.T + bias
            probs[held] = (torch.softmax(logits, dim=1) if multi_hot is None else torch.sigmoid(logits)).numpy()
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


def find_multi_label_issues(multi_hot: np.ndarray, probs: np.ndarray) -> list[LabelIssue]:
    """cleanlab's multi-label confident-learning issues given out-of-sample sigmoid `probs` ([N, classes]) and
    every example's labels (`multi_hot`), most suspect first. A class every example carries (a tag on every
    image) cannot be judged, with no image without it to compare, and cleanlab refuses it: it is left out of
    the search (the suggestion still weighs every class)."""
    from cleanlab.multilabel_classification.filter import find_label_issues
    from cleanlab.multilabel_classification.rank import get_label_quality_scores

    judged = np.flatnonzero(~np.asarray(multi_hot, dtype=bool).all(axis=0))
    if len(judged) < 2 or len(multi_hot) < 2:
        return []
    labels = [np.flatnonzero(row).tolist() for row in np.asarray(multi_hot)[:, judged]]
    flagged = find_label_issues(labels, probs[:, judged], n_jobs=1)
    scores = get_label_quality_scores(labels, probs[:, judged])
    issues = [
        LabelIssue(int(i), int(probs[i].argmax()), round(float(scores[i]), 6), suggested_set=suggest(probs[i]))
        for i in np.flatnonzero(flagged)
    ]
    return sorted(issues, key=lambda issue: (issue.score, issue.example))


def suggest(probs: np.ndarray) -> tuple[int, ...]:
    """A multi-label example's suggested classes: those at or above SUGGEST_AT, else the most probable one."""
    chosen = np.flatnonzero(probs >= SUGGEST_AT)
    return tuple(int(c) for c in chosen) if len(chosen) else (int(probs.argmax()),)
