"""`bit eval` and the validation pass of `bit finetune`: top-1/top-5, per-class accuracy, confusion matrix."""

from __future__ import annotations

import contextlib
import io
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bitcli.data import DecodeCache, ImageFolder, Reader, find_splits, index_batches, scan
from bitcli.errors import BitError, UsageError
from bitcli.ui import log, visible

FORMATS = ("table", "json")
OTHER = "(other)"  # confusion-matrix column for predictions outside the evaluated classes
TOP_K = 5


@dataclass(frozen=True)
class EvalResult:
    top1: float
    top5: float  # top-min(5, classes): 1.0 by definition for models with at most 5 classes
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
        self.k = min(TOP_K, num_model_classes)
        # Confusion axes: the evaluated classes in the model's label order, then OTHER when needed.
        order = np.argsort(self.to_model, kind="stable")
        self.axis_names = [self.names[i] for i in order]
        self.axis_of_model = {int(self.to_model[i]): a for a, i in enumerate(order)}
        self.confusion = np.zeros((len(self.names) + 1, len(self.names) + 1), dtype=np.int64)
        self.correct1 = np.zeros(len(self.names), dtype=np.int64)
        self.totals = np.zeros(len(self.names), dtype=np.int64)
        self.correct5 = 0
        self.loss_sum = 0.0

    def update(self, logits, targets: np.ndarray) -> None:
        """logits: float tensor [b, num_model_classes]; targets: data-set class indices [b]."""
        import torch
        import torch.nn.functional as F

        model_targets = torch.from_numpy(self.to_model[targets])
        logits = logits.float().cpu()
        self.loss_sum += float(F.cross_entropy(logits, model_targets, reduction="sum"))
        topk = logits.topk(self.k, dim=1).indices.numpy()
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
            top5=float(self.correct5 / count),
            loss=self.loss_sum / count,
            count=count,
            per_class={name: float(self.correct1[i] / self.totals[i]) for i, name in enumerate(self.names) if self.totals[i]},
            labels=self.axis_names + ([OTHER] if with_other else []),
            confusion=self.confusion[:size, :size].tolist(),
        )


def evaluate(
    model,
    ds: ImageFolder,
    decode: Callable[[int], np.ndarray],
    normalize: Callable,
    device,
    dtype,
    batch_size: int,
    workers: int,
    class_to_model: Sequence[int],
    channels_last: bool = False,
    advance: Callable[[int], None] = lambda n: None,
) -> EvalResult:
    """Accuracy of `model` on `ds`; `decode(i)` gives image i as uint8 HWC, `normalize` turns a uint8 batch
    into the model's input."""
    import torch

    from bitcli.runtime import autocast

    num_classes = model.config.num_classes
    acc = Accumulator(ds.classes, class_to_model, num_classes)
    targets = np.asarray(ds.targets, dtype=np.int64)
    was_training = model.training
    model.eval()
    try:
        with Reader(workers) as reader:
            for span, batch in reader.run(index_batches(len(ds), decode, batch_size)):
                x = normalize(torch.from_numpy(batch).to(device))
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.no_grad(), autocast(device, dtype):
                    logits = model(x)
                acc.update(logits, targets[span])
                advance(span.stop - span.start)
    finally:
        model.train(was_training)
    return acc.result()


# ----------------------------------------------------------------------------------------------------------
# The command


def map_classes(classes: Sequence[str], labels: Sequence[str], source: str, root: Path) -> list[int]:
    """Data-set class names -> the model's label indices, by exact name."""
    index = {name: i for i, name in enumerate(labels)}
    missing = [c for c in classes if c not in index]
    if missing:
        shown = ", ".join(repr(x) for x in list(labels)[:5]) + (" ..." if len(labels) > 5 else "")
        raise BitError(
            f"{root / missing[0]}: class {missing[0]!r} is not a label of {source} ({shown}); "
            "name the class folders after the model's labels"
        )
    return [index[c] for c in classes]


def eval_folder(data: Path) -> Path:
    """DATA itself, or DATA/val (valid, validation) when DATA is a train/val split."""
    train, val = find_splits(data)
    if train == data:
        return data
    if val is None:
        raise BitError(f"{data}: has train/ but no val/, valid/ or validation/; pass the folder to evaluate")
    log(f"evaluating the validation split {visible(str(val))}")
    return val


def run(
    data: Path,
    model_spec: str,
    revision: str | None,
    batch_size: int,
    device_spec: str,
    precision: str,
    fmt: str,
    workers: int,
) -> None:
    import torch

    from bitcli.hub import load_checkpoint
    from bitcli.runtime import resolve_device, resolve_precision
    from bitcli.ui import progress_bar

    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    device = resolve_device(device_spec)
    dtype = resolve_precision(precision, device)
    ds = scan(eval_folder(data))
    ckpt = load_checkpoint(model_spec, revision)
    model = ckpt.build_model(device=device)
    if model.head is None:
        raise BitError(f"{ckpt.source}: checkpoint has no classification head; it gives features, not labels")
    class_to_model = map_classes(ds.classes, ckpt.labels, ckpt.source or model_spec, ds.root)
    channels_last = device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    cache = DecodeCache(ds, ckpt.preprocess, budget_bytes=0)  # one pass: nothing to reuse
    bar = progress_bar("evaluating", total=len(ds), unit="img") if fmt == "table" else contextlib.nullcontext(lambda n: None)
    done = 0
    try:
        with bar as show:

            def advance(n: int) -> None:
                nonlocal done
                done += n
                show(n)

            result = evaluate(
                model, ds, cache.get, ckpt.preprocess.normalize, device, dtype, batch_size, workers,
                class_to_model, channels_last, advance,
            )  # fmt: skip
    except KeyboardInterrupt:  # Ctrl-C: one line, as predict gives (the bar and decode threads are closed by now)
        log(f"interrupted: {done} of {len(ds)} images done; accuracy is reported only for a whole pass")
        raise SystemExit(130) from None
    if fmt == "json":
        sys.stdout.write(json.dumps(result.to_dict(), ensure_ascii=False) + "\n")
    else:
        sys.stdout.write(render_table(result, color=sys.stdout.isatty()))
    sys.stdout.flush()


MAX_CONFUSION_TABLE = 25  # classes; wider matrices are for --format json


def render_table(result: EvalResult, color: bool) -> str:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=color, no_color=not color, width=200, highlight=False)
    console.print(f"images  {result.count}")
    console.print(f"top-1   {result.top1:.4f}")
    console.print(f"top-5   {result.top5:.4f}")
    console.print(f"loss    {result.loss:.4f}")
    # Class names are data: Text keeps them literal ("[bold]cat[/bold]" is not markup) and visible() on one
    # line (a newline in a folder name would break the row).
    per_class = Table(title="per-class top-1")
    per_class.add_column("class", overflow="fold")
    per_class.add_column("accuracy", justify="right")
    row_of = {name: i for i, name in enumerate(result.labels)}
    per_class.add_column("images", justify="right")
    for name, accuracy in result.per_class.items():
        per_class.add_row(Text(visible(name)), f"{accuracy:.4f}", str(sum(result.confusion[row_of[name]])))
    console.print(per_class)
    if len(result.labels) <= MAX_CONFUSION_TABLE:
        console.print("confusion matrix (rows: true class, columns: predicted class)")
        confusion = Table()
        confusion.add_column("")
        for name in result.labels:
            confusion.add_column(Text(visible(name)), justify="right")
        for name, row in zip(result.labels, result.confusion):
            confusion.add_row(Text(visible(name)), *(str(v) for v in row))
        console.print(confusion)
    else:
        console.print(f"confusion matrix: {len(result.labels)} classes; use --format json to get it")
    return buf.getvalue()
