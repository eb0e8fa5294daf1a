"""The onnxruntime engine (bitcli.engine.Engine) for an exported `.onnx` (bitcli.formats.onnx): uint8 batches in,
float32 logits out, with onnxruntime running the graph, so that `bit predict` and `bit eval` run either engine
without knowing which. bitcli.engine.load_engine picks this one for a checkpoint read from `.onnx`; the export's
proof and the int8 agreement check (bitcli.export, bitcli.quantize) run their graphs through it too, and every
onnxruntime session bitcli makes is made by `session` here.

Pixels are normalised exactly as the torch engine does (Preprocess.normalize, from the file's metadata); the
precision is the file's own (float32, float16 or int8), so --precision does not apply.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from bitcli import extras
from bitcli.errors import BitError, one_line
from bitcli.formats.checkpoint import Checkpoint
from bitcli.formats.onnx import INPUT, OUTPUT
from bitcli.preprocess import Preprocess
from bitcli.ui import log

CPU = torch.device("cpu")
# Why an ONNX model gets no Grad-CAM (the exported graph ends in logits: no gradient of the final activations).
NO_GRADCAM = "Grad-CAM needs the torch checkpoint the ONNX file was exported from (the export gives logits only)"


def pixel_values(normalize: Callable[[torch.Tensor], torch.Tensor], batch_uint8: np.ndarray) -> np.ndarray:
    """uint8 [B, H, W, 3] -> the graph's input: float32 [B, 3, H, W], normalised by the torch engine's own code
    (Preprocess.normalize), contiguous."""
    return np.ascontiguousarray(normalize(torch.from_numpy(batch_uint8)).numpy())


def providers(device: torch.device) -> list[Any]:
    """onnxruntime's execution providers for `device`: CUDA (then CPU) where this onnxruntime has it, else CPU."""
    import onnxruntime as ort

    if device.type == "cuda":
        if "CUDAExecutionProvider" in ort.get_available_providers():
            return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
        log("note: this onnxruntime has no CUDA support (pip install onnxruntime-gpu); the ONNX model runs on the CPU")
    elif device.type != "cpu":
        log(f"note: onnxruntime does not run on {device.type}; the ONNX model runs on the CPU")
    return ["CPUExecutionProvider"]


def session(model: bytes | str, device: torch.device, name: str):
    """An onnxruntime InferenceSession of a serialised graph or a file, with every graph optimisation on;
    one line naming `name` when onnxruntime cannot load it. The only place bitcli makes one."""
    extras.require("onnx", "Running an .onnx model", modules=("onnxruntime",))  # running needs no exporter (onnxscript)
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: its warnings (e.g. unused initialisers) are not the user's
    asked = providers(device)
    try:
        made = ort.InferenceSession(model, options, providers=asked)
    except Exception as exc:  # noqa: BLE001 -- onnxruntime raises its own (Fail, InvalidGraph, ...) and RuntimeError
        raise BitError(
            f"{name}: onnxruntime cannot load it ({one_line(exc)}); it may be truncated or corrupt"
        ) from None
    if asked[0] != "CPUExecutionProvider" and made.get_providers()[0] != "CUDAExecutionProvider":
        _fell_back_to_cpu()
    return made


@functools.cache
def _fell_back_to_cpu() -> None:
    """Once per process: onnxruntime has a CUDA provider but did not start it (its CUDA or cuDNN libraries did
    not load) and runs the graph on the CPU instead, saying so only in its own log."""
    log("warning: onnxruntime could not start its CUDA provider (are its CUDA and cuDNN libraries installed?); "
        "the ONNX model runs on the CPU")  # fmt: skip


class OnnxEngine:
    """An exported graph in an onnxruntime session; `preprocess` decodes images for it and normalises a uint8
    [B, H, W, 3] batch into its input. Its logits come back on the CPU (`device`), whichever provider ran it."""

    device = CPU

    def __init__(self, runner, preprocess: Preprocess, num_classes: int, *, labels: Sequence[str], source: str,
                 temperature: float = 1.0, thresholds: list[float] | None = None) -> None:  # fmt: skip
        self.runner, self.preprocess, self._num_classes = runner, preprocess, num_classes
        # Applied to the scores as the torch engine's is (bitcli.scores): the graph's output stays the logits.
        self.labels, self.source, self.temperature = labels, source, temperature
        self.thresholds = thresholds

    @classmethod
    def load(cls, ckpt: Checkpoint, device: torch.device) -> OnnxEngine:
        runner = session(str(ckpt.graph), device, ckpt.source)
        return cls(runner, ckpt.preprocess, ckpt.config.num_classes, labels=ckpt.labels, source=ckpt.source,
                   temperature=ckpt.temperature, thresholds=ckpt.thresholds)  # fmt: skip

    @classmethod
    def of_graph(cls, proto, preprocess: Preprocess, name: str) -> OnnxEngine:
        """A ModelProto in memory (an export being proven or quantised), on the CPU; `name` names it in messages."""
        return cls(session(proto.SerializeToString(), CPU, name), preprocess, 0, labels=(), source=name)

    @property
    def num_classes(self) -> int:
        return self._num_classes

    def logits(self, batch_uint8: np.ndarray) -> torch.Tensor:
        """float32 logits [B, classes], on the CPU."""
        try:
            out = self.runner.run([OUTPUT], {INPUT: pixel_values(self.preprocess.normalize, batch_uint8)})[0]
        except Exception as exc:  # noqa: BLE001 -- a graph that loads but fails to run (wrong sizes for its shapes)
            raise BitError(
                f"{self.source}: onnxruntime failed on a batch of {batch_uint8.shape[1]}x{batch_uint8.shape[2]} images ({one_line(exc)})"
            ) from None
        return torch.from_numpy(np.asarray(out, dtype=np.float32))

    def features(self, batch_uint8: np.ndarray) -> torch.Tensor:
        raise BitError(
            f"{self.source}: an ONNX export gives logits only; use the checkpoint it was exported from for features"
        )

    def gradcam(self, batch_uint8: np.ndarray, targets: np.ndarray) -> np.ndarray:
        raise BitError(f"{self.source}: {NO_GRADCAM}")
