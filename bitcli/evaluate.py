"""`bit eval` and the validation pass of `bit finetune`: top-1/top-5, per-class accuracy, confusion matrix.

The model runs through the one inference engine (bitcli.engine), so evaluating a folder costs what
classifying its images with `bit predict` costs, and gives the same logits.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.table import Table
from rich.text import Text

from bitcli.data import ImageFolder, find_splits, scan
from bitcli.engine import Engine
from bitcli.errors import BitError, one_line
from bitcli.hub import load_checkpoint
from bitcli.images import Job, Reader, stack_by_size
from bitcli.labels import match_classes
from bitcli.options import EvalFormat, EvalOptions
from bitcli.preprocess import load_image
from bitcli.render import console
from bitcli.runtime import resolve_device, resolve_precision
from bitcli.ui import display, log, progress_bar, visible

OTHER = "(other)"  # confusion-matrix column for predictions outside the evaluated classes
TOP_K = 5
NO_TOP5 = "n/a (the model has 5 classes or fewer)"  # the top five would always hold the answer


@dataclass(frozen=True)
class EvalResult:
    top1: float
    top5: float | None  # None when the model has at most 5 classes (top-5 would be 1.0 by definition)
    loss: float
    count: int
    per_class: dict[str, float]  # data-set class -> top-1 accuracy on its images
    labels: list[str]  # rows (true) and columns (predicted) of `confusion`
    confusion: list[list[int]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "top1": self.top1,
            "top5": self.top5,
            "loss": self.loss,
            "count": self.count,
            "per_class": self.per_class,
            "confusion": self.confusion,
            "labels": self.labels,
        }


class Accumulator:
    """Running counts over batches of logits, so that no [N, classes] array is ever held."""

    def __init__(self, class_names: Sequence[str], class_to_model: Sequence[int], num_model_classes: int) -> None:
        self.names = list(class_names)
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

    def update(self, logits: torch.Tensor, targets: np.ndarray) -> None:
        """logits: float tensor [b, num_model_classes]; targets: data-set class indices [b]."""
        model_targets = torch.from_numpy(self.to_model[targets])
        logits = logits.float().cpu()
        self.loss_sum += float(F.cross_entropy(logits, model_targets, reduction="sum"))
        topk = logits.topk(min(TOP_K, logits.shape[1]), dim=1).indices.numpy()
        pred = topk[:, 0]
        hit1 = pred == model_targets.numpy()
        self.correct5 += int((topk == model_targets.numpy()[:, None]).any(axis=1).sum())
        np.add.at(self.correct1, targets, hit1.astype(np.int64))
        np.add.at(self.totals, targets, 1)
        other = len(self.names)
        rows = np.array([self.axis_of_model[int(self.to_model[t])] for t in targets], dtype=np.int64)
        cols = np.array([self.axis_of_model.get(int(p), other) for p in pred], dtype=np.int64)
        np.add.at(self.confusion, (rows, cols), 1)

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
            per_class={name: float(self.correct1[i] / self.totals[i]) for i, name in enumerate(self.names) if self.totals[i]},
            labels=self.axis_names + ([OTHER] if with_other else []),
            confusion=self.confusion[:size, :size].tolist(),
        )


def evaluate(
    engine: Engine,
    ds: ImageFolder,
    decode: Callable[[int], np.ndarray],
    batch_size: int,
    workers: int,
    class_to_model: Sequence[int],
    advance: Callable[[int], None] = lambda n: None,
) -> EvalResult:
    """Accuracy of the engine's model on `ds`; `decode(i)` gives image i as uint8 HWC. class_to_model[c] is
    the model's label index of data-set class c. `workers` decoding threads run a batch ahead of the model."""
    acc = Accumulator(ds.classes, class_to_model, engine.num_classes)
    targets = np.asarray(ds.targets, dtype=np.int64)
    with Reader(workers) as reader:
        for indices, results in reader.outcomes(_batches(len(ds), decode, batch_size)):
            for group, batch in _stacked(ds, indices, results):
                acc.update(engine.logits(batch), targets[group])
            advance(len(indices))
    return acc.result()


def _batches(count: int, decode: Callable[[int], np.ndarray], batch_size: int) -> Iterator[tuple[np.ndarray, list[Job]]]:
    """Consecutive batches of data-set indices 0..count-1 with their decode jobs."""
    for start in range(0, count, batch_size):
        indices = np.arange(start, min(start + batch_size, count))
        yield indices, [lambda i=int(i): decode(i) for i in indices]


def _stacked(ds: ImageFolder, indices: np.ndarray, results: list[np.ndarray | Exception]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(indices, stacked images), one batch per image size: only equal sizes stack, and a checkpoint without
    a centre crop keeps each image's aspect ratio. Accuracy is over a whole pass, so an image that does not
    decode stops it, with a message naming the file."""
    for position, result in enumerate(results):
        if isinstance(result, BitError):
            raise result
        if isinstance(result, Exception):  # a decoder bug on one odd file: still name the file
            path = display(ds.paths[indices[position]])
            raise BitError(f"{path}: cannot decode image ({one_line(result)})") from result
    for group, batch in stack_by_size(zip(indices, results)):
        yield np.asarray(group), batch


# ----------------------------------------------------------------------------------------------------------
# The command


def map_classes(classes: Sequence[str], labels: Sequence[str], source: str, root: Path) -> list[int]:
    """Data-set class folder names -> the model's label indices: the full label, a class index, or a first
    name that only one label has (an ambiguous one, such as ImageNet's two "crane"s, is refused)."""
    return match_classes(classes, labels, source, root)


def eval_folder(data: Path) -> Path:
    """DATA itself, or DATA/val (valid, validation) when DATA is a train/val split."""
    train, val = find_splits(data)
    if train == data:
        return data
    if val is None:
        raise BitError(f"{data}: has train/ but no val/, valid/ or validation/; pass the folder to evaluate")
    log(f"evaluating the validation split {visible(str(val))}")
    return val


def run(opts: EvalOptions) -> int:
    """The whole command; returns the exit code (130 when Ctrl-C stopped the pass)."""
    device = resolve_device(opts.device)
    dtype = resolve_precision(opts.precision, device)
    ds = scan(eval_folder(opts.data))
    ckpt = load_checkpoint(opts.model, opts.revision)
    # Folder names are checked before the model is built (seconds for a big one); a checkpoint without a
    # head has no labels, and Engine.load says so instead.
    class_to_model = map_classes(ds.classes, ckpt.labels, ckpt.source or opts.model, ds.root) if ckpt.config.num_classes else []
    engine = Engine.load(ckpt, device, dtype)
    preprocess = ckpt.preprocess
    table = opts.format == EvalFormat.table
    bar = progress_bar("evaluating", total=len(ds), unit="img") if table else contextlib.nullcontext(lambda n: None)
    done = 0
    try:
        with bar as show:

            def advance(n: int) -> None:
                nonlocal done
                done += n
                show(n)

            def decode(i: int) -> np.ndarray:
                return preprocess.to_uint8(load_image(ds.paths[i]))

            result = evaluate(engine, ds, decode, opts.batch_size, opts.workers, class_to_model, advance)
    except KeyboardInterrupt:  # Ctrl-C: one line, as predict gives (the bar and decode threads are closed by now)
        log(f"interrupted: {done} of {len(ds)} images done; accuracy is reported only for a whole pass")
        return 130
    if table:
        sys.stdout.write(render_table(result, color=sys.stdout.isatty()))
    else:
        sys.stdout.write(json.dumps(result.to_dict(), ensure_ascii=False) + "\n")
    sys.stdout.flush()
    return 0


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
    # Class names are data: Text keeps them literal ("[bold]cat[/bold]" is not markup) and visible() on one
    # line (a newline in a folder name would break the row).
    per_class = Table(title="per-class top-1")
    per_class.add_column("class", overflow="fold")
    per_class.add_column("accuracy", justify="right")
    row_of = {name: i for i, name in enumerate(result.labels)}
    per_class.add_column("images", justify="right")
    for name, accuracy in result.per_class.items():
        per_class.add_row(Text(visible(name)), f"{accuracy:.4f}", str(sum(result.confusion[row_of[name]])))
    out.print(per_class)
    if len(result.labels) <= MAX_CONFUSION_TABLE:
        out.print("confusion matrix (rows: true class, columns: predicted class)")
        confusion = Table()
        confusion.add_column("")
        for name in result.labels:
            confusion.add_column(Text(visible(name)), justify="right")
        for name, row in zip(result.labels, result.confusion):
            confusion.add_row(Text(visible(name)), *(str(v) for v in row))
        out.print(confusion)
    else:
        out.print(f"confusion matrix: {len(result.labels)} classes; use --format json to get it")
    return buf.getvalue()
