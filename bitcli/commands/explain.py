"""`bit explain`: Grad-CAM for any images (bitcli.engine's `gradcam`): for each image the class it explains (its
prediction, or --target), an overlay PNG on the image as the user sees it, the raw maps in maps.safetensors and
one JSON row, on stdout and in explain.jsonl. The output folder follows the page-folder rules
(bitcli.pages.folder): a new or empty folder, or an earlier one of bitcli's.
"""

from __future__ import annotations

import functools
import io
import json
import re
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bitcli import scores, urls
from bitcli.distributed import from_main, process_group
from bitcli.engine import Engine, load_engine
from bitcli.errors import BitError
from bitcli.formats.raw import write_safetensors
from bitcli.formats.tensors import TensorRef
from bitcli.hub import load_checkpoint
from bitcli.inputs import Input, decode, expand_inputs
from bitcli.labels import match_class
from bitcli.options import ExplainOptions
from bitcli.pages.folder import EXPLAIN, PageFolder
from bitcli.pages.pictures import OVERLAY_MAX, encode, overlay
from bitcli.pipeline import Report, drop, exit_code, run_report
from bitcli.preprocess import Preprocess, load_image
from bitcli.render import json_lines, print_lines
from bitcli.ui import display, log

ROWS_FILE, MAPS_FILE = "explain.jsonl", "maps.safetensors"
KIND = EXPLAIN


@dataclass(frozen=True)
class Explained:
    """One input's row: (class index, its score as `bit predict` gives it, the map [H, W], for a multi-label model
    whether the score reaches the class's threshold) or why it has none."""

    path: str
    value: tuple[int, float, np.ndarray, bool | None] | None = None
    error: str | None = None


def run(opts: ExplainOptions) -> int:
    """The whole command; returns the exit code (1 when an input failed, 130 on Ctrl-C)."""
    with process_group(opts.device) as (info, device):
        report: Report[Explained] = Report(from_main(lambda: expand_inputs(opts.images, opts.recursive), info),
                                           Explained)  # fmt: skip
        ckpt = load_checkpoint(opts.model, opts.revision)
        engine = load_engine(ckpt, device, torch.float32)  # the class is picked from the logits the maps explain
        fixed = target_index(opts.target, engine.labels, ckpt.source or opts.model) if opts.target else None

        def explain(batch: np.ndarray) -> list[tuple[int, float, np.ndarray, bool | None]]:
            # bit predict's scores (bitcli.scores): the model's temperature, a multi-label model's sigmoids
            probs = scores.probabilities(engine.logits(batch), engine.temperature,
                                         multi_label=engine.thresholds is not None).cpu()  # fmt: skip
            passed = None if engine.thresholds is None else probs >= torch.tensor(engine.thresholds, dtype=probs.dtype)
            if fixed is not None:
                index = torch.full((len(batch),), fixed)
            elif passed is not None:  # a label bit predict prints (the highest of them; sigmoids are <= 1) first
                index = torch.where(passed, probs + 2, probs).argmax(dim=1)
            else:
                index = probs.argmax(dim=1)
            maps = engine.gradcam(batch, index.numpy())
            picked = probs.gather(1, index[:, None])[:, 0].tolist()
            reached = [None] * len(batch) if passed is None else passed.gather(1, index[:, None])[:, 0].tolist()
            return [(int(i), float(s), m, r) for i, s, m, r in zip(index.tolist(), picked, maps, reached)]

        downloads = Downloads(engine.preprocess, urls.downloads(opts.max_download_mb))
        out = Outputs(opts.output, report.inputs, engine, downloads) if info.main else None
        interrupted = run_report(report, downloads.decode, explain, batch_size=opts.batch_size,
                                 workers=opts.workers, emit=out.add if out is not None else drop, info=info,
                                 verb="explaining")  # fmt: skip
        if out is not None:
            out.finish()
        return exit_code(report, interrupted, info, None)  # its rows are on stdout (and in explain.jsonl)


def target_index(spec: str, labels: Sequence[str], source: str) -> int:
    """--target as a class index: a label of the model, its first name when unique, or an index."""
    try:
        return match_class(spec, labels, where="--target", source=source)
    except BitError as exc:  # its advice is about class folders
        head = str(exc).rpartition("; ")[0] or str(exc)
        raise BitError(f"{head}; give a label as `bit predict` prints it, its first name, or a class index") from None


def overlay_name(number: int, path: str) -> str:
    """The overlay of input `number` (from 1): its number, then its file name made safe (letters, digits, . _ -)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(path).stem)[:60].strip("._") or "image"
    return f"{number:05d}-{stem}.png"


class Downloads:
    """The decoder of explain's inputs, which keeps each URL's downloaded bytes until its overlay is drawn: the
    overlay shows the image that was explained, downloaded once (a file is read again for its overlay). Under
    torchrun, a URL decoded by another process is downloaded again by the main process, which draws them all."""

    def __init__(self, preprocess: Preprocess, limits: urls.Limits) -> None:
        self.preprocess, self.limits = preprocess, limits  # limits: --max-download-mb
        self._lock = threading.Lock()
        self._kept: dict[str, deque[bytes]] = {}  # per URL (it may be listed more than once): the bytes, in turn

    def decode(self, path: str) -> np.ndarray:
        """The input as the model takes it (inputs.decode), a URL's bytes kept."""
        if not urls.is_url(path):
            return decode(path, self.preprocess)
        data = urls.fetch(path, self.limits)
        array = self.preprocess.to_uint8(load_image(io.BytesIO(data), name=display(path)))
        with self._lock:  # (kept once it decoded: only rows with a value draw an overlay)
            self._kept.setdefault(path, deque()).append(data)
        return array

    def picture(self, path: str) -> Image.Image:
        """The input as the user sees it, for its overlay: a URL's kept bytes, given up once drawn."""
        if not urls.is_url(path):
            return load_image(path)
        with self._lock:
            kept = self._kept.get(path)
            data = kept.popleft() if kept else None
            if kept is not None and not kept:
                del self._kept[path]
        return urls.open_image(path, self.limits) if data is None else load_image(io.BytesIO(data), name=display(path))


class Outputs:
    """The main process's output: each released row's overlay written as it comes (the folder is claimed at the
    first row, so a model that cannot explain leaves nothing behind), its JSON line printed; the rows and the
    maps written at the end."""

    def __init__(self, folder: Path, inputs: list[Input], engine: Engine, downloads: Downloads) -> None:
        self.folder, self.inputs, self.engine, self.downloads = folder, inputs, engine, downloads
        self.page: PageFolder | None = None
        self.lines: list[dict[str, Any]] = []
        self.maps: list[tuple[int, str, str, np.ndarray]] = []  # (input number, path, label, map)

    def add(self, rows: list[Explained]) -> None:
        if not rows:
            return
        if self.page is None:
            names = [overlay_name(k, i.path) for k, i in enumerate(self.inputs, 1)]
            self.page = PageFolder(self.folder, KIND, [*names, ROWS_FILE, MAPS_FILE])
        for row in rows:
            self.lines.append(self._one(len(self.lines) + 1, row))
        print_lines(_Line.of(self.lines[-len(rows) :]))

    def _one(self, number: int, row: Explained) -> dict[str, Any]:
        if row.error is not None or row.value is None:
            return {"path": row.path, "error": row.error}
        assert self.page is not None  # claimed by add before its first row
        index, score, heat, reached = row.value
        label = self.engine.labels[index] if index < len(self.engine.labels) else str(index)
        line: dict[str, Any] = {"path": row.path, "target": label, "index": index, "score": round(score, 6)}
        if reached is not None:  # a multi-label model: is the class one of the labels bit predict prints?
            line["above_threshold"] = reached
        try:
            picture = self.downloads.picture(self.inputs[number - 1].path)
        except BitError as exc:  # decoded a moment ago: changed since (or, downloaded again, failed); the row
            # and its map stay
            log(f"error: no overlay: {exc}")
            line["overlay"] = None
        else:
            box = self.engine.preprocess.view_box(picture.width, picture.height)
            drawn = overlay(picture, heat, box, min(OVERLAY_MAX, max(picture.size)))
            name = overlay_name(number, self.inputs[number - 1].path)
            self.page.write(name, encode(drawn, "PNG"))
            line["overlay"] = display(self.folder / name)
        self.maps.append((number, row.path, label, heat))
        return line

    def finish(self) -> None:
        if self.page is None:
            return
        text = json_lines(_Line.of(self.lines)).encode("utf-8")
        self.page.write(ROWS_FILE, text)
        if self.maps:
            _write_maps(self.page.path(MAPS_FILE), self.maps)
        self.page.finish()
        done = sum(1 for line in self.lines if "error" not in line)
        log(f"explain: {done} of {len(self.lines)} images in {display(self.folder)}")


@dataclass(frozen=True)
class _Line:
    """A JSON row for render.json_lines."""

    data: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return self.data

    @classmethod
    def of(cls, lines: list[dict[str, Any]]) -> list[_Line]:
        return [cls(line) for line in lines]


def _write_maps(path: Path, maps: list[tuple[int, str, str, np.ndarray]]) -> None:
    """maps.safetensors: `maps` float32 [N, H, W] in input order; when the sizes differ (a model without a
    centre crop keeps each image's aspect ratio) one tensor per image instead, `maps.NNNNN` by input number.
    The metadata lists each map's path and class as JSON."""
    metadata = {"paths": json.dumps([p for _, p, _, _ in maps], ensure_ascii=False),
                "targets": json.dumps([t for _, _, t, _ in maps], ensure_ascii=False)}  # fmt: skip
    shapes = {m.shape for *_, m in maps}
    if len(shapes) == 1:
        stacked = np.stack([m for *_, m in maps]).astype(np.float32)
        tensors = {"maps": TensorRef(stacked.shape, torch.float32, lambda: torch.from_numpy(stacked))}
    else:
        tensors = {
            f"maps.{n:05d}": TensorRef(m.shape, torch.float32, functools.partial(torch.from_numpy, m))
            for n, _, _, m in maps
        }
    write_safetensors(path, tensors, metadata)
