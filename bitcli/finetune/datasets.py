"""The run's images: the training and validation data as found (any source, bitcli.sources), then only the images that decode, with
--val-split and --shots applied. Everything here happens before any weight is built."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from bitcli import pipeline
from bitcli.data import few_shot, split_validation
from bitcli.distributed import Dist, all_max, collective_device
from bitcli.errors import BitError, UsageError
from bitcli.options import FinetuneOptions
from bitcli.sources.examples import ImageFolder
from bitcli.sources.locate import Columns, training_parts, validation_part
from bitcli.sources.rows import Chain, example_name, load_example
from bitcli.ui import log, progress_bar, visible

CHECK_LOG_FROM = 1000  # images: say on stderr that they are being decoded (a progress bar shows on a terminal)


@dataclass(frozen=True)
class Datasets:
    train: ImageFolder
    val: ImageFolder | None
    validation: str | None  # a folder (or split of DATA), "F of every class of DIR (seed S)", or None
    skipped: tuple[str, ...] = ()  # images left out because they do not decode (training, then validation)


def scan_datasets(opts: FinetuneOptions) -> Datasets:
    """The data as found (headers are not even read yet); refuses layouts that make no classifier."""
    if opts.val is not None and opts.val_split is not None:
        raise UsageError("--val and --val-split both name a validation set; pass only one")
    columns = Columns(opts.image_column, opts.label_column)
    train_part, val_part = training_parts(opts.data, columns)
    if opts.val is not None:
        val_part = validation_part(opts.val, columns)
        if val_part.same_rows(train_part):  # allowed (a check that training runs), but no measure of new images
            log(visible(
                f"warning: --val {opts.val}: validates on the training data ({train_part.name}), so its accuracy "
                "says nothing about new images; pass the rows held out for validation"
            ))  # fmt: skip
    elif val_part is not None and opts.val_split is not None:
        raise UsageError(f"--val-split: {opts.data} already has the validation split {val_part.name}; drop --val-split")
    train = train_part.scan(None)
    if len(train.classes) < 2:
        what = "class folder" if train.source is None else "class"
        fix = (
            "add a sub-folder of images for each other class"
            if train.source is None
            else "add examples of other classes"
        )
        raise UsageError(
            f"{visible(train_part.name)}: holds one {what} ({train.classes[0]!r}); a classifier needs at least 2 classes, so {fix}"
        )
    val = val_part.scan(train.classes) if val_part is not None else None
    return Datasets(train, val, val_part.name if val_part is not None else None)


def usable_datasets(
    opts: FinetuneOptions, found: Datasets, undecodable: Callable[[Sequence], dict[int, str]]
) -> Datasets:
    """The images that decode, then --val-split and --shots.

    `undecodable(paths)` decodes them all and returns {index: error} of the failures. Every image the run
    uses is decoded here, before step 0; with --shots (and no --val-split) only the candidates are (see
    few_shot). The skipped files leave the data set before any sampling, so a run that skips them and one
    whose folder no longer holds them train on the same images, with the same fingerprint.
    """
    train, val, validation = found.train, found.val, found.validation
    skipped: list[str] = []

    def without(ds: ImageFolder, failed: dict[int, str] | set[int]) -> ImageFolder:
        skipped.extend(ds.name(i) for i in sorted(failed))
        return ds.subset(i for i in range(len(ds)) if i not in failed)

    checked_all = opts.shots is None or opts.val_split is not None
    if checked_all:
        failed = undecodable(Chain(train.paths, val.paths if val is not None else ()))
        n = len(train)
        train = without(train, {i for i in failed if i < n})
        if val is not None:
            val = without(val, {i - n for i in failed if i >= n})
        _check_every_class_decodes(train)
    elif val is not None:
        val = without(val, undecodable(val.paths))
    if opts.val_split is not None:
        train, val = split_validation(train, opts.val_split, opts.seed)
        validation = f"{opts.val_split:g} of every class of {found.train.where()} (seed {opts.seed})"
    if opts.shots is not None:
        pool = train

        def failing(indices: list[int]) -> set[int]:
            if checked_all:
                return set()
            failed = {indices[j] for j in undecodable([pool.paths[i] for i in indices])}
            skipped.extend(pool.name(i) for i in sorted(failed))
            return failed

        train = few_shot(pool, opts.shots, opts.seed, failing)
    if val is not None and len(val) == 0:
        raise BitError(f"{visible(validation or '')}: none of the validation images can be decoded (listed above)")
    return Datasets(train, val, validation, tuple(skipped))


def _check_every_class_decodes(train: ImageFolder) -> None:
    for c, count in enumerate(train.counts()):
        if count == 0:
            raise BitError(
                f"{visible(train.where(c))}: none of the images of class "
                f"{train.classes[c]!r} can be decoded (listed above); replace them or remove the folder"
            )


def find_undecodable(
    examples: Sequence, workers: int, advance: Callable[[int], None] = lambda n: None
) -> dict[int, str]:
    """Decode every example (a path or a sources.rows.RowRef) fully, through the pipeline on `workers` threads
    (0: this one): {index: one-line error} of those that fail.

    Run before step 0: a truncated file passes the header scan and would otherwise stop the run at the step
    that first draws it. Decoding is deterministic, so the same files fail every time (a resumed run skips
    the same ones).
    """
    window = 16 * max(1, workers)  # images per batch: memory stays bounded on a million-image folder
    batches = pipeline.run(range(len(examples)), lambda i: _decodes(examples[i]), None, batch_size=window,
                           workers=workers, name=lambda i: example_name(examples[i]), advance=advance)  # fmt: skip
    return {o.ref: o.error for batch in batches for o in batch if o.error is not None}


def _decodes(ref) -> np.ndarray:
    """Decode `ref` and drop the pixels: only whether it decodes matters (and memory stays small)."""
    load_example(ref)
    return np.zeros(0, dtype=np.uint8)


def shared_undecodable(paths: Sequence, info: Dist, device: torch.device, workers: int) -> dict[int, str]:
    """find_undecodable over `paths`, shared by the processes (each decodes every world-th image) and
    the same answer in each; the main process reports every failure on stderr."""
    if not paths:
        return {}
    if info.main and len(paths) >= CHECK_LOG_FROM:
        log(f"checking that {len(paths):,} images decode")
    mine = paths if info.world == 1 else paths[info.rank :: info.world]  # one process: no copy of a million rows
    bar = (
        progress_bar("checking images", total=len(mine), unit="img")
        if info.main
        else contextlib.nullcontext(lambda n: None)
    )
    with bar as advance:
        found = {info.rank + j * info.world: error for j, error in find_undecodable(mine, workers, advance).items()}
    if info.world > 1:
        flags = torch.zeros(len(paths), dtype=torch.int32, device=collective_device(device))
        if found:
            flags[list(found)] = 1
        others = [i for i in all_max(flags, info).nonzero().flatten().tolist() if i not in found]
        again = find_undecodable([paths[i] for i in others], workers) if info.main else {}  # their errors: a few files
        found.update({i: again.get(j, f"{paths[i]}: cannot be decoded") for j, i in enumerate(others)})
    if info.main:
        for i in sorted(found):
            log(f"skipped {visible(found[i])}")
    return found
