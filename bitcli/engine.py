"""The engine: what every command runs a model through, whichever runtime holds it. uint8 image batches in
(decoded and resized by the engine's `preprocess`), float32 logits or features out.

Two engines implement the Protocol: bitcli.torch_engine.TorchEngine (a BiT model in torch) and
bitcli.onnx_engine.OnnxEngine (an exported `.onnx` in onnxruntime); `load_engine` picks one for a checkpoint.
Commands and the pipeline know only this interface. What a model gives beyond logits and features is added
here first, then in both engines: later capabilities (Grad-CAM's activations of the final norm, temperature
scaling, multi-label sigmoid scores, test-time flips) belong in this Protocol, not in a command.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from bitcli import scores
from bitcli.formats.checkpoint import Checkpoint
from bitcli.onnx_engine import OnnxEngine
from bitcli.preprocess import Preprocess
from bitcli.torch_engine import TorchEngine


class Engine(Protocol):
    """A model ready to run on uint8 [B, H, W, 3] batches that `preprocess` decoded (bitcli.pipeline)."""

    source: str  # the checkpoint it came from, for messages
    device: torch.device  # where its outputs are
    preprocess: Preprocess  # how images are decoded and normalised for it
    labels: Sequence[str]  # class names, by logit index (empty for a features-only model)
    temperature: float  # scores are softmax(logits / temperature) (bitcli.scores); 1 for an uncalibrated model
    thresholds: list[float] | None  # a multi-label model's (sigmoid scores, bitcli.multilabel); None: single-label

    @property
    def num_classes(self) -> int: ...

    def logits(self, batch_uint8: np.ndarray) -> torch.Tensor:
        """float32 [B, classes]."""
        ...

    def features(self, batch_uint8: np.ndarray) -> torch.Tensor:
        """float32 pre-logits [B, D] (the final norm and ReLU, then global average pooling)."""
        ...

    def gradcam(self, batch_uint8: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """Grad-CAM maps of the final norm + ReLU (what the head pools), float32 in [0, 1] at the input's size:
        [B, H, W] for targets [B] (a class index per image), [B, T, H, W] for targets [B, T]. The ONNX engine
        raises a BitError (onnx_engine.NO_GRADCAM)."""
        ...


def load_engine(ckpt: Checkpoint, device: torch.device, dtype: torch.dtype, need_head: bool = True) -> Engine:
    """The checkpoint's model on `device`, for inference: onnxruntime for a checkpoint read from an exported
    `.onnx` (at the file's own precision: `dtype` does not apply), else torch at `dtype`. need_head: refuse a
    features-only checkpoint."""
    if ckpt.graph is not None:
        return OnnxEngine.load(ckpt, device)
    return TorchEngine.load(ckpt, device, dtype, need_head)


def view_logits(engine: Engine, batch_uint8: np.ndarray, tta: str | None = None) -> torch.Tensor:
    """The engine's logits of every view of the batch (bitcli.scores.views: the batch, and with --tta flip its
    mirror image), float32 [B, views, classes]. Each view is its own call, at the batch's size."""
    return scores.stack_views([engine.logits(view) for view in scores.views(batch_uint8, tta)])


def view_features(engine: Engine, batch_uint8: np.ndarray, tta: str | None = None) -> torch.Tensor:
    """The engine's features, float32 [B, D]; with test-time augmentation the mean of the views' features.
    (The temperature scales scores, not features: it does not apply here.)"""
    batches = scores.views(batch_uint8, tta)
    if len(batches) == 1:
        return engine.features(batch_uint8)
    return torch.stack([engine.features(view).float() for view in batches]).mean(dim=0)


def top_k(logits: torch.Tensor, labels: Sequence[str], k: int, *, temperature: float = 1.0,
          multi_label: bool = False) -> list[list[dict]]:  # fmt: skip
    """Per row of logits [B, classes] (or views [B, V, classes]), the k classes of highest score
    (bitcli.scores.probabilities at `temperature`; sigmoids for a multi-label model), best first:
    {"label", "index", "score"}."""
    probs = scores.probabilities(logits, temperature, multi_label=multi_label)
    values, indices = probs.topk(min(k, probs.shape[-1]), dim=-1)
    return [
        [{"label": labels[i], "index": i, "score": round(s, 6)} for s, i in zip(row_s, row_i)]
        for row_s, row_i in zip(values.cpu().tolist(), indices.cpu().tolist())
    ]


def over_thresholds(logits: torch.Tensor, engine: Engine) -> list[list[dict]]:
    """A multi-label model's labels per row: every class whose sigmoid score reaches its threshold, best first,
    {"label", "index", "score"} (the score rounded as top_k rounds it; the comparison is on the exact score)."""
    assert engine.thresholds is not None
    probs = scores.probabilities(logits, multi_label=True)
    over = probs >= torch.tensor(engine.thresholds, dtype=probs.dtype)
    rows = []
    for row_p, row_o in zip(probs.cpu().tolist(), over.cpu().tolist()):
        picked = sorted((i for i, o in enumerate(row_o) if o), key=lambda i: -row_p[i])
        rows.append([{"label": engine.labels[i], "index": i, "score": round(row_p[i], 6)} for i in picked])
    return rows
