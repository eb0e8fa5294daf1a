"""Per-image results of a multi-label evaluation, kept while it runs (evaluation.evaluate's `keep`): every
image's sigmoid score of every class of the model, the scores the metrics were computed from (no second pass),
and its labels. Then each class's errors at the thresholds, in the gallery's order, and both as CSV.

A class's errors: its false positives (images without the label whose score reached the class's threshold),
the highest score first, and its false negatives (images with the label below it), the lowest score first.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from bitcli.pages.html import utf8

CSV_ERRORS = ("path", "class", "error", "score", "threshold", "true_labels", "predicted_labels")
FALSE_POSITIVE, FALSE_NEGATIVE = "false positive", "false negative"


class MultiLabelPerImage:
    """Collects per-image scores, stack by stack. `class_to_model[c]`: the model's index of data-set class c;
    `multi_hot` [N, data-set classes]: every image's labels; `classes`: the model's class count."""

    def __init__(self, class_to_model: Sequence[int], multi_hot: np.ndarray, classes: int) -> None:
        self.to_model = np.asarray(class_to_model, dtype=np.int64)
        self.multi_hot = np.asarray(multi_hot, dtype=np.uint8)
        self.classes = classes
        self.parts: list[tuple[np.ndarray, np.ndarray]] = []

    def add(self, indices: np.ndarray, scores: torch.Tensor) -> None:
        """The images `indices` (data-set indices) and their scores [b, model classes], as the metrics saw them."""
        self.parts.append((np.asarray(indices, dtype=np.int64), scores.float().cpu().numpy()))

    def results(self) -> LabelResults:
        """Everything added, in data-set order."""
        index = np.concatenate([i for i, _ in self.parts]) if self.parts else np.zeros(0, np.int64)
        scores = np.concatenate([s for _, s in self.parts]) if self.parts else np.zeros((0, self.classes), np.float32)
        order = np.argsort(index, kind="stable")
        index, scores = index[order], scores[order]
        truth = np.zeros(scores.shape, dtype=np.uint8)
        truth[:, self.to_model] = self.multi_hot[index]
        return LabelResults(index=index, truth=truth, scores=scores)


@dataclass(frozen=True)
class LabelResults:
    """Per image, in data-set order: its data-set index, and over the model's classes its labels (multi-hot)
    and scores."""

    index: np.ndarray  # [n]
    truth: np.ndarray  # [n, classes] uint8
    scores: np.ndarray  # [n, classes] float32

    def __len__(self) -> int:
        return len(self.index)

    def predicted(self, thresholds: Sequence[float]) -> np.ndarray:
        """[n, classes] bool: the score reaches the class's threshold (compared as the metrics compare)."""
        return self.scores >= np.asarray(thresholds, dtype=np.float32)[None]


@dataclass(frozen=True)
class ClassErrors:
    """One class's errors (rows are positions in LabelResults): false positives by score, highest first, and
    false negatives by score, lowest first (ties: data-set order)."""

    cls: int  # the model's class index
    false_pos: np.ndarray
    false_neg: np.ndarray

    def __len__(self) -> int:
        return len(self.false_pos) + len(self.false_neg)


def class_errors(results: LabelResults, thresholds: Sequence[float]) -> list[ClassErrors]:
    """Every class with an error, the classes with the most errors first (then the classes' order)."""
    predicted = results.predicted(thresholds)
    found = []
    for c in range(results.scores.shape[1]):
        s, truth = results.scores[:, c], results.truth[:, c] == 1
        fp, fn = np.flatnonzero(predicted[:, c] & ~truth), np.flatnonzero(~predicted[:, c] & truth)
        errors = ClassErrors(c, fp[np.lexsort((results.index[fp], -s[fp]))], fn[np.lexsort((results.index[fn], s[fn]))])
        if len(errors):
            found.append(errors)
    return sorted(found, key=lambda e: (-len(e), e.cls))


def gallery_rows(cells: Iterable[ClassErrors]) -> list[tuple[int, int, str]]:
    """(row, class, kind) of every error in the gallery's order: class by class, its false positives, then its
    false negatives."""
    return [(int(r), e.cls, kind) for e in cells for kind, rows in ((FALSE_POSITIVE, e.false_pos),
                                                                    (FALSE_NEGATIVE, e.false_neg)) for r in rows]  # fmt: skip


@dataclass(frozen=True)
class LabelTexts:
    """Every image's path and labels as the CSV files write them (valid UTF-8: pages.html.utf8), the labels as
    JSON lists (a label may hold any character: a list is read back unambiguously): the true ones in the model's
    class order, the predicted ones (at the thresholds) by score, highest first."""

    paths: list[str]
    true: list[str]
    predicted: list[str]

    @classmethod
    def of(cls, results: LabelResults, labels: Sequence[str], thresholds: Sequence[float], *,
           names: Sequence[str]) -> LabelTexts:  # fmt: skip
        """`names[row]`: each image's path or row name."""
        predicted = results.predicted(thresholds)
        by_score = np.argsort(-results.scores, axis=1, kind="stable")
        in_class_order = np.broadcast_to(np.arange(results.truth.shape[1]), results.truth.shape)
        true = np.where(results.truth == 1, in_class_order, -1)
        predicted_by_score = np.where(np.take_along_axis(predicted, by_score, axis=1), by_score, -1)
        return cls(paths=[utf8(name) for name in names], true=_label_lists(true, labels),
                   predicted=_label_lists(predicted_by_score, labels))  # fmt: skip


def _label_lists(classes: np.ndarray, labels: Sequence[str]) -> list[str]:
    """Each row's classes (model indices in the order listed; -1: a place left empty) as a JSON list of labels.
    Label sets repeat: each distinct row is written once."""
    if not len(classes):
        return []
    distinct, which = np.unique(classes, axis=0, return_inverse=True)
    texts = [json.dumps([utf8(labels[c]) for c in row[row >= 0].tolist()], ensure_ascii=False) for row in distinct]
    return [texts[i] for i in which.reshape(-1).tolist()]


def errors_csv(results: LabelResults, rows: Iterable[tuple[int, int, str]], *, labels: Sequence[str],
               thresholds: Sequence[float], texts: LabelTexts) -> bytes:  # fmt: skip
    """CSV_ERRORS for each (row, class, kind)."""
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\n")
    out.writerow(CSV_ERRORS)
    label_texts, threshold_texts = [utf8(name) for name in labels], [_number(t) for t in thresholds]
    scores = results.scores
    out.writerows((texts.paths[row], label_texts[c], kind, _number(scores[row, c]), threshold_texts[c],
                   texts.true[row], texts.predicted[row]) for row, c, kind in rows)  # fmt: skip
    return buf.getvalue().encode("utf-8")


def predictions_csv(results: LabelResults, rows: Iterable[int], *, labels: Sequence[str], texts: LabelTexts) -> bytes:
    """One row per image, for `rows` (positions in LabelResults) in that order: path, true_labels,
    predicted_labels, then each class's score (the column `score:LABEL`, in the model's class order)."""
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\n")
    out.writerow(["path", "true_labels", "predicted_labels", *(f"score:{utf8(name)}" for name in labels)])
    scores = results.scores
    out.writerows((texts.paths[row], texts.true[row], texts.predicted[row], *(_number(s) for s in scores[row].tolist()))
                  for row in rows)  # fmt: skip
    return buf.getvalue().encode("utf-8")


def by_score(results: LabelResults, row: int, chosen: np.ndarray) -> list[int]:
    """The classes where `chosen` (bool [classes]) is set, by the image's score, highest first."""
    picked = np.flatnonzero(chosen)
    return [int(c) for c in picked[np.argsort(-results.scores[row, picked], kind="stable")]]


def _number(x: float) -> str:
    return format(float(x), ".7g")
