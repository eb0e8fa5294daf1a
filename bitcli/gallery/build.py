"""`bit eval --report DIR` and `bit finetune --report`: the report folder of an evaluation. From the per-image
results the evaluation kept (bitcli.gallery.records; a multi-label model's: bitcli.gallery.multilabel_records)
it picks the errors the page shows, decodes only those again and draws their thumbnails and Grad-CAM overlays
(bitcli.gallery.drawing), draws the pictures `bit eval --plot` draws (the reliability diagram; a multi-label
model's per-class AP) when matplotlib is installed, and writes index.html, errors.csv, predictions.csv and the
pictures (bitcli.pages.folder's rules).
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bitcli import extras, plots
from bitcli.engine import Engine
from bitcli.gallery import multilabel_page, page
from bitcli.gallery.calibration import RELIABILITY
from bitcli.gallery.drawing import Cams, Picture, Wanted, draw
from bitcli.gallery.multilabel_records import (
    FALSE_POSITIVE,
    ClassErrors,
    LabelResults,
    LabelTexts,
    class_errors,
    errors_csv,
    gallery_rows,
    predictions_csv,
)
from bitcli.gallery.records import Pair, Results, csv_bytes, csv_rows, pairs
from bitcli.metrics import EvalResult
from bitcli.multilabel import Evaluation, MultiLabelResult
from bitcli.pages.folder import EVAL_REPORT, write_page_folder
from bitcli.sources.examples import ImageFolder
from bitcli.ui import display, log

PER_PAIR = 8  # error images shown per (true -> predicted) cell, the highest losses ...
PER_KIND = 4  # ... per class of a multi-label model, its worst false positives and as many false negatives ...
MAX_SHOWN = 400  # ... and in all; the others are in errors.csv
KIND = EVAL_REPORT


@dataclass(frozen=True)
class Source:
    """What was evaluated: the data set, what the page's heading calls it and the model (`title`), the first
    line of the pictures' titles (`heading`: what `bit eval --plot` draws), and a note for the page, if any."""

    ds: ImageFolder
    title: str
    heading: str = ""
    note: str | None = None


def write_report(folder: Path, engine: Engine, source: Source, *, result: Evaluation, results: Results | LabelResults,
                 batch_size: int, workers: int) -> None:  # fmt: skip
    """The report of `result` (and `results`, its per-image results: LabelResults for a MultiLabelResult) into
    `folder`."""
    with _old_objects_frozen():
        _write_report(folder, engine, source, result=result, results=results, batch_size=batch_size, workers=workers)


@contextlib.contextmanager
def _old_objects_frozen() -> Iterator[None]:
    """The objects alive before the report (torch's, the model's, the evaluation's: some 200,000) left out of the
    garbage collector's full collections while it is drawn: drawing makes many new objects (matplotlib's import
    and figure), which set off full collections that each walk every old object (0.1 to 0.3 s of CPU apiece
    on the benchmark's eval) and free none of them. The new objects are collected as usual."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _write_report(folder: Path, engine: Engine, source: Source, *, result: Evaluation,
                  results: Results | LabelResults, batch_size: int, workers: int) -> None:  # fmt: skip
    started = time.monotonic()
    files: dict[str, bytes] = {}
    names = [display(source.ds.name(int(i))) for i in results.index]
    cams = Cams(engine)
    if isinstance(result, MultiLabelResult):
        assert isinstance(results, LabelResults)
        errors, shown = _multi_label(engine, source, result=result, results=results, files=files, names=names,
                                     cams=cams, batch_size=batch_size, workers=workers)  # fmt: skip
    else:
        assert isinstance(results, Results)
        errors, shown = _single_label(engine, source, result=result, results=results, files=files, names=names,
                                      cams=cams, batch_size=batch_size, workers=workers)  # fmt: skip
    write_page_folder(folder, files, KIND)
    log(f"report: {display(folder / 'index.html')} ({errors} errors, {shown} shown; "
        f"{time.monotonic() - started:.1f} s)")  # fmt: skip


def _single_label(engine: Engine, source: Source, *, result: EvalResult, results: Results, files: dict[str, bytes],
                  names: list[str], cams: Cams, batch_size: int, workers: int) -> tuple[int, int]:  # fmt: skip
    """The page, CSV files and pictures of a single-label evaluation into `files`: (errors, images shown)."""
    ds = source.ds
    cells = pairs(results)
    order = np.concatenate([p.rows for p in cells]) if cells else np.zeros(0, dtype=np.int64)
    number = {int(r): n for n, r in enumerate(order, 1)}
    chosen = choose(cells)
    wanted = [Wanted(int(results.index[row]), number[row], (int(results.pred[row]), int(results.true_model[row])),
                     ("pred", "true")) for row in chosen]  # fmt: skip
    drawn = draw(engine, ds, wanted, files=files, cams=cams, batch_size=batch_size, workers=workers)
    shown = {row: drawn[position] for position, row in enumerate(chosen)}
    reliability = _picture(files, RELIABILITY, lambda: plots.reliability_png(result.to_dict(), source.heading))
    report = page.ReportInput(title=source.title, result=result, results=results, pairs=cells, shown=shown,
                              names=names, classes=ds.classes, labels=engine.labels, gradcam=cams.note,
                              per_pair=PER_PAIR, max_shown=MAX_SHOWN, reliability=reliability, note=source.note)  # fmt: skip
    files["index.html"] = page.render(report).encode("utf-8")
    rows = csv_rows(results, names=names, classes=ds.classes, labels=engine.labels)
    files["errors.csv"] = csv_bytes(rows, order.tolist())
    files["predictions.csv"] = csv_bytes(rows, listed_order(ds, results))
    return len(order), len(shown)


def _multi_label(engine: Engine, source: Source, *, result: MultiLabelResult, results: LabelResults,
                 files: dict[str, bytes], names: list[str], cams: Cams, batch_size: int,
                 workers: int) -> tuple[int, int]:  # fmt: skip
    """The page, CSV files and pictures of a multi-label evaluation into `files`: (class errors, shown). The
    errors are at the result's thresholds (those the metrics used: the model's, or a validation's own fit)."""
    cells = class_errors(results, result.thresholds)
    rows = gallery_rows(cells)
    chosen = choose_per_class(cells)
    kind_of = {(row, c): kind for row, c, kind in rows}
    number = {(row, c): n for n, (row, c, _) in enumerate(rows, 1)}
    wanted = [Wanted(int(results.index[row]), number[row, c], (c,), (_suffix(kind_of[row, c]),)) for row, c in chosen]
    drawn = draw(engine, source.ds, wanted, files=files, cams=cams, batch_size=batch_size, workers=workers)
    shown = {w.number: drawn[position] for position, w in enumerate(wanted)}
    picture = _picture(files, multilabel_page.AP_PICTURE, lambda: plots.ap_png(result.to_dict(), source.heading))
    report = multilabel_page.LabelReportInput(title=source.title, result=result, results=results, cells=cells,
                                              shown=shown, names=names, gradcam=cams.note, per_kind=PER_KIND,
                                              max_shown=MAX_SHOWN, picture=picture, note=source.note)  # fmt: skip
    files["index.html"] = multilabel_page.render(report).encode("utf-8")
    labels, thresholds = result.classes, result.thresholds
    texts = LabelTexts.of(results, labels, thresholds, names=names)
    files["errors.csv"] = errors_csv(results, rows, labels=labels, thresholds=thresholds, texts=texts)
    files["predictions.csv"] = predictions_csv(results, listed_order(source.ds, results), labels=labels, texts=texts)
    return len(rows), len(shown)


def listed_order(ds: ImageFolder, results: Results | LabelResults) -> list[int]:
    """The positions of `results` in the order the data set lists its images (ImageFolder.source_rank: a label
    file's or data set's rows in row order, not grouped by class as they are evaluated): predictions.csv's."""
    return np.argsort(ds.source_rank()[results.index], kind="stable").tolist()


def _suffix(kind: str) -> str:
    return "fp" if kind == FALSE_POSITIVE else "fn"


def _picture(files: dict[str, bytes], name: str, png: Callable[[], bytes]) -> Picture | None:
    """`png()`'s picture as file `name` beside the page; None without matplotlib (the page says so)."""
    if not extras.available("plots"):
        return None
    files[name] = png()
    return Picture.of(name, files[name])


def choose(cells: list[Pair]) -> list[int]:
    """The error images the page shows (positions in Results), in the page's order: each cell's PER_PAIR
    highest losses, MAX_SHOWN in all."""
    chosen: list[int] = []
    for cell in cells:
        take = min(PER_PAIR, len(cell.rows), MAX_SHOWN - len(chosen))
        chosen += [int(r) for r in cell.rows[:take]]
    return chosen


def choose_per_class(cells: list[ClassErrors]) -> list[tuple[int, int]]:
    """The (row, class) errors the page shows, in the page's order: each class's PER_KIND worst false positives,
    then its PER_KIND worst false negatives, MAX_SHOWN in all."""
    chosen: list[tuple[int, int]] = []
    for cell in cells:
        for rows in (cell.false_pos, cell.false_neg):
            take = min(PER_KIND, len(rows), MAX_SHOWN - len(chosen))
            chosen += [(int(r), cell.cls) for r in rows[:take]]
    return chosen
