"""Accuracy of a model on a labelled data set: `bit eval` and fine-tuning's validation run the engine over the
data set through the one pipeline (bitcli.pipeline) and accumulate the metrics (bitcli.metrics), so evaluating a
folder costs what classifying its images with `bit predict` costs, and gives the same logits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import numpy as np
import torch

from bitcli import pipeline, scores
from bitcli.distributed import Dist
from bitcli.engine import Engine, view_logits
from bitcli.errors import BitError
from bitcli.gpu_decode import DeviceDecoder, example_bytes
from bitcli.metrics import Accumulator, EvalResult
from bitcli.multilabel import MultiLabelAccumulator, MultiLabelResult
from bitcli.preprocess import Preprocess
from bitcli.sources.examples import ImageFolder
from bitcli.sources.rows import load_example


def example_decoder(ds: ImageFolder, preprocess: Preprocess) -> Callable[[int], np.ndarray]:
    """Example i of `ds` as `preprocess` gives it to a model (uint8 HWC), from any source."""
    return lambda i: preprocess.to_uint8(load_example(ds.paths[i]))


def example_reader(ds: ImageFolder) -> Callable[[int], bytes | None]:
    """Example i's encoded bytes, for a GPU decoder (bitcli.gpu_decode), or None."""
    return lambda i: example_bytes(ds.paths[i])


def evaluate(
    engine: Engine,
    ds: ImageFolder,
    decode: Callable[[int], np.ndarray],
    *,
    batch_size: int,
    workers: int,
    class_to_model: Sequence[int],
    advance: Callable[[int], None] = pipeline.no_progress,
    info: Dist = pipeline.ONE_PROCESS,
    tta: str | None = None,
    keep: Callable[[np.ndarray, torch.Tensor], None] | None = None,
    keep_views: Callable[[torch.Tensor, np.ndarray], None] | None = None,
    multi_label: bool = False,
    on_device: DeviceDecoder[int] | None = None,
) -> EvalResult | MultiLabelResult | None:
    """Accuracy of the engine's model on `ds`; `decode(i)` gives image i as uint8 HWC. class_to_model[c] is
    the model's label index of data-set class c. Accuracy is over a whole pass, so an image that does not decode
    stops it, with a message naming the file.

    The main process accumulates every stack of images exactly as the engine computed it, in batch order: the
    same updates with the same values whatever the number of processes, so the same result, bit for bit. The
    other processes return None. on_device: decode on the engine's GPU (bitcli.gpu_decode.for_engine).

    The scores are the engine's (its temperature) over the views of `tta` (bitcli.scores). On the main process,
    in the order they are accumulated: `keep(indices, logits)` gets every stack's data-set indices and logits
    [b, classes] (a report's per-image results; with several views, the log of the scores the metrics rank by;
    multi-label, the sigmoid scores the metrics are computed from), `keep_views(logits, targets)` every stack's
    logits [b, views, classes] and data-set classes [b] (fine-tuning fits the temperature on them).

    A multi-label model (the engine's thresholds), or `multi_label` (fine-tuning's validation, which fits the
    thresholds on these images): sigmoid scores and bitcli.multilabel's metrics; single-label data then counts
    each image's one class as its only one."""
    acc: Accumulator | MultiLabelAccumulator
    multi_label = multi_label or engine.thresholds is not None
    if multi_label:
        acc = MultiLabelAccumulator(engine.labels, class_to_model, engine.thresholds, tta=tta)
        targets = multi_hot_targets(ds)
    else:
        acc = Accumulator(ds.classes, class_to_model, engine.num_classes, temperature=engine.temperature, tta=tta)
        targets = np.asarray(ds.targets, dtype=np.int64)

    def logits(batch: np.ndarray) -> list[np.ndarray]:
        return list(view_logits(engine, batch, tta).cpu().numpy())  # numpy rows: only its own travels to rank 0

    batches = pipeline.run(range(len(ds)), decode, logits, batch_size=batch_size, workers=workers, info=info,
                           name=ds.name, advance=advance, on_device=on_device)  # fmt: skip
    with contextlib.closing(batches):
        for batch in batches:
            failed = next((o.error for o in batch if o.error is not None), None)
            if failed is not None:
                raise BitError(failed)
            for stack in batch.stacks:
                outcomes = [batch.outcomes[p] for p in stack]
                stacked = torch.from_numpy(np.stack([o.value for o in outcomes]))
                acc.update(stacked, targets[[o.ref for o in outcomes]])
                if keep_views is not None:
                    keep_views(stacked, targets[[o.ref for o in outcomes]])
                if keep is not None:
                    kept = scores.probabilities(stacked, multi_label=True) if multi_label else \
                        ranked_logits(stacked, engine)  # fmt: skip
                    keep(np.asarray([o.ref for o in outcomes], dtype=np.int64), kept)
    return acc.result() if info.main else None


def multi_hot_targets(ds: ImageFolder) -> np.ndarray:
    """Every image's labels as a multi-hot row [N, classes] (uint8): a multi-label data set's own, else each
    image's one class as its only one."""
    return ds.multi_hot if ds.multi_hot is not None else np.eye(len(ds.classes), dtype=np.uint8)[ds.targets]


def ranked_logits(stacked: torch.Tensor, engine: Engine) -> torch.Tensor:
    """One row of logits per image [b, classes] for a report: one view, the model's own logits (the report's
    loss is then bitcli.metrics' `loss`, at temperature 1, and its predicted class the metrics' own); several
    views (--tta), the log of the scores the metrics rank by (the views' mean at the engine's temperature)."""
    if stacked.ndim == 2:
        return stacked
    if stacked.shape[1] == 1:
        return stacked[:, 0]
    return scores.log_probabilities(stacked.float(), engine.temperature)
