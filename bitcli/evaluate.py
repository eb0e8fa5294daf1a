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
import torch

from bitcli import plots
from bitcli.data import ImageFolder
from bitcli.distributed import Dist, from_main, gather_in_order, my_share, setup_distributed, teardown
from bitcli.engine import Engine
from bitcli.errors import BitError, one_line
from bitcli.hub import load_checkpoint
from bitcli.images import Job, Reader, stack_by_size
from bitcli.labels import match_classes
from bitcli.metrics import OTHER, Accumulator, EvalResult, render_table
from bitcli.options import EvalFormat, EvalOptions
from bitcli.runtime import resolve_precision
from bitcli.sources.locate import Columns, evaluation_part
from bitcli.sources.rows import load_example
from bitcli.ui import display, log, progress_bar, visible


def evaluate(
    engine: Engine,
    ds: ImageFolder,
    decode: Callable[[int], np.ndarray],
    batch_size: int,
    workers: int,
    class_to_model: Sequence[int],
    advance: Callable[[int], None] = lambda n: None,
    info: Dist | None = None,
) -> EvalResult | None:
    """Accuracy of the engine's model on `ds`; `decode(i)` gives image i as uint8 HWC. class_to_model[c] is
    the model's label index of data-set class c. `workers` decoding threads run a batch ahead of the model.

    Under torchrun each process runs every world-th batch (distributed.my_share) and the main process gets
    every batch's logits and accumulates them in batch order: the same updates with the same values as in one
    process, so the same result, bit for bit. The other processes return None."""
    info = info or Dist()
    acc = Accumulator(ds.classes, class_to_model, engine.num_classes)
    targets = np.asarray(ds.targets, dtype=np.int64)
    count = -(-len(ds) // batch_size)
    with Reader(workers) as reader:
        batches = reader.outcomes(_batches(len(ds), decode, batch_size, my_share(count, info)))
        mine = (_logits(engine, ds, indices, results) for indices, results in batches)
        for scored in gather_in_order(mine, count, info):
            if isinstance(scored, BitError):
                raise scored
            for group, logits in scored:
                acc.update(logits, targets[group])
            advance(sum(len(group) for group, _ in scored))
    return acc.result() if info.main else None


def _batches(
    count: int, decode: Callable[[int], np.ndarray], batch_size: int, batches: range
) -> Iterator[tuple[np.ndarray, list[Job]]]:
    """The batches numbered in `batches` of data-set indices 0..count-1 (batch b: b * batch_size onwards),
    with their decode jobs."""
    for b in batches:
        indices = np.arange(b * batch_size, min((b + 1) * batch_size, count))
        yield indices, [lambda i=int(i): decode(i) for i in indices]


def _logits(
    engine: Engine, ds: ImageFolder, indices: np.ndarray, results: list[np.ndarray | Exception]
) -> list[tuple[np.ndarray, torch.Tensor]] | BitError:
    """(indices, logits on the CPU) per stack of a batch, or the error that stops the pass: returned, not
    raised, so that the main process raises it at this batch's turn, as one process does."""
    try:
        return [(group, engine.logits(batch).cpu()) for group, batch in _stacked(ds, indices, results)]
    except BitError as exc:
        return exc


def _stacked(
    ds: ImageFolder, indices: np.ndarray, results: list[np.ndarray | Exception]
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(indices, stacked images), one batch per image size: only equal sizes stack, and a checkpoint without
    a centre crop keeps each image's aspect ratio. Accuracy is over a whole pass, so an image that does not
    decode stops it, with a message naming the file."""
    for position, result in enumerate(results):
        if isinstance(result, BitError):
            raise result
        if isinstance(result, Exception):  # a decoder bug on one odd file: still name the file
            path = ds.name(int(indices[position]))
            raise BitError(f"{path}: cannot decode image ({one_line(result)})") from result
    for group, batch in stack_by_size(zip(indices, results)):
        yield np.asarray(group), batch


# ----------------------------------------------------------------------------------------------------------
# The command


def map_classes(
    classes: Sequence[str], labels: Sequence[str], source: str, root: Path, data: str | None = None
) -> list[int]:
    """Data-set class folder names (or labels of `data`'s rows) -> the model's label indices: the full label, a
    class index, or a first name that only one label has (an ambiguous one, such as ImageNet's two "crane"s, is
    refused)."""
    return match_classes(classes, labels, source, root, data)


def run(opts: EvalOptions) -> int:
    """The whole command; returns the exit code (130 when Ctrl-C stopped the pass)."""
    info, device = setup_distributed(opts.device)
    try:
        return _run(opts, info, device)
    finally:
        teardown(info)


def _run(opts: EvalOptions, info: Dist, device: torch.device) -> int:
    """Every process evaluates its share of the batches; the main process alone reports."""
    if opts.plot is not None:
        plots.require("--plot")  # before any work
    dtype = resolve_precision(opts.precision, device)
    columns = Columns(opts.image_column, opts.label_column)
    ds = from_main(
        lambda: evaluation_part(opts.data, columns).scan(None), info
    )  # listed once: every process splits the same list
    ckpt = load_checkpoint(opts.model, opts.revision)
    # Folder names are checked before the model is built (seconds for a big one); a checkpoint without a
    # head has no labels, and Engine.load says so instead.
    class_to_model = (
        map_classes(ds.classes, ckpt.labels, ckpt.source or opts.model, ds.root, ds.source)
        if ckpt.config.num_classes
        else []
    )
    engine = Engine.load(ckpt, device, dtype)
    preprocess = ckpt.preprocess
    table = opts.format == EvalFormat.table
    show_bar = table and info.main
    bar = progress_bar("evaluating", total=len(ds), unit="img") if show_bar else contextlib.nullcontext(lambda n: None)
    done = 0
    try:
        with bar as show:

            def advance(n: int) -> None:
                nonlocal done
                done += n
                show(n)

            def decode(i: int) -> np.ndarray:
                return preprocess.to_uint8(load_example(ds.paths[i]))

            result = evaluate(engine, ds, decode, opts.batch_size, opts.workers, class_to_model, advance, info)
    except KeyboardInterrupt:  # Ctrl-C: one line, as predict gives (the bar and decode threads are closed by now)
        if info.main:
            log(f"interrupted: {done} of {len(ds)} images done; accuracy is reported only for a whole pass")
        return 130
    if result is None:  # not the main process: it reports, and any failure there is the run's
        return 0
    if table:
        sys.stdout.write(render_table(result, color=sys.stdout.isatty()))
    else:
        sys.stdout.write(json.dumps(result.to_dict(), ensure_ascii=False) + "\n")
    sys.stdout.flush()
    if opts.plot is not None:
        heading = f"{visible(display(ds.where()))} with {visible(opts.model)}"
        plots.write_png(opts.plot, plots.evaluation_png(result.to_dict(), heading, OTHER))
    return 0
