"""`bit eval --report DIR` and `bit finetune --report`: the report folder of an evaluation. From the per-image
results the evaluation kept (bitcli.gallery.records) it picks the errors the page shows, decodes only those
again through the pipeline (as the user sees them, and as the model saw them), draws their thumbnails and
Grad-CAM overlays for the predicted and the true class (one trunk pass per stack of images, through the engine),
and writes index.html, errors.csv, predictions.csv and the pictures (bitcli.pages.folder's rules).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from bitcli import pipeline
from bitcli.engine import Engine
from bitcli.errors import BitError
from bitcli.gallery.page import ReportInput, Shown, render
from bitcli.gallery.records import Pair, Results, csv_bytes, pairs
from bitcli.images import stack_by_size
from bitcli.metrics import EvalResult
from bitcli.pages.folder import EVAL_REPORT, write_page_folder
from bitcli.pages.pictures import THUMB, encode, fit, overlay
from bitcli.preprocess import Preprocess
from bitcli.sources.examples import ImageFolder
from bitcli.sources.rows import load_example
from bitcli.ui import display, log

PER_PAIR = 8  # error images shown per (true -> predicted) cell, the highest losses ...
MAX_SHOWN = 400  # ... and in all; the others are in errors.csv
KIND = EVAL_REPORT
GRADCAM_NOTE = (
    "Grad-CAM (the final GroupNorm + ReLU, what the head pools): red is where the evidence for that class lies. "
    "Each overlay covers the part of the image the model saw (its resize and centre crop); what the crop cut "
    "off is greyed."
)


@dataclass(frozen=True)
class Source:
    """What was evaluated: the data set, and what the page's heading calls it and the model."""

    ds: ImageFolder
    title: str


def write_report(folder: Path, engine: Engine, source: Source, *, result: EvalResult, results: Results,
                 batch_size: int, workers: int) -> None:  # fmt: skip
    """The report of `result` (and `results`, its per-image results) into `folder`."""
    started = time.monotonic()
    ds = source.ds
    cells = pairs(results)
    order = np.concatenate([p.rows for p in cells]) if cells else np.zeros(0, dtype=np.int64)
    chosen = choose(cells)
    names = [display(ds.name(int(i))) for i in results.index]
    files: dict[str, bytes] = {}
    cams = _Cams(engine)
    shown = _pictures(engine.preprocess, ds, results, chosen, number={int(r): n for n, r in enumerate(order, 1)},
                      files=files, cams=cams, batch_size=batch_size, workers=workers)  # fmt: skip
    page = ReportInput(title=source.title, result=result, results=results, pairs=cells, shown=shown, names=names,
                       classes=ds.classes, labels=engine.labels, gradcam=cams.note, per_pair=PER_PAIR, max_shown=MAX_SHOWN)  # fmt: skip
    files["index.html"] = render(page).encode("utf-8")
    files["errors.csv"] = csv_bytes(results, order, names=names, classes=ds.classes, labels=engine.labels)
    files["predictions.csv"] = csv_bytes(results, range(len(results)), names=names, classes=ds.classes,
                                         labels=engine.labels)  # fmt: skip
    write_page_folder(folder, files, KIND)
    log(f"report: {display(folder / 'index.html')} ({len(order)} errors, {len(shown)} shown; "
        f"{time.monotonic() - started:.1f} s)")  # fmt: skip


def choose(cells: list[Pair]) -> list[int]:
    """The error images the page shows (positions in Results), in the page's order: each cell's PER_PAIR
    highest losses, MAX_SHOWN in all."""
    chosen: list[int] = []
    for cell in cells:
        take = min(PER_PAIR, len(cell.rows), MAX_SHOWN - len(chosen))
        chosen += [int(r) for r in cell.rows[:take]]
    return chosen


class _Cams:
    """The Grad-CAM maps of the shown images, while the engine gives them; the page's note says what the
    overlays are, or why there are none (an ONNX model: its graph ends in logits)."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.on, self.note = engine, True, GRADCAM_NOTE

    def maps(self, ready: list[pipeline.Outcome], results: Results) -> dict[int, np.ndarray]:
        """row -> its maps [2, H, W] for the predicted and the true class; one engine call per image size."""
        found: dict[int, np.ndarray] = {}
        if not self.on:
            return found
        try:
            for rows, batch in stack_by_size((o.ref, o.value[1]) for o in ready):
                targets = np.stack([results.pred[rows], results.true_model[rows]], axis=1)
                found.update(zip(rows, self.engine.gradcam(batch, targets)))
        except BitError as exc:
            self.on, self.note = False, f"No Grad-CAM overlays: {exc}."
            return {}
        return found


def _pictures(preprocess: Preprocess, ds: ImageFolder, results: Results, chosen: list[int], *,
              number: dict[int, int], files: dict[str, bytes], cams: _Cams, batch_size: int,
              workers: int) -> dict[int, Shown]:  # fmt: skip
    """The shown images decoded again (in this process; under torchrun the main one), their thumbnails and
    overlays added to `files`; an image that no longer decodes is shown with the reason."""

    def decode(row: int) -> tuple[Image.Image, np.ndarray]:
        picture = load_example(ds.paths[int(results.index[row])])
        return picture, preprocess.to_uint8(picture)

    shown: dict[int, Shown] = {}
    # Without compute, run passes what decode gives through untouched: here the picture and the model's input
    batches = pipeline.run(chosen, decode, None, batch_size=batch_size, workers=workers,  # type: ignore[arg-type]
                           name=lambda row: ds.name(int(results.index[row])))  # fmt: skip
    for batch in batches:
        ready = []
        for outcome in batch:
            if outcome.error is not None:
                shown[outcome.ref] = Shown(number[outcome.ref], problem=f"could not be read again: {outcome.error}")
            else:
                ready.append(outcome)
        maps = cams.maps(ready, results)
        for outcome in ready:
            row = outcome.ref
            shown[row] = _draw(outcome.value[0], maps.get(row), number=number[row], preprocess=preprocess, files=files)
    return shown


def _draw(picture: Image.Image, maps: np.ndarray | None, *, number: int, preprocess: Preprocess,
          files: dict[str, bytes]) -> Shown:  # fmt: skip
    """Image `number`'s thumbnail and overlays (into `files`, under images/)."""
    stem = f"images/{number:05d}"
    files[f"{stem}.jpg"] = encode(fit(picture, THUMB))
    if maps is None:
        return Shown(number, thumbnail=f"{stem}.jpg")
    box = preprocess.view_box(picture.width, picture.height)
    files[f"{stem}-pred.jpg"] = encode(overlay(picture, maps[0], box, THUMB))
    files[f"{stem}-true.jpg"] = encode(overlay(picture, maps[1], box, THUMB))
    return Shown(number, thumbnail=f"{stem}.jpg", cam_pred=f"{stem}-pred.jpg", cam_true=f"{stem}-true.jpg")
