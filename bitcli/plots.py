"""The pictures: training curves (loss, learning rate, validation accuracy per step) and the row-normalised
confusion matrix. Fine-tuning (at every validation) and `bit eval --plot` draw with these functions.

matplotlib (the `plots` extra, bitcli.extras) is imported only when a picture is drawn. Drawing is deterministic: a fixed
figure size and dpi, matplotlib's default style whatever the user's matplotlibrc says, no timestamp or
version in the PNG, so the same numbers always give the same bytes.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bitcli import fonts
from bitcli.ui import log, visible
from bitcli.writes import atomic_write

if TYPE_CHECKING:
    from matplotlib.typing import RcKeyType

DPI = 100
CURVES_SIZE = (8.0, 8.0)  # inches: 800x800 px
MAX_CLASSES = 50  # a confusion picture shows every class up to this many; beyond, the most confused ones
SHOWN_WHEN_SUMMARISED = 30
ANNOTATE_UP_TO = 20  # classes: each cell also shows its percentage
MAX_NAME = 24  # characters of a class name on an axis (longer ones end in "…")
MAX_HEADING = 70  # characters of a confusion picture's first title line: what the narrowest picture holds
REST = "(all others)"  # the summarised picture's column for predictions of a class that is not shown


@contextlib.contextmanager
def _style(literal: bool, families: Sequence[str] = (fonts.DEFAULT,)) -> Iterator[Any]:
    """matplotlib with its default style (a user's matplotlibrc would change the picture), the font `families`
    in fallback order (fonts.fallback), no warning of matplotlib's for a glyph they lack (it shows as a box;
    warn_boxed names the classes instead), and with `literal` every text taken as it is spelled (a class
    named "$x$" is not mathtext; log-scale tick labels need mathtext, so the curves keep it)."""
    import matplotlib
    import matplotlib.style

    rc: dict[RcKeyType, Any] = {"text.parse_math": not literal, "font.size": 10}
    if list(families) != [fonts.DEFAULT]:
        rc["font.family"] = list(families)
    with matplotlib.style.context("default"), matplotlib.rc_context(rc), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from")
        yield matplotlib


MAX_NAMED = 10  # class names in the warning about characters no font has
_warned: set[tuple[str, ...]] = set()  # each picture's set of class names is warned about once per process
# The pictures, as the warning names them
CONFUSION, RELIABILITY, AP = "the confusion picture", "the reliability picture", "the per-class AP picture"


def warn_boxed(names: Sequence[str], title: str, missing: set[str], *, picture: str) -> None:
    """One line on stderr naming `picture` and the classes (and the title) it draws with characters that no
    installed font has, once per process for the same picture and names (fine-tuning draws the same classes at
    every validation)."""
    boxed = [visible(name) for name in dict.fromkeys(names) if missing & set(_short(name))]
    if not missing or (picture, *boxed) in _warned:
        return
    _warned.add((picture, *boxed))
    quoted = ", ".join(f"'{name}'" for name in boxed[:MAX_NAMED])
    more = f" and {len(boxed) - MAX_NAMED} more" if len(boxed) > MAX_NAMED else ""
    drawn = ([f"the class names {quoted}{more}"] if boxed else []) + (["the title"] if missing & set(title) else [])
    log(
        f"warning: no installed font has every character of {' and '.join(drawn)}; {picture} shows those characters "
        "as boxes (install a font that has them, e.g. Noto Sans CJK for Chinese, Japanese and Korean)"
    )


def _png(fig: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})  # no matplotlib version in the file
    return buf.getvalue()


def write_png(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


# ----------------------------------------------------------------------------------------------------------
# Training curves


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of the last `window` values at each step (fewer at the start)."""
    sums = np.cumsum(np.insert(values, 0, 0.0))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    return (sums[1:] - sums[np.maximum(np.arange(1, len(values) + 1) - window, 0)]) / counts


def curves_png(records: Sequence[Mapping[str, Any]], total_steps: int, title: str) -> bytes:
    """metrics.jsonl's records (one per step; validation fields on validation steps) as three panels over the
    steps 0..total_steps: loss (training and validation), validation accuracy (a multi-label run's: mAP),
    learning rate. A record's values are drawn at its step's number, counted from 1 as every message counts
    (the record's `step` index + 1: step k's loss, validation and lr at x = k). `title` is drawn as mathtext: it
    must not hold data (a name with "$")."""
    steps = np.array([r["step"] + 1 for r in records], dtype=float)
    loss = np.array([r["loss"] for r in records], dtype=float)
    lr = np.array([r["lr"] for r in records], dtype=float)
    # a multi-label run's validations record mAP where a single-label run's record top-1 and top-5
    multi = any(r.get("val_mAP") is not None for r in records)
    val = [r for r in records if r.get("val_mAP" if multi else "val_top1") is not None]
    val_steps = [r["step"] + 1 for r in val]
    with _style(literal=False):
        from matplotlib.figure import Figure

        fig = Figure(figsize=CURVES_SIZE, dpi=DPI, layout="constrained")
        ax_loss, ax_acc, ax_lr = fig.subplots(3, 1, sharex=True, height_ratios=[3, 2, 1.5])
        fig.suptitle(title)
        window = max(len(records) // 50, 1)
        faint = {"alpha": 0.35, "linewidth": 0.8} if window > 1 else {}  # under its running mean
        ax_loss.plot(steps, loss, color="tab:blue", label="training loss (each step)", **faint)
        if window > 1:
            ax_loss.plot(steps, _moving_average(loss, window), color="tab:blue", linewidth=1.6,
                         label=f"training loss (mean of {window} steps)")  # fmt: skip
        if val:
            ax_loss.plot(val_steps, [r["val_loss"] for r in val], "o-", color="tab:orange", label="validation loss")
        ax_loss.set_ylabel("loss (binary cross-entropy)" if multi else "loss (cross-entropy)")
        # Headroom above the highest loss for the legend, so that it never covers a curve.
        highest = max([*loss, *(r["val_loss"] for r in val)])
        ax_loss.set_ylim(0, 1.4 * highest if highest > 0 else 1)
        ax_loss.legend(loc="upper right")
        ax_loss.grid(alpha=0.3)

        if val and multi:
            ax_acc.plot(val_steps, [r["val_mAP"] for r in val], "o-", color="tab:green",
                        label=f"validation mAP (last {val[-1]['val_mAP']:.4f})")  # fmt: skip
            ax_acc.legend(loc="best")
        elif val:
            ax_acc.plot(val_steps, [r["val_top1"] for r in val], "o-", color="tab:green",
                        label=f"validation top-1 (last {val[-1]['val_top1']:.4f})")  # fmt: skip
            if val[-1].get("val_top5") is not None:
                ax_acc.plot(val_steps, [r["val_top5"] for r in val], "s--", color="tab:purple",
                            label=f"validation top-5 (last {val[-1]['val_top5']:.4f})")  # fmt: skip
            ax_acc.legend(loc="best")
        ax_acc.set_ylim(0, 1.02)
        ax_acc.set_ylabel("mAP" if multi else "accuracy")
        ax_acc.grid(alpha=0.3)

        # Log scale: each /10 decay is an equal step down (the warm-up's lr 0 in step 1 is not drawn). Step k
        # runs from x = k - 1 to k at its lr ("steps-pre"), so a drop "after step k" is drawn at x = k.
        ax_lr.plot(steps[lr > 0], lr[lr > 0], color="tab:red", drawstyle="steps-pre")
        ax_lr.set_yscale("log")
        ax_lr.set_ylabel("learning rate")
        ax_lr.grid(alpha=0.3)
        ax_lr.set_xlabel("optimizer step")
        margin = 0.015 * max(total_steps, 1)  # the markers of the last validation are drawn whole
        ax_lr.set_xlim(-margin, max(total_steps, 1) + margin)  # the whole run: a running job shows how far it is
        ax_lr.xaxis.get_major_locator().set_params(integer=True)
        return _png(fig)


# ----------------------------------------------------------------------------------------------------------
# Confusion matrix


def _short(name: str) -> str:
    name = visible(name)
    return name if len(name) <= MAX_NAME else name[: MAX_NAME - 1] + "…"


def summarise(
    labels: Sequence[str], confusion: np.ndarray, other: str | None
) -> tuple[list[str], list[str], np.ndarray, str]:
    """(row names, column names, counts, note). Rows are the evaluated classes (not `other`, whose row is
    empty by construction). Up to MAX_CLASSES classes every class is shown; beyond, the SHOWN_WHEN_SUMMARISED
    classes with the most errors (as the true or the predicted class), in their order, and one last REST
    column with the row's predictions of every class not shown, so each row still sums to its images."""
    rows = [i for i, name in enumerate(labels) if name != other]
    if len(rows) <= MAX_CLASSES:
        return [labels[i] for i in rows], list(labels), confusion[rows], ""
    errors = confusion - np.diag(np.diag(confusion))
    score = errors.sum(axis=1) + errors.sum(axis=0)
    shown = sorted(sorted(rows, key=lambda i: (-score[i], i))[:SHOWN_WHEN_SUMMARISED])
    rest = np.delete(confusion[shown], shown, axis=1).sum(axis=1, keepdims=True)
    note = f"the {len(shown)} of {len(rows)} classes with the most errors; {REST}: predictions of any other class"
    return (
        [labels[i] for i in shown],
        [labels[i] for i in shown] + [REST],
        np.hstack([confusion[np.ix_(shown, shown)], rest]),
        note,
    )


CELL = 0.2  # inches per class from 20 classes: names at 7 pt stay apart
MIN_MATRIX = 4.0  # inches: the matrix of a few classes


def tick_labels(row_names: Sequence[str], col_names: Sequence[str], totals: np.ndarray) -> tuple[list[str], list[str]]:
    """The names as drawn: shortened, and the true classes with their image counts."""
    return [f"{_short(r)} ({t})" for r, t in zip(row_names, totals)], [_short(c) for c in col_names]


def font_size(classes: int) -> int:
    return 10 if classes <= 10 else 8 if classes <= 25 else 7


def confusion_size(row_ticks: Sequence[str], col_ticks: Sequence[str]) -> tuple[float, float]:
    """Inches: the matrix (CELL per class, at least MIN_MATRIX) plus room for the longest names, so that long
    names never squeeze the matrix; the column names stand upright up to 3 characters, else turned 90°."""
    char = 0.0085 * font_size(max(len(row_ticks), len(col_ticks)))  # inches per character, about
    longest_column = 1 if upright(col_ticks) else max(map(len, col_ticks))
    width = max(MIN_MATRIX, CELL * len(col_ticks)) + 2.2 + char * max(map(len, row_ticks))  # + colour bar, label
    height = max(MIN_MATRIX, CELL * len(row_ticks)) + 1.4 + char * longest_column  # + title, axis label
    return round(width, 2), round(height, 2)


def upright(col_ticks: Sequence[str]) -> bool:
    return max(map(len, col_ticks)) <= 3


def confusion_png(
    labels: Sequence[str], confusion: Sequence[Sequence[int]], title: str, other: str | None = None
) -> bytes:
    """The confusion matrix normalised by row (each true class's images sum to 1), class names on both axes.
    `other`: the label of the column of predictions outside the evaluated classes, if any."""
    counts = np.asarray(confusion, dtype=np.int64).reshape(len(labels), len(labels))
    row_names, col_names, counts, note = summarise(labels, counts, other)
    totals = counts.sum(axis=1, keepdims=True)
    fractions = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    n = max(len(row_names), len(col_names))
    font = font_size(n)
    row_ticks, col_ticks = tick_labels(row_names, col_names, totals[:, 0])
    families, missing = fonts.fallback([title, *row_ticks, *col_ticks])
    warn_boxed([*row_names, *col_names], title, missing, picture=CONFUSION)
    with _style(literal=True, families=families):
        from matplotlib.figure import Figure

        fig = Figure(figsize=confusion_size(row_ticks, col_ticks), dpi=DPI, layout="constrained")
        ax = fig.subplots()
        from matplotlib.colors import PowerNorm

        # The square-root scale makes a confusion of a few percent visible beside a diagonal near 1.
        norm = PowerNorm(gamma=0.5, vmin=0.0, vmax=1.0)
        image = ax.imshow(fractions, cmap="Blues", norm=norm, aspect="auto", interpolation="nearest")
        ticks = [0, 0.05, 0.2, 0.4, 0.6, 0.8, 1]
        bar = fig.colorbar(image, ax=ax, shrink=0.8, ticks=ticks)
        bar.set_ticks(ticks, labels=[f"{100 * t:.0f}%" for t in ticks])  # percent, as the numbers in the cells
        bar.set_label("% of the true class's images")
        ax.set_title(title + (f"\n{note}" if note else ""), fontsize=11)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class (images)")
        ax.set_xticks(range(len(col_ticks)), col_ticks, fontsize=font, rotation=0 if upright(col_ticks) else 90)
        ax.set_yticks(range(len(row_ticks)), row_ticks, fontsize=font)
        if n <= ANNOTATE_UP_TO:
            for (i, j), value in np.ndenumerate(fractions):
                if counts[i, j]:
                    ax.text(j, i, f"{100 * value:.0f}", ha="center", va="center", fontsize=font - 1,
                            color="white" if norm(value) > 0.6 else "black")  # fmt: skip
        return _png(fig)


def evaluation_png(result: Mapping[str, Any], heading: str, other: str | None) -> bytes:
    """The confusion picture of an evaluation (EvalResult.to_dict(), or a run's stored last validation),
    titled with `heading` and its top-1 and macro F1."""
    heading = visible(heading)
    if len(heading) > MAX_HEADING:  # a long path: its end says most
        heading = "…" + heading[-(MAX_HEADING - 1) :]
    title = f"{heading}\n{result['count']:,} images, top-1 {result['top1']:.4f}, macro F1 {result['macro_f1']:.4f}"
    return confusion_png(result["labels"], result["confusion"], title, other)


# ----------------------------------------------------------------------------------------------------------
# Reliability diagram

RELIABILITY_SIZE = (6.0, 7.0)  # inches: 600x700 px


def reliability_png(result: Mapping[str, Any], heading: str) -> bytes:
    """The reliability diagram of an evaluation (EvalResult.to_dict(), or a stored validation): for each bin of
    the top-1 score, the accuracy of its images against their mean score (on the diagonal: scores that can be
    trusted), and below, each bin's share of the images. Titled with `heading`, the ECE and NLL, and the
    temperature and test-time augmentation the scores were computed with."""
    rel = result["reliability"]
    count = np.asarray(rel["count"], dtype=np.float64)
    bins = len(count)
    edges = np.linspace(0.0, 1.0, bins + 1)
    centres, width = (edges[:-1] + edges[1:]) / 2, 1.0 / bins
    filled = count > 0
    accuracy = np.array([a if a is not None else 0.0 for a in rel["accuracy"]])
    confidence = np.array([c if c is not None else 0.0 for c in rel["confidence"]])
    heading = visible(heading)
    if len(heading) > MAX_HEADING:
        heading = "…" + heading[-(MAX_HEADING - 1) :]
    settings = f"temperature {result.get('temperature', 1.0):.4g}" + (
        f", --tta {result['tta']}" if result.get("tta") else ""
    )
    title = (f"{heading}\n{result['count']:,} images, ECE {result['ece']:.4f}, NLL {result['nll']:.4f} "
             f"({settings})")  # fmt: skip
    families, missing = fonts.fallback([title])
    warn_boxed([], title, missing, picture=RELIABILITY)
    with _style(literal=True, families=families):
        from matplotlib.figure import Figure

        fig = Figure(figsize=RELIABILITY_SIZE, dpi=DPI, layout="constrained")
        ax, ax_share = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
        fig.suptitle(title, fontsize=11)
        ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=1, label="perfectly calibrated")
        ax.bar(centres[filled], accuracy[filled], width=width, color="tab:blue", edgecolor="white",
               label="accuracy of the bin's images")  # fmt: skip
        ax.bar(centres[filled], confidence[filled] - accuracy[filled], bottom=accuracy[filled], width=width,
               color="tab:red", alpha=0.3, edgecolor="tab:red", label="gap to their mean top-1 score")  # fmt: skip
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy")
        ax.legend(loc="upper left")
        ax.grid(alpha=0.3)
        ax_share.bar(centres, count / max(count.sum(), 1.0), width=width, color="tab:grey", edgecolor="white")
        ax_share.set_ylabel("share of images")
        ax_share.set_xlabel(f"top-1 score ({bins} equal-width bins)")
        ax_share.grid(alpha=0.3)
        return _png(fig)


# ----------------------------------------------------------------------------------------------------------
# Per-class average precision (multi-label evaluations: a confusion matrix does not apply)


def ap_png(result: Mapping[str, Any], heading: str) -> bytes:
    """A multi-label evaluation (MultiLabelResult.to_dict(), or a stored validation): each class's average
    precision as a horizontal bar, with its F1 at the threshold beside it, classes in the evaluation's order (up
    to MAX_CLASSES: beyond, the lowest-AP ones). Titled with `heading`, mAP and micro/macro F1."""
    names = list(result["labels"])
    ap = [result["ap"][n] for n in names]
    f1 = [result["f1"][n] for n in names]
    shown = list(range(len(names)))
    if len(shown) > MAX_CLASSES:  # the classes that need attention: lowest AP (n/a counts as 0)
        shown = sorted(sorted(shown, key=lambda i: ap[i] if ap[i] is not None else 0.0)[:MAX_CLASSES])
    heading = visible(heading)
    if len(heading) > MAX_HEADING:
        heading = "…" + heading[-(MAX_HEADING - 1) :]
    title = (f"{heading}\n{result['count']:,} images, mAP {result['mAP']:.4f}, micro F1 {result['micro_f1']:.4f}, "
             f"macro F1 {result['macro_f1']:.4f}")  # fmt: skip
    labels = [_short(names[i]) for i in shown]
    families, missing = fonts.fallback([title, *labels])
    warn_boxed([names[i] for i in shown], title, missing, picture=AP)
    with _style(literal=True, families=families):
        from matplotlib.figure import Figure

        fig = Figure(figsize=(7.0, 1.5 + 0.3 * len(shown)), dpi=DPI, layout="constrained")
        ax = fig.subplots()
        fig.suptitle(title, fontsize=11)
        y = np.arange(len(shown))[::-1]
        values = [ap[i] if ap[i] is not None else 0.0 for i in shown]
        ax.barh(y, values, height=0.4, color="tab:blue", label="average precision")
        ax.barh(y - 0.4, [f1[i] for i in shown], height=0.4, color="tab:orange", label="F1 at the threshold")
        ax.set_yticks(y - 0.2, labels)
        ax.set_xlim(0, 1)
        ax.set_xlabel("average precision (n/a: no positive image, drawn as 0) and F1")
        ax.legend(loc="lower right")
        ax.grid(axis="x", alpha=0.3)
        return _png(fig)
