"""Multi-label evaluation: an image may have any number of the classes. The scores are independent sigmoids
(bitcli.scores with multi_label), a class is predicted when its score reaches the class's threshold, and the
thresholds are chosen on the validation set (the F1-maximising one per class, `fit_thresholds`).

The metrics are scikit-learn's: per-class average precision (`average_precision_score`, the step-wise area
under the precision-recall curve, ties taken together) and its mean over the classes that have a positive
image (mAP), micro and macro F1 and per-class precision, recall and F1 at the thresholds
(`precision_recall_fscore_support` on the multi-hot matrices, zero_division=0). Unlike the single-label
Accumulator this one keeps every image's scores ([N, classes] float32): AP sorts a class's scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.table import Table
from rich.text import Text

from bitcli import scores
from bitcli.errors import BitError
from bitcli.metrics import EvalResult
from bitcli.render import console
from bitcli.ui import visible

DEFAULT_THRESHOLD = 0.5  # a class without a positive validation image, and a model stored without thresholds


def average_precision(y: np.ndarray, s: np.ndarray) -> float | None:
    """scikit-learn's average_precision_score of one class: sum over the distinct scores, highest first, of
    (recall gained) x (precision there); None when the class has no positive image (AP is undefined)."""
    positives = int(y.sum())
    if positives == 0:
        return None
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the last index of each run of equal scores
    tp = np.cumsum(y)[last].astype(np.float64)
    precision = tp / (last + 1)
    recall = tp / positives
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def best_f1_threshold(y: np.ndarray, s: np.ndarray) -> float:
    """The threshold t (predict the class when score >= t) of highest F1 on one class's validation scores: the
    distinct score of highest F1 (the highest of equals: fewer false positives on new data), lowered to the
    midpoint between it and the next lower score (0 below the lowest). The validation images get the same
    predictions, and a score recomputed a rounding error lower (another batch size or thread count) does not
    fall off the threshold. A class without a positive image keeps DEFAULT_THRESHOLD."""
    positives = int(y.sum())
    if positives == 0:
        return DEFAULT_THRESHOLD
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tp = np.cumsum(y)[last].astype(np.float64)
    f1 = 2 * tp / (last + 1 + positives)  # 2TP / (predicted + actual)
    best = int(np.argmax(f1))  # argmax: the first (highest threshold) of equals
    below = float(s[last[best] + 1]) if last[best] + 1 < len(s) else 0.0
    return (float(s[last[best]]) + below) / 2


def fit_thresholds(y: np.ndarray, s: np.ndarray) -> list[float]:
    """Per class, best_f1_threshold on the validation multi-hot `y` [N, C] and scores `s` [N, C]."""
    return [best_f1_threshold(y[:, c], s[:, c]) for c in range(y.shape[1])]


@dataclass(frozen=True)
class MultiLabelResult:
    """A multi-label evaluation. `top1` (the share of images whose highest-scored class is one of theirs),
    `top5` (None), `loss` (binary cross-entropy, summed over classes, mean over images) and `macro_f1` keep the
    names that fine-tuning's records and --keep-best read."""

    count: int
    classes: list[str]  # the model's classes, in order
    ap: list[float | None]  # per class; None: no positive image
    thresholds: list[float]
    precision: list[float]
    recall: list[float]
    f1: list[float]
    micro_f1: float
    top1: float
    loss: float
    top5: None = None
    tta: str | None = None  # test-time augmentation (bitcli.scores.views), as the single-label result records it

    @property
    def mAP(self) -> float:  # the metric's usual name
        present = [a for a in self.ap if a is not None]
        return float(np.mean(present)) if present else 0.0

    @property
    def per_class(self) -> dict[str, float]:
        """Each class's recall at its threshold (summary.json's val_per_class)."""
        return dict(zip(self.classes, self.recall))

    @property
    def macro_f1(self) -> float:
        return float(np.mean(self.f1)) if self.f1 else 0.0

    @property
    def balanced_accuracy(self) -> float:
        """The mean of the classes' recall at the thresholds (the single-label definition's analogue)."""
        return float(np.mean(self.recall)) if self.recall else 0.0

    def metric(self, name: str) -> float:
        return float(getattr(self, name))

    def to_dict(self) -> dict[str, Any]:
        return {
            "multi_label": True,
            "mAP": self.mAP,
            "ap": dict(zip(self.classes, self.ap)),
            "micro_f1": self.micro_f1,
            "macro_f1": self.macro_f1,
            "precision": dict(zip(self.classes, self.precision)),
            "recall": dict(zip(self.classes, self.recall)),
            "f1": dict(zip(self.classes, self.f1)),
            "thresholds": dict(zip(self.classes, self.thresholds)),
            "top1": self.top1,
            "top5": None,
            "loss": self.loss,
            "count": self.count,
            "labels": self.classes,
            "tta": self.tta,
        }


class MultiLabelAccumulator:
    """Every image's sigmoid scores of every class of the model and its multi-hot truth, batch by batch.
    model_classes: the model's class names, by model index; class_to_model[c]: the model's index of data-set
    class c; thresholds: the model's, by model index (None: fitted on these images at the end, as fine-tuning's
    validation does).

    The metrics are over all of the model's classes (scikit-learn's labels= every class), not only those the
    data holds: a class predicted on images that do not carry it counts its false positives in precision,
    micro and macro F1 (its F1 is 0). Its AP is undefined (None: left out of mAP, listed as such)."""

    def __init__(self, model_classes: Sequence[str], class_to_model: Sequence[int],
                 thresholds: Sequence[float] | None, *, tta: str | None = None) -> None:  # fmt: skip
        self.names, self.tta = list(model_classes), tta
        self.to_model = np.asarray(class_to_model, dtype=np.int64)
        self.thresholds = None if thresholds is None else np.asarray(thresholds, dtype=np.float64)
        self.scores: list[np.ndarray] = []
        self.truth: list[np.ndarray] = []
        self.top_hits = 0
        self.loss_sum = 0.0

    def update(self, logits: torch.Tensor, multi_hot: np.ndarray) -> None:
        """logits [b, model classes] or views [b, V, model classes]; multi_hot [b, data-set classes]."""
        logits = logits.float().cpu()
        probs = scores.probabilities(logits, multi_label=True)  # [b, model classes]
        plain = logits[:, 0] if logits.ndim == 3 else logits
        target = torch.zeros(plain.shape, dtype=torch.float32)
        target[:, torch.from_numpy(self.to_model)] = torch.from_numpy(multi_hot.astype(np.float32))
        bce = F.binary_cross_entropy_with_logits(plain, target, reduction="none") if logits.ndim == 2 else \
            F.binary_cross_entropy(probs.clamp(1e-12, 1 - 1e-12), target, reduction="none")  # fmt: skip
        self.loss_sum += float(bce.sum())
        top = probs.argmax(dim=1).numpy()
        self.top_hits += int(target[torch.arange(len(top)), torch.from_numpy(top)].sum())
        self.scores.append(probs.numpy())
        self.truth.append(target.numpy().astype(np.uint8))

    def result(self) -> MultiLabelResult:
        if not self.scores:
            raise BitError("no images were evaluated")
        s, y = np.concatenate(self.scores), np.concatenate(self.truth)
        thresholds = fit_thresholds(y, s) if self.thresholds is None else self.thresholds.tolist()
        predicted = s >= np.asarray(thresholds, dtype=np.float32)[None]
        tp = (predicted & (y == 1)).sum(0).astype(np.float64)
        fp = (predicted & (y == 0)).sum(0).astype(np.float64)
        fn = (~predicted & (y == 1)).sum(0).astype(np.float64)
        precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
        f1 = _ratio(2 * tp, 2 * tp + fp + fn)
        micro = float(_ratio(np.array([2 * tp.sum()]), np.array([2 * tp.sum() + fp.sum() + fn.sum()]))[0])
        return MultiLabelResult(
            count=len(y), classes=self.names, ap=[average_precision(y[:, c], s[:, c]) for c in range(y.shape[1])],
            thresholds=[float(t) for t in thresholds], precision=precision.tolist(), recall=recall.tolist(),
            f1=f1.tolist(), micro_f1=micro, top1=self.top_hits / len(y), loss=self.loss_sum / len(y), tta=self.tta,
        )  # fmt: skip


# What an evaluation gives: single-label (bitcli.metrics) or multi-label.
Evaluation = EvalResult | MultiLabelResult


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros_like(a, dtype=np.float64), where=b > 0)


def render_table(result: MultiLabelResult, color: bool) -> str:
    """The evaluation for people: mAP, micro/macro F1, and per class AP, threshold, precision, recall, F1."""
    import io

    buf = io.StringIO()
    out = console(buf, color)
    out.print(f"images  {result.count:,} (multi-label" + (f", --tta {result.tta})" if result.tta else ")"))
    out.print(f"mAP     {result.mAP:.4f}")
    out.print(f"micro F1 {result.micro_f1:.4f}  macro F1 {result.macro_f1:.4f} (at the stored thresholds)")
    out.print(f"loss    {result.loss:.4f}")
    undefined = [name for name, ap in zip(result.classes, result.ap) if ap is None]
    if undefined:
        named = ", ".join(map(repr, undefined))  # quoted: a class name may hold ", " (repr escapes control characters)
        out.print(Text(f"AP undefined (no image of the class), left out of mAP: {named}"))
    table = Table(title="per-class AP, threshold, precision, recall and F1")
    for name in ("class", "AP", "threshold", "precision", "recall", "F1"):
        table.add_column(name, justify="left" if name == "class" else "right")
    for i, name in enumerate(result.classes):
        ap = result.ap[i]
        table.add_row(Text(visible(name)), "n/a" if ap is None else f"{ap:.4f}", f"{result.thresholds[i]:.4f}",
                      f"{result.precision[i]:.4f}", f"{result.recall[i]:.4f}", f"{result.f1[i]:.4f}")  # fmt: skip
    out.print(table)
    return buf.getvalue()
