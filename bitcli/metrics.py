"""Evaluation metrics: top-1/top-5, loss, per-class accuracy, the confusion matrix and how far the scores can
be trusted (NLL, expected calibration error and its reliability bins), accumulated over batches of logits, and
the table that shows them to people. `bit eval` and fine-tuning's validation both report an EvalResult.

The scores are bitcli.scores' (softmax of logits / T, with test-time augmentation the mean over the views):
top-1, top-5, the confusion matrix, NLL and ECE are those of the scores as `bit predict` reports them, over the
model's every class (a prediction of a class outside the evaluated folders is wrong). `loss` is the cross-
entropy at temperature 1: what training minimises and fine-tuning's validation reports.
"""

from __future__ import annotations

import io
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
from bitcli.render import console
from bitcli.ui import visible

OTHER = "(other)"  # confusion-matrix column for predictions outside the evaluated classes (see other_label)
TOP_K = 5
NO_TOP5 = "n/a (the model has 5 classes or fewer)"  # the top five would always hold the answer
ECE_BINS = 15  # equal-width bins of the top-1 score: (0, 1/15], (1/15, 2/15], ... (14/15, 1]
# The metrics --keep-best can select on, each with whether higher is better.
SELECTION_METRICS = {"top1": True, "macro_f1": True, "balanced_accuracy": True, "loss": False, "mAP": True}
# Those that mean something for one kind of model only: top-1 and balanced accuracy count one label an image,
# mAP ranks each class's scores over images that may carry several (bitcli.multilabel).
SINGLE_LABEL_ONLY = ("top1", "balanced_accuracy")
MULTI_LABEL_ONLY = ("mAP",)


def selection_metrics(multi_label: bool) -> list[str]:
    """The --keep-best metrics that apply to a single-label or a multi-label run, in SELECTION_METRICS order."""
    excluded = SINGLE_LABEL_ONLY if multi_label else MULTI_LABEL_ONLY
    return [name for name in SELECTION_METRICS if name not in excluded]


@dataclass(frozen=True)
class EvalResult:
    top1: float
    top5: float | None  # None when the model has at most 5 classes (top-5 would be 1.0 by definition)
    loss: float
    count: int
    per_class: dict[str, float]  # data-set class -> top-1 accuracy on its images
    labels: list[str]  # rows (true) and columns (predicted) of `confusion`
    confusion: list[list[int]]
    nll: float | None = None  # mean -log(score of the true class), with the temperature; None: not measured
    # ECE_BINS bins of the top-1 score: {"count": [...], "confidence": [mean score or None], "accuracy": [...]}
    reliability: dict[str, list] | None = None
    temperature: float = 1.0  # the model's, applied to the scores
    tta: str | None = None  # test-time augmentation (bitcli.scores.views)
    other: str = OTHER  # the name of the catch-all column, in `labels` (last) only when a prediction fell there

    @property
    def other_column(self) -> str | None:
        """The catch-all column's label when the matrix has it (its last), else None."""
        return self.other if self.labels and self.labels[-1] == self.other else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "top1": self.top1,
            "top5": self.top5,
            "loss": self.loss,
            "nll": self.nll,
            "ece": self.ece,
            "count": self.count,
            "per_class": self.per_class,
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "macro_f1": self.macro_f1,
            "balanced_accuracy": self.balanced_accuracy,
            "confusion": self.confusion,
            "labels": self.labels,
            "other": self.other_column,  # which label is the catch-all column (None: no such column)
            "reliability": self.reliability,
            "temperature": self.temperature,
            "tta": self.tta,
        }

    def metric(self, name: str) -> float:
        """One of SELECTION_METRICS by name (--keep-best)."""
        return float(getattr(self, name))

    @property
    def balanced_accuracy(self) -> float:
        """The unweighted mean of the classes' recall, over the classes that have images (scikit-learn's
        balanced_accuracy_score)."""
        return float(np.mean(list(self.per_class.values()))) if self.per_class else 0.0

    @property
    def ece(self) -> float | None:
        """Expected calibration error: over the bins of the top-1 score, |accuracy - mean score| weighted by
        the bin's share of the images."""
        if self.reliability is None:
            return None
        count = np.asarray(self.reliability["count"], dtype=np.float64)
        gap = [abs(a - c) if n else 0.0 for n, a, c in
               zip(count, self.reliability["accuracy"], self.reliability["confidence"])]  # fmt: skip
        return float(np.dot(count, gap) / count.sum())

    # Precision, recall and F1 by scikit-learn's definitions (precision_recall_fscore_support with
    # zero_division=0 and labels = the classes in `per_class`), read off the confusion matrix. A prediction
    # of a label outside the evaluated classes (the (other) column) is a false negative of the true class
    # and a false positive of no evaluated class, as in scikit-learn when `labels` leaves that label out.

    def _class_counts(self) -> dict[str, tuple[int, int, int]]:
        """class -> (true positives, predictions of it, images of it), for the classes in `per_class`."""
        matrix = np.asarray(self.confusion, dtype=np.int64).reshape(len(self.labels), len(self.labels))
        axis = {name: i for i, name in enumerate(self.labels)}
        return {
            name: (int(matrix[i, i]), int(matrix[:, i].sum()), int(matrix[i].sum()))
            for name, i in ((name, axis[name]) for name in self.per_class)
        }

    @property
    def precision(self) -> dict[str, float]:
        return {name: tp / predicted if predicted else 0.0 for name, (tp, predicted, _) in self._class_counts().items()}

    @property
    def recall(self) -> dict[str, float]:
        return {name: tp / images if images else 0.0 for name, (tp, _, images) in self._class_counts().items()}

    @property
    def f1(self) -> dict[str, float]:
        # 2TP / (2TP + FP + FN): scikit-learn's form, equal to 2PR / (P + R) and 0 where that is undefined
        return {
            name: 2 * tp / (predicted + images) if tp else 0.0
            for name, (tp, predicted, images) in self._class_counts().items()
        }

    @property
    def macro_f1(self) -> float:
        """The unweighted mean of the classes' F1 (scikit-learn's average="macro")."""
        f1 = list(self.f1.values())
        return float(np.mean(f1)) if f1 else 0.0


class Accumulator:
    """Running counts over batches of logits, so that no [N, classes] array is ever held. `temperature`: the
    model's (bitcli.scores), applied to every metric but `loss`; `tta`: recorded in the result."""

    def __init__(self, class_names: Sequence[str], class_to_model: Sequence[int], num_model_classes: int,
                 *, temperature: float = 1.0, tta: str | None = None) -> None:  # fmt: skip
        self.temperature, self.tta = temperature, tta
        self.names = list(class_names)
        self.other = other_label(self.names)
        self.to_model = np.asarray(class_to_model, dtype=np.int64)
        self.with_top5 = num_model_classes > TOP_K
        # Confusion axes: the evaluated classes in the model's label order, then OTHER when needed.
        order = np.argsort(self.to_model, kind="stable")
        self.axis_names = [self.names[i] for i in order]
        self.axis_of_model = {int(self.to_model[i]): a for a, i in enumerate(order)}
        self.confusion = np.zeros((len(self.names) + 1, len(self.names) + 1), dtype=np.int64)
        self.correct1 = np.zeros(len(self.names), dtype=np.int64)
        self.totals = np.zeros(len(self.names), dtype=np.int64)
        self.correct5 = 0
        self.loss_sum = 0.0
        self.nll_sum = 0.0
        self.bin_count = np.zeros(ECE_BINS, dtype=np.int64)
        self.bin_score = np.zeros(ECE_BINS, dtype=np.float64)  # sum of the top-1 scores in each bin
        self.bin_correct = np.zeros(ECE_BINS, dtype=np.int64)

    def update(self, logits: torch.Tensor, targets: np.ndarray) -> None:
        """logits: float tensor [b, num_model_classes], or [b, views, num_model_classes] with test-time
        augmentation; targets: data-set class indices [b]."""
        model_targets = torch.from_numpy(self.to_model[targets])
        logits = logits.float().cpu()
        if logits.ndim == 3 and logits.shape[1] == 1:
            logits = logits[:, 0]
        log_p = scores.log_probabilities(logits, self.temperature)
        plain = log_p if self.temperature == 1.0 else scores.log_probabilities(logits, 1.0)
        self.loss_sum += float(F.nll_loss(plain, model_targets, reduction="sum"))  # = F.cross_entropy(logits)
        self.nll_sum += float(F.nll_loss(log_p, model_targets, reduction="sum"))
        # One view: ranked by the logits themselves (the order of their scores, without a rounding tie).
        ranked = logits if logits.ndim == 2 else log_p
        topk = ranked.topk(min(TOP_K, ranked.shape[1]), dim=1).indices.numpy()
        pred = topk[:, 0]
        self._bin(scores.top_scores(logits, pred, self.temperature), pred == model_targets.numpy())
        hit1 = pred == model_targets.numpy()
        self.correct5 += int((topk == model_targets.numpy()[:, None]).any(axis=1).sum())
        np.add.at(self.correct1, targets, hit1.astype(np.int64))
        np.add.at(self.totals, targets, 1)
        other = len(self.names)
        rows = np.array([self.axis_of_model[int(self.to_model[t])] for t in targets], dtype=np.int64)
        cols = np.array([self.axis_of_model.get(int(p), other) for p in pred], dtype=np.int64)
        np.add.at(self.confusion, (rows, cols), 1)

    def _bin(self, top_score: np.ndarray, correct: np.ndarray) -> None:
        """Count each image's top-1 score in its bin, (lower, upper] (a score of exactly 1 in the last)."""
        edges = np.linspace(0.0, 1.0, ECE_BINS + 1)
        bins = np.clip(np.searchsorted(edges, top_score, side="left") - 1, 0, ECE_BINS - 1)
        np.add.at(self.bin_count, bins, 1)
        np.add.at(self.bin_score, bins, top_score)
        np.add.at(self.bin_correct, bins, correct.astype(np.int64))

    def reliability(self) -> dict[str, list]:
        counts = self.bin_count.tolist()
        return {
            "count": counts,
            "confidence": [float(s / n) if n else None for s, n in zip(self.bin_score, counts)],
            "accuracy": [float(c / n) if n else None for c, n in zip(self.bin_correct, counts)],
        }

    def result(self) -> EvalResult:
        count = int(self.totals.sum())
        if count == 0:
            raise BitError("no images were evaluated")
        n = len(self.names)
        with_other = bool(self.confusion[:, n].any())
        size = n + 1 if with_other else n
        return EvalResult(
            top1=float(self.correct1.sum() / count),
            top5=float(self.correct5 / count) if self.with_top5 else None,
            loss=self.loss_sum / count,
            count=count,
            per_class={
                name: float(self.correct1[i] / self.totals[i]) for i, name in enumerate(self.names) if self.totals[i]
            },
            labels=self.axis_names + ([self.other] if with_other else []),
            confusion=self.confusion[:size, :size].tolist(),
            nll=self.nll_sum / count,
            reliability=self.reliability(),
            temperature=self.temperature,
            tta=self.tta,
            other=self.other,
        )


def other_label(classes: Sequence[str]) -> str:
    """The catch-all column's name: "(other)", or when a class has that name "(other, not evaluated)" (then
    with " 2", " 3" ... until no class has it), so that every label of the matrix names one column."""
    taken = set(classes)
    name, n = OTHER, 1
    while name in taken:
        n += 1
        name = "(other, not evaluated)" if n == 2 else f"(other, not evaluated {n - 1})"
    return name


MAX_CONFUSION_TABLE = 25  # classes; wider matrices are for --format json
PIPED_WIDTH = 200  # columns of a table that does not go to a terminal: wide enough for long label names


def render_table(result: EvalResult, color: bool) -> str:
    """The report for people. `color`: for a terminal (styled, and as wide as the terminal)."""
    buf = io.StringIO()
    out = console(buf, color, width=None if color else PIPED_WIDTH)
    out.print(f"images  {result.count}")
    out.print(f"top-1   {result.top1:.4f}")
    out.print(f"top-5   {result.top5:.4f}" if result.top5 is not None else f"top-5   {NO_TOP5}")
    out.print(f"loss    {result.loss:.4f}")
    out.print(f"macro F1 {result.macro_f1:.4f}")
    out.print(f"balanced accuracy {result.balanced_accuracy:.4f}")
    if result.nll is not None and result.ece is not None:
        settings = [f"temperature {result.temperature:.4g}"] * (result.temperature != 1.0)
        settings += [f"--tta {result.tta}"] * (result.tta is not None)
        out.print(f"NLL {result.nll:.4f}  ECE {result.ece:.4f}" + (f"  ({', '.join(settings)})" if settings else ""))
    # Class names are data: Text keeps them literal ("[bold]cat[/bold]" is not markup) and visible() on one
    # line (a newline in a folder name would break the row).
    per_class = Table(title="per-class top-1, precision and F1")
    per_class.add_column("class", overflow="fold")
    per_class.add_column("top-1 (recall)", justify="right")
    row_of = {name: i for i, name in enumerate(result.labels)}
    per_class.add_column("images", justify="right")
    per_class.add_column("precision", justify="right")
    per_class.add_column("F1", justify="right")
    precision, f1 = result.precision, result.f1
    for name, accuracy in result.per_class.items():
        per_class.add_row(Text(visible(name)), f"{accuracy:.4f}", str(sum(result.confusion[row_of[name]])),
                          f"{precision[name]:.4f}", f"{f1[name]:.4f}")  # fmt: skip
    out.print(per_class)
    if len(result.labels) <= MAX_CONFUSION_TABLE:
        out.print("confusion matrix (rows: true class, columns: predicted class)")
        confusion = Table()
        confusion.add_column("")
        for name in result.labels:
            confusion.add_column(Text(visible(name)), justify="right")
        rows = list(zip(result.labels, result.confusion))
        if result.other_column is not None and not any(rows[-1][1]):
            rows.pop()  # the (other) column has no row: no image is of a class outside the evaluated ones
        for name, row in rows:
            confusion.add_row(Text(visible(name)), *(str(v) for v in row))
        out.print(confusion)
    else:
        out.print(f"confusion matrix: {len(result.labels)} classes; use --format json to get it")
    return buf.getvalue()
