"""The gallery's pictures, for either report (single-label errors, multi-label class errors): the images the
page shows are decoded again through the pipeline (as the user sees them, and as the model saw them), and each
gets a thumbnail and a Grad-CAM overlay per class it asks for (one trunk pass per stack of images, through the
engine). An image that no longer decodes keeps its place, with the reason instead of pictures.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from bitcli import pipeline
from bitcli.engine import Engine
from bitcli.errors import BitError
from bitcli.images import stack_by_size
from bitcli.pages.pictures import THUMB, encode, fit, overlay
from bitcli.preprocess import Preprocess
from bitcli.sources.examples import ImageFolder
from bitcli.sources.rows import load_example

GRADCAM_NOTE = (
    "Grad-CAM (the final GroupNorm + ReLU, what the head pools): red is where the evidence for that class lies. "
    "Each overlay covers the part of the image the model saw (its resize and centre crop); what the crop cut "
    "off is greyed."
)


@dataclass(frozen=True)
class Wanted:
    """An image the page shows: data-set index `index`, numbered `number` (its row in errors.csv, from 1), with
    an overlay for each of the model's classes `targets`, saved under the file-name `suffixes` (as many)."""

    index: int
    number: int
    targets: tuple[int, ...]
    suffixes: tuple[str, ...]


@dataclass(frozen=True)
class Shown:
    """An image with its pictures on the page: the thumbnail and its overlays (relative paths, one per target
    of its Wanted; none without Grad-CAM), or why it has none (`problem`)."""

    number: int  # its row in errors.csv (from 1)
    thumbnail: str | None = None
    overlays: tuple[str, ...] = ()
    problem: str | None = None


@dataclass(frozen=True)
class Picture:
    """A picture file beside the page (a matplotlib figure: bitcli.plots) and its size in pixels, which the page
    gives so that it does not move while the picture loads."""

    src: str
    width: int
    height: int

    @classmethod
    def of(cls, src: str, png: bytes) -> Picture:
        with Image.open(io.BytesIO(png)) as picture:
            return cls(src, picture.width, picture.height)


class Cams:
    """The Grad-CAM maps of the shown images, while the engine gives them; the page's note says what the
    overlays are, or why there are none (an ONNX model: its graph ends in logits)."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.on, self.note = engine, True, GRADCAM_NOTE

    def maps(self, ready: list[pipeline.Outcome], wanted: Sequence[Wanted]) -> dict[int, np.ndarray]:
        """position in `wanted` -> its maps [targets, H, W]; one engine call per image size (the images of
        a stack ask for as many targets: the gallery asks the same number of every image)."""
        found: dict[int, np.ndarray] = {}
        if not self.on:
            return found
        try:
            for refs, batch in stack_by_size((o.ref, o.value[1]) for o in ready):
                targets = np.array([wanted[r].targets for r in refs], dtype=np.int64)
                found.update(zip(refs, self.engine.gradcam(batch, targets)))
        except BitError as exc:
            self.on, self.note = False, f"No Grad-CAM overlays: {exc}."
            return {}
        return found


def draw(engine: Engine, ds: ImageFolder, wanted: Sequence[Wanted], *, files: dict[str, bytes], cams: Cams,
         batch_size: int, workers: int) -> dict[int, Shown]:  # fmt: skip
    """The `wanted` images decoded again (in this process; under torchrun the main one), their thumbnails and
    overlays added to `files` (under images/); position in `wanted` -> what the page shows of it."""
    preprocess = engine.preprocess

    def decode(position: int) -> tuple[Image.Image, np.ndarray]:
        picture = load_example(ds.paths[wanted[position].index])
        return picture, preprocess.to_uint8(picture)

    shown: dict[int, Shown] = {}
    # Without compute, run passes what decode gives through untouched: here the picture and the model's input
    batches = pipeline.run(range(len(wanted)), decode, None, batch_size=batch_size, workers=workers,  # type: ignore[arg-type]
                           name=lambda position: ds.name(wanted[position].index))  # fmt: skip
    for batch in batches:
        ready = []
        for outcome in batch:
            if outcome.error is not None:
                number = wanted[outcome.ref].number
                shown[outcome.ref] = Shown(number, problem=f"could not be read again: {outcome.error}")
            else:
                ready.append(outcome)
        maps = cams.maps(ready, wanted)
        for outcome in ready:
            position = outcome.ref
            shown[position] = _draw(outcome.value[0], maps.get(position), wanted[position], preprocess=preprocess,
                                    files=files)  # fmt: skip
    return shown


def _draw(picture: Image.Image, maps: np.ndarray | None, wanted: Wanted, *, preprocess: Preprocess,
          files: dict[str, bytes]) -> Shown:  # fmt: skip
    """One image's thumbnail and overlays (into `files`, under images/)."""
    stem = f"images/{wanted.number:05d}"
    thumbnail = fit(picture, THUMB)
    files[f"{stem}.jpg"] = encode(thumbnail)
    if maps is None:
        return Shown(wanted.number, thumbnail=f"{stem}.jpg")
    box = preprocess.view_box(picture.width, picture.height)
    overlays = []
    for heat, suffix in zip(maps, wanted.suffixes):
        files[f"{stem}-{suffix}.jpg"] = encode(overlay(picture, heat, box, THUMB, fitted=thumbnail))
        overlays.append(f"{stem}-{suffix}.jpg")
    return Shown(wanted.number, thumbnail=f"{stem}.jpg", overlays=tuple(overlays))
