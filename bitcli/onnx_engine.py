"""The inference engine for an exported `.onnx` (bitcli.formats.onnx): the same interface as bitcli.engine.Engine
(uint8 batches in, float32 logits out, `num_classes`), with onnxruntime running the graph, so that `bit predict`
and `bit eval` run either without knowing which. Engine.load picks this one for a checkpoint read from `.onnx`.

Pixels are normalised exactly as the torch engine does (Preprocess.normalize, from the file's metadata); the
precision is the file's own (float32, float16 or int8), so --precision does not apply.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from bitcli.errors import BitError, one_line
from bitcli.formats.checkpoint import Checkpoint
from bitcli.formats.onnx import INPUT, OUTPUT, require
from bitcli.ui import log


def pixel_values(normalize: Callable[[torch.Tensor], torch.Tensor], batch_uint8: np.ndarray) -> np.ndarray:
    """uint8 [B, H, W, 3] -> the graph's input: float32 [B, 3, H, W], normalised by the torch engine's own code
    (Preprocess.normalize), contiguous."""
    return np.ascontiguousarray(normalize(torch.from_numpy(batch_uint8)).numpy())


def providers(device: torch.device) -> list[Any]:
    """onnxruntime's execution providers for `device`: CUDA (then CPU) where this onnxruntime has it, else CPU."""
    _, ort = require()
    if device.type == "cuda":
        if "CUDAExecutionProvider" in ort.get_available_providers():
            return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
        log("note: this onnxruntime has no CUDA support (pip install onnxruntime-gpu); the ONNX model runs on the CPU")
    elif device.type != "cpu":
        log(f"note: onnxruntime does not run on {device.type}; the ONNX model runs on the CPU")
    return ["CPUExecutionProvider"]


def session(model: bytes | str, device: torch.device, name: str):
    """An onnxruntime InferenceSession of a serialised graph or a file, with every graph optimisation on;
    one line naming `name` when onnxruntime cannot load it."""
    _, ort = require()
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: its warnings (e.g. unused initialisers) are not the user's
    try:
        return ort.InferenceSession(model, options, providers=providers(device))
    except Exception as exc:  # noqa: BLE001 -- onnxruntime raises its own (Fail, InvalidGraph, ...) and RuntimeError
        raise BitError(
            f"{name}: onnxruntime cannot load it ({one_line(exc)}); it may be truncated or corrupt"
        ) from None


class OnnxEngine:
    """An exported graph in an onnxruntime session; `normalize` turns a uint8 [B, H, W, 3] tensor into its input."""

    def __init__(self, runner, normalize, num_classes: int, source: str) -> None:
        self.runner, self.normalize, self._num_classes, self.source = runner, normalize, num_classes, source

    @classmethod
    def load(cls, ckpt: Checkpoint, device: torch.device) -> OnnxEngine:
        return cls(
            session(str(ckpt.graph), device, ckpt.source),
            ckpt.preprocess.normalize,
            ckpt.config.num_classes,
            ckpt.source,
        )

    @property
    def num_classes(self) -> int:
        return self._num_classes

    def logits(self, batch_uint8: np.ndarray) -> torch.Tensor:
        """float32 logits [B, classes], on the CPU."""
        try:
            out = self.runner.run([OUTPUT], {INPUT: pixel_values(self.normalize, batch_uint8)})[0]
        except Exception as exc:  # noqa: BLE001 -- a graph that loads but fails to run (wrong sizes for its shapes)
            raise BitError(
                f"{self.source}: onnxruntime failed on a batch of {batch_uint8.shape[1]}x{batch_uint8.shape[2]} images ({one_line(exc)})"
            ) from None
        return torch.from_numpy(np.asarray(out, dtype=np.float32))

    def features(self, batch_uint8: np.ndarray) -> torch.Tensor:
        raise BitError(
            f"{self.source}: an ONNX export gives logits only; use the checkpoint it was exported from for features"
        )
