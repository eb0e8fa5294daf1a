"""The HTML of `bit eval --report`'s index.html for a multi-label model, where a confusion matrix does not apply
(an image has any number of labels): the metrics (mAP, micro/macro F1), per-class average precision (the
picture `bit eval --plot` draws, and a table: AP, threshold, precision, recall, F1, images), and the gallery:
per class, its worst false positives (the highest scores among images without the label that reached the
threshold) and worst false negatives (the lowest scores among images with the label), each with the Grad-CAM
overlay for that class, its labels and scores. Every label, path and file name goes through
bitcli.pages.html's escaping.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bitcli.extras import install
from bitcli.gallery.drawing import Picture, Shown
from bitcli.gallery.multilabel_records import (
    FALSE_NEGATIVE,
    FALSE_POSITIVE,
    ClassErrors,
    LabelResults,
    by_score,
    gallery_rows,
)
from bitcli.multilabel import MultiLabelResult
from bitcli.pages.html import Html, document, element, image, join, table
from bitcli.pages.pictures import THUMB

AP_PICTURE = "ap.png"  # the per-class AP picture's file in the report folder
NO_CALIBRATION = (
    "Calibration (ECE and the reliability diagram) is measured on a single-label model's top-1 score; a "
    "multi-label model's independent per-class scores are judged here by their average precision."
)
NO_PICTURE = (
    f"No per-class AP picture: it needs matplotlib (the plots extra), which is not installed ({install('plots')})."
)


@dataclass(frozen=True)
class LabelReportInput:
    """What the page shows."""

    title: str  # the data set and the model, for the heading
    result: MultiLabelResult
    results: LabelResults
    cells: list[ClassErrors]  # the classes with errors, in the gallery's order
    shown: dict[int, Shown]  # by error number (its row in errors.csv, from 1); one overlay: the section's class
    names: Sequence[str]  # each image's path (or row name), by position in `results`
    gradcam: str  # what the overlays show, or why there are none
    per_kind: int  # the most false positives (and false negatives) shown per class
    max_shown: int  # ... and in all
    picture: Picture | None  # the per-class AP picture beside the page; None: not drawn (no matplotlib)
    note: str | None = None


def render(r: LabelReportInput) -> str:
    errors = sum(len(c) for c in r.cells)
    numbered = _numbered(r)
    shows = {c.cls for c in r.cells if any(n in r.shown for n in numbered[c.cls])}
    body = [
        element("h1", "bit eval report (multi-label)"),
        element("p", r.title + (f" (--tta {r.result.tta})" if r.result.tta else ""), attrs={"class": "muted"}),
        _numbers(r.result, errors),
        element("p", r.note, attrs={"class": "note"}) if r.note else Html(""),
        element("p", NO_CALIBRATION, attrs={"class": "muted"}),
        _data_links(),
        element("h2", "Per-class average precision, lowest first"),
        _ap_picture(r),
        _per_class(r),
        element("h2", f"Errors at the thresholds ({errors})"),
        _gallery_intro(r, errors),
        *(_section(r, c, numbered[c.cls]) for c in r.cells if c.cls in shows),
        _unshown(r, [c for c in r.cells if c.cls not in shows]),
    ]
    return document(f"bit eval report: {r.title}", join(body, "\n"))


def _numbered(r: LabelReportInput) -> dict[int, list[int]]:
    """class -> the error numbers of its false positives, then false negatives (errors.csv's rows)."""
    found: dict[int, list[int]] = {}
    for number, (_, c, _) in enumerate(gallery_rows(r.cells), 1):
        found.setdefault(c, []).append(number)
    return found


def section_id(c: int) -> str:
    """The anchor of class c's gallery section (or of its row in the table of classes without pictures)."""
    return f"class-{c}"


def _numbers(result: MultiLabelResult, errors: int) -> Html:
    items = [("images", f"{result.count}"), ("class errors", str(errors)), ("mAP", f"{result.mAP:.4f}"),
             ("micro F1", f"{result.micro_f1:.4f}"), ("macro F1", f"{result.macro_f1:.4f}"),
             ("top-1 is a label", f"{result.top1:.4f}"), ("loss (BCE)", f"{result.loss:.4f}")]  # fmt: skip
    return element("ul", *(element("li", element("b", v), k) for k, v in items), attrs={"class": "stats"})


def _data_links() -> Html:
    errors = element("a", "errors.csv", attrs={"href": "errors.csv"})
    predictions = element("a", "predictions.csv", attrs={"href": "predictions.csv"})
    return element("p", join(["The data behind this page: ", errors, " (one row per class error, in the gallery's "
                              "order) and ", predictions, " (one row per image, with every class's score)."]))  # fmt: skip


def _ap_picture(r: LabelReportInput) -> Html:
    if r.picture is None:
        return element("p", NO_PICTURE, attrs={"class": "note"})
    alt = "per-class average precision and F1 at the threshold, as bars"
    return element("div", image(r.picture.src, alt, width=r.picture.width, height=r.picture.height),
                   attrs={"class": "plot"})  # fmt: skip


def _per_class(r: LabelReportInput) -> Html:
    """Each class: AP (n/a without a positive image: left out of mAP), threshold, precision, recall, F1, its
    images and its errors, linked to its gallery section; the lowest AP first, n/a last, ties in class order."""
    res, support = r.result, r.results.truth.sum(axis=0)
    counts = {c.cls: (len(c.false_pos), len(c.false_neg)) for c in r.cells}
    order = sorted(range(len(res.classes)), key=lambda c: (res.ap[c] is None, res.ap[c] or 0.0, c))
    rows = []
    for c in order:
        fp, fn = counts.get(c, (0, 0))
        name = element("a", res.classes[c], attrs={"href": f"#{section_id(c)}"}) if fp + fn else res.classes[c]
        ap = res.ap[c]
        rows.append([name, "n/a" if ap is None else f"{ap:.4f}", f"{res.thresholds[c]:.4f}", f"{res.precision[c]:.4f}",
                     f"{res.recall[c]:.4f}", f"{res.f1[c]:.4f}", str(int(support[c])), str(fp), str(fn)])  # fmt: skip
    head = ["class", "AP", "threshold", "precision", "recall", "F1", "images", "false pos.", "false neg."]
    return element("div", table(head, rows, cls="numbers per-class"), attrs={"class": "scroll"})


def _gallery_intro(r: LabelReportInput, errors: int) -> Html:
    if not errors:
        return element("p", "None: every label of every image is on the right side of its threshold.")
    cap = (f"Each class shows its {r.per_kind} worst false positives and {r.per_kind} worst false negatives, "
           f"{r.max_shown} pictures at most in all: {len(r.shown)} of {errors} are shown here; errors.csv lists every one.")  # fmt: skip
    return join([element("p", "Per class, the classes with the most errors first: its false positives (images "
                              "without the label whose score reached the class's threshold), the highest score "
                              "first, then its false negatives (images with the label scored below it), the lowest "
                              "score first. The overlay is Grad-CAM for the section's class. ", cap),
                 element("p", r.gradcam, attrs={"class": "note"})])  # fmt: skip


def _section(r: LabelReportInput, cell: ClassErrors, numbers: list[int]) -> Html:
    name, c = r.result.classes[cell.cls], cell.cls
    fp, fn = len(cell.false_pos), len(cell.false_neg)
    summary = f": {_count(fp, FALSE_POSITIVE)}, {_count(fn, FALSE_NEGATIVE)} (threshold {r.result.thresholds[c]:.4f})"
    parts = [element("h3", join([name, summary]))]
    kinds = ((FALSE_POSITIVE, cell.false_pos, numbers[:fp], "highest score first"),
             (FALSE_NEGATIVE, cell.false_neg, numbers[fp:], "lowest score first"))  # fmt: skip
    for kind, rows, kind_numbers, order in kinds:
        if not len(rows):
            continue
        figures = [_figure(r, int(row), c, kind=kind, shown=r.shown[n]) for row, n in zip(rows, kind_numbers)
                   if n in r.shown]  # fmt: skip
        parts.append(element("h4", f"{kind[0].upper()}{kind[1:]}s, {order}"))
        if len(figures) < len(rows):
            rest = len(rows) - len(figures)
            parts.append(element("p", f"{len(figures)} shown; the other {rest} {'is' if rest == 1 else 'are'} in "
                                      "errors.csv.", attrs={"class": "muted"}))  # fmt: skip
        if figures:
            parts.append(element("div", *figures, attrs={"class": "grid", "data-kind": kind}))
    return element("section", *parts, attrs={"class": "pair", "id": section_id(c), "data-class": name})


def _count(n: int, kind: str) -> str:
    return f"{n} {kind}{'s' * (n != 1)}"


def _figure(r: LabelReportInput, row: int, c: int, *, kind: str, shown: Shown) -> Html:
    res, classes, thresholds = r.results, r.result.classes, r.result.thresholds
    name = classes[c]
    pictures = [(shown.thumbnail, "image", "the image")]
    if shown.overlays:
        pictures.append((shown.overlays[0], f"Grad-CAM: {name}", f"Grad-CAM for the class {name}"))
    cells = [element("div", image(src, alt, width=THUMB, height=THUMB), element("span", caption, attrs={"title": caption}))
             for src, caption, alt in pictures if src is not None]  # fmt: skip
    predicted = by_score(res, row, res.scores[row] >= np.asarray(thresholds, dtype=np.float32))
    caption = [
        element("div", f"#{shown.number} ", r.names[row], attrs={"class": "path"}),
        element("div", f"{kind}: ", element("b", name), f" score {res.scores[row, c]:.3f}, threshold {thresholds[c]:.3f}"),
        element("div", "labels: ", _names(classes, np.flatnonzero(res.truth[row])), attrs={"class": "labels"}),
        element("div", "predicted: ", _names(classes, predicted, scores=res.scores[row]), attrs={"class": "predicted"}),
    ]  # fmt: skip
    if shown.problem is not None:
        caption.append(element("div", shown.problem, attrs={"class": "note"}))
    pics = element("div", *cells, attrs={"class": "pics two"}) if cells else Html("")
    return element("figure", pics, element("figcaption", *caption), attrs={"data-row": shown.number})


def _names(classes: Sequence[str], chosen: Sequence[int] | np.ndarray, scores: np.ndarray | None = None) -> Html:
    """Class names, each its own <b> (a name may hold a comma), with its score when given; "none" for none."""
    if not len(chosen):
        return Html("none")
    return join([join([element("b", classes[int(c)]), f" {scores[int(c)]:.3f}" if scores is not None else ""])
                 for c in chosen], ", ")  # fmt: skip


def _unshown(r: LabelReportInput, rest: list[ClassErrors]) -> Html:
    """The classes beyond the page's cap of pictures: one table row each (the per-class table's link target)."""
    if not rest:
        return Html("")
    rows = [
        element("tr", element("td", r.result.classes[e.cls]), element("td", str(len(e.false_pos))),
                element("td", str(len(e.false_neg))), attrs={"id": section_id(e.cls)})
        for e in rest
    ]  # fmt: skip
    head = element(
        "tr", *(element("th", h, attrs={"scope": "col"}) for h in ("class", "false positives", "false negatives"))
    )
    grid = element("table", element("thead", head), element("tbody", *rows), attrs={"class": "numbers unshown"})
    note = f"The other {len(rest)} class{'es' * (len(rest) != 1)}: no picture shown (the page's cap); errors.csv lists their images."
    return join([element("h3", note), element("div", grid, attrs={"class": "scroll"})])
