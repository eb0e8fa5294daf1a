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


def top_k(logits: torch.Tensor, labels: Sequence[str], k: int) -> list[list[dict]]:
    """Per row of logits, the k most probable classes, best first: {"label", "index", "score"}."""
    probs = torch.softmax(logits, dim=-1)
    scores, indices = probs.topk(min(k, probs.shape[-1]), dim=-1)
    return [
        [{"label": labels[i], "index": i, "score": round(s, 6)} for s, i in zip(row_s, row_i)]
        for row_s, row_i in zip(scores.cpu().tolist(), indices.cpu().tolist())
    ]
