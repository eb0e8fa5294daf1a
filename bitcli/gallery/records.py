"""Per-image results of an evaluation, kept while it runs (evaluation.evaluate's `keep`): for every image its
prediction, loss, p(true), p(pred), the rank of its true label and its top three, computed from the same logits
the metrics are accumulated from (no second pass). Then the errors in the gallery's order, and both as CSV.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from bitcli.metrics import TOP_K
from bitcli.pages.html import utf8

TOP = 3  # predictions shown per image
CSV_COLUMNS = ("path", "true_label", "predicted_label", "p_true", "p_pred", "loss", "true_rank")
OTHER_CLASS = -1  # `Results.pred_class` of a prediction outside the evaluated classes


class PerImage:
    """Collects per-image results, stack by stack. `class_to_model[c]`: the model's index of data-set class c;
    `targets`: every image's data-set class."""

    def __init__(self, class_to_model: Sequence[int], targets: Sequence[int] | np.ndarray) -> None:
        self.to_model = np.asarray(class_to_model, dtype=np.int64)
        self.targets = np.asarray(targets, dtype=np.int64)
        self.parts: list[dict[str, np.ndarray]] = []

    def add(self, indices: np.ndarray, logits: torch.Tensor) -> None:
        """The images `indices` (data-set indices) and their logits [b, model classes], as the metrics saw them."""
        logits = logits.float().cpu()
        true = torch.from_numpy(self.to_model[self.targets[indices]])
        log_p = F.log_softmax(logits, dim=1)
        # The metrics' own call (metrics.Accumulator), so that the predicted class is theirs, ties included
        top = logits.topk(min(TOP_K, logits.shape[1]), dim=1).indices[:, :TOP]
        true_logit = logits.gather(1, true[:, None])
        self.parts.append(
            {
                "index": np.asarray(indices, dtype=np.int64),
                "pred": top[:, 0].numpy().astype(np.int64),
                "loss": F.cross_entropy(logits, true, reduction="none").numpy(),
                "p_true": log_p.gather(1, true[:, None])[:, 0].exp().numpy(),
                "p_pred": log_p.gather(1, top[:, :1])[:, 0].exp().numpy(),
                "rank": (1 + (logits > true_logit).sum(dim=1)).numpy().astype(np.int64),
                "top": top.numpy().astype(np.int64),
                "top_p": log_p.gather(1, top).exp().numpy(),
            }
        )

    def results(self) -> Results:
        """Everything added, in data-set order."""
        if not self.parts:
            empty = {k: np.zeros(0, dtype=np.int64) for k in ("index", "pred", "rank")}
            return Results(**empty, loss=np.zeros(0, np.float32), p_true=np.zeros(0, np.float32),
                           p_pred=np.zeros(0, np.float32), top=np.zeros((0, TOP), np.int64),
                           top_p=np.zeros((0, TOP), np.float32), true=np.zeros(0, np.int64),
                           true_model=np.zeros(0, np.int64), pred_class=np.zeros(0, np.int64))  # fmt: skip
        merged = {k: np.concatenate([p[k] for p in self.parts]) for k in self.parts[0]}
        order = np.argsort(merged["index"], kind="stable")
        merged = {k: v[order] for k, v in merged.items()}
        true = self.targets[merged["index"]]
        class_of_model = np.full(max(self.to_model.max(initial=-1), merged["pred"].max(initial=-1)) + 1, OTHER_CLASS)
        for c, m in enumerate(self.to_model.tolist()):  # (a model index named twice: the last class, as a dict's)
            if m >= 0:
                class_of_model[m] = c
        pred_class = class_of_model[merged["pred"]].astype(np.int64)
        return Results(**merged, true=true, true_model=self.to_model[true], pred_class=pred_class)


@dataclass(frozen=True)
class Results:
    """Per image, in data-set order (arrays of the same length)."""

    index: np.ndarray  # data-set index
    true: np.ndarray  # data-set class
    true_model: np.ndarray  # the model's index of it
    pred: np.ndarray  # the model's predicted index (top-1)
    pred_class: np.ndarray  # the data-set class predicted, OTHER_CLASS for a label outside them
    loss: np.ndarray  # cross-entropy of the true label
    p_true: np.ndarray
    p_pred: np.ndarray
    rank: np.ndarray  # 1 + the classes scored above the true one
    top: np.ndarray  # [n, TOP] model indices, best first
    top_p: np.ndarray  # [n, TOP] their probabilities

    def __len__(self) -> int:
        return len(self.index)

    def errors(self) -> np.ndarray:
        """Positions of the misclassified images."""
        return np.flatnonzero(self.pred != self.true_model)


@dataclass(frozen=True)
class Pair:
    """The errors of one confusion cell: images of class `true` predicted as `pred` (a data-set class, or
    OTHER_CLASS), by loss, highest first; `rows` are positions in Results."""

    true: int
    pred: int
    rows: np.ndarray


def pairs(results: Results) -> list[Pair]:
    """The errors grouped by (true, predicted) cell: the cells with the most errors first (then the highest
    loss, then the classes' order), each cell's images by loss, highest first (then data-set order)."""
    errors = results.errors()
    cells: dict[tuple[int, int], list[int]] = {}
    for row in errors[np.lexsort((results.index[errors], -results.loss[errors]))]:
        cells.setdefault((int(results.true[row]), int(results.pred_class[row])), []).append(int(row))

    def order(cell: tuple[tuple[int, int], list[int]]) -> tuple:
        (true, pred), rows = cell
        return -len(rows), -float(results.loss[rows[0]]), true, pred if pred != OTHER_CLASS else np.iinfo(np.int64).max

    return [
        Pair(true, pred, np.asarray(rows, dtype=np.int64)) for (true, pred), rows in sorted(cells.items(), key=order)
    ]


def predicted_name(results: Results, row: int, classes: Sequence[str], labels: Sequence[str]) -> str:
    """What image `row` was predicted as: its data-set class's name, or the model's label outside them."""
    c = int(results.pred_class[row])
    return classes[c] if c != OTHER_CLASS else label_name(labels, int(results.pred[row]))


def label_name(labels: Sequence[str], index: int) -> str:
    return labels[index] if 0 <= index < len(labels) else str(index)


def csv_rows(results: Results, *, names: Sequence[str], classes: Sequence[str],
             labels: Sequence[str]) -> list[tuple[object, ...]]:  # fmt: skip
    """Every image's CSV_COLUMNS, by position in Results (`names[row]`: its path or row name), computed column by
    column once for both files. Probabilities and losses with float32's 7 significant digits; text as valid
    UTF-8 (pages.html.utf8)."""
    class_text = [utf8(name) for name in classes]
    true = [class_text[c] for c in results.true.tolist()]
    predicted = [class_text[c] if c != OTHER_CLASS else utf8(label_name(labels, p))
                 for c, p in zip(results.pred_class.tolist(), results.pred.tolist())]  # fmt: skip
    numbers = [[_number(x) for x in column.tolist()] for column in (results.p_true, results.p_pred, results.loss)]
    return list(zip([utf8(name) for name in names], true, predicted, *numbers, results.rank.tolist()))


def csv_bytes(cells: Sequence[tuple[object, ...]], rows: Iterable[int]) -> bytes:
    """CSV_COLUMNS for `rows` (positions in Results) in that order; `cells`: csv_rows."""
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\n")
    out.writerow(CSV_COLUMNS)
    out.writerows(cells[row] for row in rows)
    return buf.getvalue().encode("utf-8")


def _number(x: float) -> str:
    return format(float(x), ".7g")
