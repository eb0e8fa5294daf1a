"""The HTML of `bit eval --report`'s index.html for a single-label model: the metrics (with NLL and ECE), the
per-class table (worst F1 first), the confusion matrix as an HTML table whose off-diagonal cells link to their
gallery section, the calibration (bitcli.gallery.calibration: the reliability diagram and its bins), and the
gallery: the errors grouped by (true -> predicted) cell, by loss, each with its thumbnail, Grad-CAM overlays,
scores and top three. (A multi-label model's page: bitcli.gallery.multilabel_page.)

The confusion matrix is a table rather than a picture: its links work without matplotlib (the plots extra) and
without a script, its numbers are text (searchable, copyable, read out by screen readers), and a phone
scrolls it sideways. Every label, path and file name goes through bitcli.pages.html's escaping.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bitcli.gallery.calibration import calibration
from bitcli.gallery.drawing import Picture, Shown
from bitcli.gallery.records import OTHER_CLASS, Pair, Results, label_name, predicted_name
from bitcli.metrics import EvalResult
from bitcli.pages.html import Html, document, element, image, join, table
from bitcli.pages.pictures import THUMB

MAX_GRID = 40  # classes; a larger confusion matrix is listed as its most frequent cells instead
MAX_CELLS_LISTED = 200


@dataclass(frozen=True)
class ReportInput:
    """What the page shows."""

    title: str  # the data set and the model, for the heading
    result: EvalResult
    results: Results
    pairs: list[Pair]
    shown: dict[int, Shown]  # by position in `results`; overlays: the predicted class's, then the true class's
    names: Sequence[str]  # each image's path (or row name), by position in `results`
    classes: Sequence[str]  # the data set's classes
    labels: Sequence[str]  # the model's labels
    gradcam: str  # what the overlays show, or why there are none
    per_pair: int  # the most images shown per cell
    max_shown: int  # ... and in all
    reliability: Picture | None  # the reliability picture beside the page; None: not drawn (no matplotlib)
    note: str | None = None  # a line under the heading (fine-tuning's: the scores are before its temperature)


def render(r: ReportInput) -> str:
    errors = sum(len(p.rows) for p in r.pairs)
    body = [
        element("h1", "bit eval report"),
        element("p", r.title, attrs={"class": "muted"}),
        _numbers(r.result, errors),
        element("p", r.note, attrs={"class": "note"}) if r.note else Html(""),
        _data_links(),
        element("h2", "Per class, worst F1 first"),
        _per_class(r.result),
        element("h2", "Confusion matrix"),
        _confusion(r),
        element("h2", "Calibration: can the scores be trusted?"),
        calibration(r.result, r.reliability),
        element("h2", f"Misclassified images ({errors})"),
        _gallery_intro(r, errors),
        *(_pair_section(r, pair) for pair in r.pairs if _shows(r, pair)),
        _unshown(r, [pair for pair in r.pairs if not _shows(r, pair)]),
    ]
    return document(f"bit eval report: {r.title}", join(body, "\n"))


def _data_links() -> Html:
    errors = element("a", "errors.csv", attrs={"href": "errors.csv"})
    predictions = element("a", "predictions.csv", attrs={"href": "predictions.csv"})
    return element("p", join(["The data behind this page: ", errors, " (one row per error, in the gallery's order) "
                              "and ", predictions, " (one row per image)."]))  # fmt: skip


def _numbers(result: EvalResult, errors: int) -> Html:
    top5 = "n/a" if result.top5 is None else f"{result.top5:.4f}"
    items = [("images", str(result.count)), ("errors", str(errors)), ("top-1", f"{result.top1:.4f}"),
             ("top-5", top5), ("macro F1", f"{result.macro_f1:.4f}"), ("loss", f"{result.loss:.4f}")]  # fmt: skip
    if result.nll is not None and result.ece is not None:
        items += [("NLL", f"{result.nll:.4f}"), ("ECE", f"{result.ece:.4f}")]
    return element("ul", *(element("li", element("b", v), k) for k, v in items), attrs={"class": "stats"})


def _per_class(result: EvalResult) -> Html:
    precision, recall, f1 = result.precision, result.recall, result.f1
    row_of = {name: i for i, name in enumerate(result.labels)}
    order = sorted(result.per_class, key=lambda n: (f1[n], recall[n], precision[n], row_of[n]))  # ties: class order
    rows = [
        [name, str(sum(result.confusion[row_of[name]])), *(f"{m[name]:.4f}" for m in (recall, precision, f1))]
        for name in order
    ]
    head = ["class", "images", "recall (top-1)", "precision", "F1"]
    return element("div", table(head, rows, cls="numbers per-class"), attrs={"class": "scroll"})


def section_id(r: ReportInput, true: int, pred: int) -> str:
    """The anchor of a cell's gallery section, by the confusion matrix's row and column."""
    return f"pair-{_axis(r, true)}-{_axis(r, pred)}"


def _axis(r: ReportInput, c: int) -> int:
    """The confusion matrix's row/column of data-set class c (OTHER_CLASS: the last column)."""
    return len(r.result.labels) - 1 if c == OTHER_CLASS else r.result.labels.index(r.classes[c])


def _confusion(r: ReportInput) -> Html:
    labels, matrix = r.result.labels, r.result.confusion
    if len(labels) > MAX_GRID:
        return _cell_list(r)
    linked = {(_axis(r, p.true), _axis(r, p.pred)): section_id(r, p.true, p.pred) for p in r.pairs}
    rows = [(i, name, counts) for i, (name, counts) in enumerate(zip(labels, matrix)) if any(counts)]
    head = element(
        "tr", element("th", "true \\ predicted"), *(element("th", n, attrs={"scope": "col"}) for n in labels)
    )
    body = [element("tr", element("th", name, attrs={"scope": "row"}),
                    *(_cell(n, (i, j), row_total=sum(counts), anchor=linked.get((i, j))) for j, n in enumerate(counts)))
            for i, name, counts in rows]  # fmt: skip
    grid = element("table", element("thead", head), element("tbody", *body), attrs={"class": "confusion"})
    note = element("p", "Rows: true class; columns: predicted. Click an off-diagonal count to see those images.",
                   attrs={"class": "muted"})  # fmt: skip
    return join([note, element("div", grid, attrs={"class": "scroll"})])


def _cell(count: int, where: tuple[int, int], *, row_total: int, anchor: str | None) -> Html:
    """A count of the matrix at (row, column), shaded by its share of the row, linked to its section."""
    row, column = where
    share = count / row_total if row_total else 0.0
    colour = "40,140,70" if row == column else "210,50,40"
    style = f"background:rgba({colour},{0.08 + 0.6 * share:.3f})" if count else None
    content = element("a", str(count), attrs={"href": f"#{anchor}"}) if anchor and count else str(count)
    return element("td", content, attrs={"style": style})


def _cell_list(r: ReportInput) -> Html:
    """The most frequent confusions of a matrix too large to draw, each linking to its section."""
    rows = []
    for p in r.pairs[:MAX_CELLS_LISTED]:
        link = {"href": f"#{section_id(r, p.true, p.pred)}"}
        rows.append([element("a", f"{r.classes[p.true]} \u2192 {_pred_name(r, p)}", attrs=link), str(len(p.rows))])
    note = (f"{len(r.result.labels)} classes: too many to draw (bit eval --format json gives the whole matrix). "
            f"The {len(rows)} most frequent confusions of {len(r.pairs)}:")  # fmt: skip
    return join([element("p", note, attrs={"class": "muted"}),
                 element("div", table(["true \u2192 predicted", "images"], rows, cls="numbers"), attrs={"class": "scroll"})])  # fmt: skip


OUTSIDE = "a label outside the evaluated classes"


def _pred_name(r: ReportInput, pair: Pair) -> str:
    """The predicted side of a cell: a class, or for the (other) column its description (each image there names
    its own label)."""
    return OUTSIDE if pair.pred == OTHER_CLASS else r.classes[pair.pred]


def _gallery_intro(r: ReportInput, errors: int) -> Html:
    if not errors:
        return element("p", "None: every image was classified correctly.")
    shown = len(r.shown)
    cap = (f"Each cell shows its {r.per_pair} highest-loss images, {r.max_shown} at most in all: "
           f"{shown} of {errors} are shown here; errors.csv lists every one.")  # fmt: skip
    return join([element("p", "Grouped by (true \u2192 predicted), the most frequent first; within each, by loss "
                         "(the highest first). ", cap),
                 element("p", r.gradcam, attrs={"class": "note"})])  # fmt: skip


def _pair_section(r: ReportInput, pair: Pair) -> Html:
    count = f": {len(pair.rows)} image{'s' * (len(pair.rows) != 1)}"
    heading = element("h3", join([r.classes[pair.true], " \u2192 ", _pred_name(r, pair), count]))
    figures = [_figure(r, int(row), r.shown[int(row)]) for row in pair.rows if int(row) in r.shown]
    parts = [heading]
    if len(figures) < len(pair.rows):
        rest = len(pair.rows) - len(figures)
        parts.append(element("p", f"{len(figures)} shown; the other {rest} {'is' if rest == 1 else 'are'} in errors.csv.",
                             attrs={"class": "muted"}))  # fmt: skip
    if figures:
        parts.append(element("div", *figures, attrs={"class": "grid"}))
    return element("section", *parts, attrs={"class": "pair", "id": section_id(r, pair.true, pair.pred)})


def _shows(r: ReportInput, pair: Pair) -> bool:
    return any(int(row) in r.shown for row in pair.rows)


def _unshown(r: ReportInput, rest: list[Pair]) -> Html:
    """The cells beyond the page's cap of pictures: one table row each (the confusion matrix's link target),
    not a section each, so that a report of 1,000 classes stays small."""
    if not rest:
        return Html("")
    rows = [
        element("tr", element("td", r.classes[p.true], " \u2192 ", _pred_name(r, p)), element("td", str(len(p.rows))),
                attrs={"id": section_id(r, p.true, p.pred)})
        for p in rest
    ]  # fmt: skip
    head = element("tr", element("th", "true \u2192 predicted", attrs={"scope": "col"}),
                   element("th", "images", attrs={"scope": "col"}))  # fmt: skip
    grid = element("table", element("thead", head), element("tbody", *rows), attrs={"class": "numbers unshown"})
    note = f"The other {len(rest)} cell{'s' * (len(rest) != 1)}: no picture shown (the page's cap); errors.csv lists their images."
    return join([element("h3", note), element("div", grid, attrs={"class": "scroll"})])


def _figure(r: ReportInput, row: int, shown: Shown) -> Html:
    res = r.results
    true_name, pred_name = r.classes[res.true[row]], predicted_name(res, row, r.classes, r.labels)
    cam_pred, cam_true = shown.overlays if shown.overlays else (None, None)
    pictures = [(shown.thumbnail, "image", "the image"),
                (cam_pred, f"predicted: {pred_name}", f"Grad-CAM for the predicted class {pred_name}"),
                (cam_true, f"true: {true_name}", f"Grad-CAM for the true class {true_name}")]  # fmt: skip
    cells = [element("div", image(src, alt, width=THUMB, height=THUMB), element("span", caption, attrs={"title": caption}))
             for src, caption, alt in pictures if src is not None]  # fmt: skip
    top = [element("li", label_name(r.labels, int(i)), f" {p:.3f}") for i, p in zip(res.top[row], res.top_p[row])]
    caption = [
        element("div", f"#{shown.number} ", r.names[row], attrs={"class": "path"}),
        element("div", "true ", element("b", true_name), f" p={res.p_true[row]:.3f} (rank {res.rank[row]})"),
        element("div", "predicted ", element("b", pred_name), f" p={res.p_pred[row]:.3f}, loss {res.loss[row]:.3f}"),
        element("ol", *top, attrs={"title": "top 3"}),
    ]
    if shown.problem is not None:
        caption.append(element("div", shown.problem, attrs={"class": "note"}))
    pics = element("div", *cells, attrs={"class": "pics"}) if cells else Html("")
    return element("figure", pics, element("figcaption", *caption), attrs={"data-row": shown.number})
