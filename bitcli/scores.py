"""Scores: the one place where a model's logits become the scores that bitcli reports (predict's top-k, eval's
metrics, fine-tuning's calibration), the views of test-time augmentation, and the fit of the temperature.

A score is softmax(logits / T): single-label probabilities, with the model's temperature T (1 for a model that
was not calibrated; `bit finetune` fits one on its validation set, `fit_temperature`). With test-time
augmentation a model sees several views of each image (`views`) and the score of the image is the mean of its
views' scores. Every consumer goes through `probabilities` and `log_probabilities`; a multi-label model's
scores are sigmoids instead (`probabilities(..., multi_label=True)`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

TTA_FLIP = "flip"  # --tta flip: the input and its horizontal flip
TTA_CHOICES = (TTA_FLIP,)
# fit_temperature searches T in this range: outside it the scores are all but uniform or all but one-hot.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0
SEARCH_STEPS = 60  # golden-section steps on log T: the bracket shrinks to 3e-13 of its width


def views(batch_uint8: np.ndarray, tta: str | None) -> list[np.ndarray]:
    """The inputs a model sees for a uint8 [B, H, W, 3] batch (after the resize and crop): the batch itself,
    and with --tta flip its mirror image (W reversed), contiguous."""
    if tta is None:
        return [batch_uint8]
    if tta == TTA_FLIP:
        return [batch_uint8, np.ascontiguousarray(batch_uint8[:, :, ::-1])]
    raise ValueError(f"unknown test-time augmentation {tta!r}")


def stack_views(logits: list[torch.Tensor]) -> torch.Tensor:
    """The logits of each view, [B, C] each, as one [B, V, C] tensor (float32)."""
    return torch.stack([v.float() for v in logits], dim=1)


def probabilities(logits: torch.Tensor, temperature: float = 1.0, multi_label: bool = False) -> torch.Tensor:
    """The scores of logits [..., C] (or of views [B, V, C]: their mean over V): softmax(logits / T); for a
    multi-label model the independent sigmoid(logits) of each class (bitcli.multilabel)."""
    if logits.ndim == 3 and logits.shape[1] == 1:
        logits = logits[:, 0]  # one view: exactly the softmax of its logits
    if multi_label:
        sig = torch.sigmoid(_real(logits))
        return sig.mean(dim=1) if sig.ndim == 3 else sig
    # Row-wise softmax, then the mean over the views: an element-wise exp over the whole tensor would round
    # some elements differently with another thread count (its vectorised and scalar parts split differently).
    return torch.softmax(_scaled(_real(logits), temperature), dim=-1).mean(dim=1) if logits.ndim == 3 else \
        torch.softmax(_scaled(_real(logits), temperature), dim=-1)  # fmt: skip


def log_probabilities(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log of `probabilities`, [B, C], computed in log space: for views [B, V, C] the log of the mean of their
    softmaxes (logsumexp over V minus log V). A single view gives exactly log_softmax(logits / T)."""
    logits = _real(logits)
    if logits.ndim == 3:
        if logits.shape[1] == 1:
            return log_probabilities(logits[:, 0], temperature)
        per_view = torch.log_softmax(_scaled(logits, temperature), dim=-1)
        return torch.logsumexp(per_view, dim=1) - math.log(logits.shape[1])
    return torch.log_softmax(_scaled(logits, temperature), dim=-1)


def top_scores(logits: torch.Tensor, picked: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """The score of class picked[i] in row i, float64, computed in numpy: torch's element-wise exp rounds some
    elements differently with another thread count (its vectorised and scalar parts split differently), and
    the ECE of `bit eval` must not depend on it."""
    z = logits.double().cpu().numpy() / temperature
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    p = e / e.sum(axis=-1, keepdims=True)
    if p.ndim == 3:
        p = p.mean(axis=1)
    return p[np.arange(len(p)), picked]


def _real(logits: torch.Tensor) -> torch.Tensor:
    """float32, or float64 where the caller computes in it (fit_temperature)."""
    return logits if logits.dtype == torch.float64 else logits.float()


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits if temperature == 1.0 else logits / temperature


# ----------------------------------------------------------------------------------------------------------
# Temperature scaling (Guo et al. 2017): one scalar T > 0 that minimises the validation NLL of softmax(z / T)


def nll(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> float:
    """Mean negative log-likelihood of `targets` under the scores of `logits` [N, C] or views [N, V, C]."""
    log_p = log_probabilities(logits.double(), temperature)
    return float(-log_p.gather(1, targets.long().view(-1, 1)).mean())


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """The T in [MIN_TEMPERATURE, MAX_TEMPERATURE] that minimises `nll` (float64): golden-section search on
    log T. The NLL is convex in 1/T (a log-sum-exp minus a linear term), so it has one minimum on the range
    and the search finds it; the same logits give the same T on every machine (no random start, no tolerance
    that depends on timing). A minimum outside the range ends at its bound."""
    log_t = golden_section(lambda x: nll(logits, targets, math.exp(x)), math.log(MIN_TEMPERATURE),
                           math.log(MAX_TEMPERATURE))  # fmt: skip
    return math.exp(log_t)


def golden_section(f: Callable[[float], float], lo: float, hi: float) -> float:
    """The minimiser of a unimodal `f` on [lo, hi]; the bounds themselves are candidates, so a monotone `f`
    ends exactly at a bound."""
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = lo, hi
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(SEARCH_STEPS):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = f(d)
    candidates = [(fc, c), (fd, d), (f(lo), lo), (f(hi), hi)]
    return min(candidates, key=lambda pair: pair[0])[1]  # the first of equals: an interior point


def check_temperature(value: object) -> float | None:
    """A stored temperature as a float, or None when it is not a finite number > 0 (a damaged file)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) and value > 0 else None
