"""`bit convert SRC DST.onnx`: export a BiT to ONNX with torch's own exporter, prove the graph against the torch
model in the ONNX engine (bitcli.onnx_engine) before anything is written, optionally quantise it to int8
(bitcli.quantize), and save it with its metadata (bitcli.formats.onnx). Nothing is written when a check fails.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bitcli import extras
from bitcli.errors import BitError
from bitcli.formats import onnx as onnx_file
from bitcli.formats.checkpoint import Checkpoint
from bitcli.formats.onnx import INPUT, OUTPUT
from bitcli.model import BitModel, StdConv2d, standardize
from bitcli.onnx_engine import OnnxEngine
from bitcli.preprocess import Preprocess
from bitcli.quantize import calibration_images, quantize_int8
from bitcli.ui import log

DEFAULT_OPSET = 18  # the oldest opset torch's dynamo exporter writes natively; onnxruntime >= 1.14 runs it
# Largest |onnxruntime - torch| allowed, relative to the largest |logit| of the check batch. float16 keeps
# 11 significant bits (a relative step of 1e-3 per value), and a deep net accumulates several steps, so 1e-4
# cannot hold for it; 1e-2 still catches a wrong graph (a wrong kernel or padding moves logits by 10-100%).
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2}
PROTOBUF_LIMIT = 2**31 - 2**24  # one .onnx file is one protobuf message: < 2 GiB, minus room for the graph
CHECK_BATCH = 3  # images in the proof batch; the export's example batch has 2, so the proof runs another size


def write_onnx(ckpt: Checkpoint, path: Path, dtype: torch.dtype, *, opset: int | None = None,
               calibrate: Path | None = None, min_agreement: float = 0.99) -> None:  # fmt: skip
    """Export `ckpt` to `path`: proven with onnxruntime first, and (with `calibrate`) quantised to int8
    on the images of that folder. Nothing is written when a check fails."""
    extras.require("onnx", "An ONNX export")
    import onnx

    if dtype not in TOLERANCE:
        raise BitError(f"ONNX export supports --dtype float32 and float16, not {str(dtype).removeprefix('torch.')}")
    opset = opset or DEFAULT_OPSET
    if opset > onnx.defs.onnx_opset_version():
        raise BitError(f"--opset {opset}: this onnx package writes opsets up to {onnx.defs.onnx_opset_version()}")
    model = ckpt.build_model()
    if not model.has_head:
        raise BitError(f"{ckpt.source}: checkpoint has no classification head; an ONNX export gives logits")
    size = sum(p.numel() for p in model.parameters()) * torch.finfo(dtype).bits // 8
    if size > PROTOBUF_LIMIT:
        hint = "; export with --dtype float16" if dtype == torch.float32 and size // 2 < PROTOBUF_LIMIT else ""
        raise BitError(f"{ckpt.source}: {size / 2**30:.1f} GiB of weights do not fit in one .onnx file (2 GiB){hint}")
    # Decoded first: a folder without usable images is refused before the export.
    images = calibration_images(calibrate, ckpt.preprocess) if calibrate is not None else []
    sizes = input_sizes(ckpt.preprocess)
    proto = export(model, dtype, opset, sizes[0], dynamic_size=len(sizes) > 1)
    check: dict[str, Any] = prove(proto, model, ckpt.preprocess, sizes=sizes, dtype=dtype)
    log(
        f"checked with onnxruntime: logits within {check['max_rel_diff']:.1e} of the largest logit of the torch model's (allowed {check['tolerance']:g})"
    )
    precision = "float16" if dtype == torch.float16 else "float32"
    if calibrate is not None:
        proto, check = quantize_int8(proto, ckpt.preprocess, images, folder=calibrate, min_agreement=min_agreement)
        precision = "int8"
    onnx_file.save(proto, path, ckpt, precision=precision, check=check)


def input_sizes(preprocess: Preprocess) -> list[tuple[int, int]]:
    """(H, W) of the images the preprocessing gives: one when it fixes the size (a centre crop, or a resize to
    an exact size), else two to prove the graph on, a square and a landscape one."""
    fixed = preprocess.crop or (preprocess.resize if isinstance(preprocess.resize, tuple) else None)
    if fixed is not None:
        return [(int(fixed[0]), int(fixed[1]))]
    short = preprocess.resize if isinstance(preprocess.resize, int) else 224
    return [(short, short), (short, short * 4 // 3 + 1)]


class _FoldedConv2d(StdConv2d):
    """A StdConv2d whose weight already is the standardised kernel: the exported graph holds that kernel as a
    constant and convolves with it directly (no per-call standardisation). Padding is StdConv2d's own."""

    def standardized_weight(self) -> torch.Tensor:
        return self.weight


class _Exported(torch.nn.Module):
    """The exported function: float32 pixels in, float32 logits out, whatever precision runs inside, so every
    export has the same interface."""

    def __init__(self, model: BitModel, dtype: torch.dtype) -> None:
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values.to(self.dtype)).float()


def fold_standardization(model: BitModel) -> BitModel:
    """A copy of `model` whose convolutions use their standardised kernels as plain weights (the same
    `standardize` the torch engine caches, so the kernels are bit-identical to the ones it runs)."""
    folded = copy.deepcopy(model)
    with torch.no_grad():
        for conv in folded.modules():
            if isinstance(conv, StdConv2d):
                conv.weight.copy_(standardize(conv.weight, conv.eps))
                conv.__class__ = _FoldedConv2d
    return folded


def export(model: BitModel, dtype: torch.dtype, opset: int, size: tuple[int, int], *, dynamic_size: bool):
    """The ModelProto of `model` (fp32, eval mode) at `dtype`, exported with torch.onnx.export.

    dynamo=True (torch.export, then onnxscript) rather than the TorchScript tracer: the tracer records the
    TF "SAME" padding of strided convolutions (google/bit-50's) as constants computed from the example size,
    so a graph with a dynamic H and W gives wrong logits at any other size (measured: 21% of the largest
    logit off at 67x99), while torch.export keeps that arithmetic symbolic. The tracer is faster (0.2 s
    against 3-10 s for an R50), but the TorchScript exporter is deprecated and the proof runs after either."""
    wrapped = _Exported(fold_standardization(model).to(dtype), dtype).eval()
    example = torch.zeros(2, 3, *size)
    dims = {0: torch.export.Dim("batch", min=1)}
    if dynamic_size:
        dims.update({2: torch.export.Dim("height", min=1), 3: torch.export.Dim("width", min=1)})
    with _exporter_quiet():
        program = torch.onnx.export(
            wrapped, (example,), dynamo=True, input_names=[INPUT], output_names=[OUTPUT], opset_version=opset,
            dynamic_shapes={INPUT: dims}, optimize=True, verbose=False,
        )  # fmt: skip
    assert program is not None  # dynamo=True always returns the program
    return program.model_proto


@contextlib.contextmanager
def _exporter_quiet() -> Iterator[None]:
    """The exporter's warnings (deprecations, "training mode" hints) are not the user's: bit convert says
    what matters in its own lines."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def check_batch(size: tuple[int, int], count: int = CHECK_BATCH) -> np.ndarray:
    """A fixed batch (the same at every export): smooth gradients plus seeded noise, uint8 [count, H, W, 3]."""
    h, w = size
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([(np.stack([xx * 255 // max(w, 1), yy * 255 // max(h, 1), (xx + yy) * 127 // max(h + w, 1)], -1)
                     + rng.integers(-40, 40, (h, w, 3))).clip(0, 255) for _ in range(count)]).astype(np.uint8)  # fmt: skip


def prove(
    proto, model: BitModel, preprocess: Preprocess, sizes: list[tuple[int, int]], *, dtype: torch.dtype
) -> dict[str, Any]:
    """Run the exported graph in the ONNX engine and the torch model (fp32) on the fixed batch at every size,
    both normalised by `preprocess`; a relative difference above TOLERANCE[dtype] is an error. Returns what was
    checked, for the metadata."""
    engine = OnnxEngine.of_graph(proto, preprocess, "the exported graph")
    worst = 0.0
    for size in sizes:
        images = check_batch(size)
        got = engine.logits(images).numpy()
        with torch.inference_mode():
            want = model(preprocess.normalize(torch.from_numpy(images))).numpy()
        worst = max(worst, float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12)))
    tolerance = TOLERANCE[dtype]
    if not worst <= tolerance:  # `not <=`: a NaN fails too
        raise BitError(
            f"the exported graph differs from the torch model by {worst:.2g} of the largest logit (allowed {tolerance:g}) "
            "on the check batch; nothing was written (this is a bug: please report it with the source checkpoint)"
        )
    return {"max_rel_diff": worst, "tolerance": tolerance, "batch": CHECK_BATCH, "sizes": [list(s) for s in sizes],
            "against": "torch float32"}  # fmt: skip
