"""Accuracy of a model on a labelled data set: `bit eval` and fine-tuning's validation run the engine over the
data set through the one pipeline (bitcli.pipeline) and accumulate the metrics (bitcli.metrics), so evaluating a
folder costs what classifying its images with `bit predict` costs, and gives the same logits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import numpy as np
import torch

from bitcli import pipeline
from bitcli.distributed import Dist
from bitcli.engine import Engine
from bitcli.errors import BitError
from bitcli.gpu_decode import DeviceDecoder, example_bytes
from bitcli.metrics import Accumulator, EvalResult
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
    keep: Callable[[np.ndarray, torch.Tensor], None] | None = None,
    on_device: DeviceDecoder[int] | None = None,
) -> EvalResult | None:
    """Accuracy of the engine's model on `ds`; `decode(i)` gives image i as uint8 HWC. class_to_model[c] is
    the model's label index of data-set class c. Accuracy is over a whole pass, so an image that does not decode
    stops it, with a message naming the file.

    The main process accumulates every stack of images exactly as the engine computed it, in batch order: the
    same updates with the same values whatever the number of processes, so the same result, bit for bit. The
    other processes return None. `keep(indices, logits)`, when given, is called on the main process with every
    stack's data-set indices and logits as they were accumulated (a report's per-image results). on_device: decode
    on the engine's GPU (bitcli.gpu_decode.for_engine)."""
    acc = Accumulator(ds.classes, class_to_model, engine.num_classes)
    targets = np.asarray(ds.targets, dtype=np.int64)

    def logits(batch: np.ndarray) -> list[np.ndarray]:
        return list(engine.logits(batch).cpu().numpy())  # numpy rows: only its own row travels to rank 0

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
                if keep is not None:
                    keep(np.asarray([o.ref for o in outcomes], dtype=np.int64), stacked)
    return acc.result() if info.main else None
