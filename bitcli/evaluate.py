"""`bit eval` and the validation pass of `bit finetune`: run the model over a labelled data set and
accumulate the metrics (bitcli.metrics).

The model runs through the one inference engine (bitcli.engine), so evaluating a folder costs what
classifying its images with `bit predict` costs, and gives the same logits.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from bitcli.data import ImageFolder, find_splits, scan
from bitcli.engine import Engine
from bitcli.errors import BitError, one_line
from bitcli.hub import load_checkpoint
from bitcli.images import Job, Reader, stack_by_size
from bitcli.labels import match_classes
from bitcli.metrics import Accumulator, EvalResult, render_table
from bitcli.options import EvalFormat, EvalOptions
from bitcli.preprocess import load_image
from bitcli.runtime import resolve_device, resolve_precision
from bitcli.ui import display, log, progress_bar, visible


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
