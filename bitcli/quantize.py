"""`bit convert SRC DST.onnx --quantize int8 --calibrate DIR`: static int8 quantisation of a proven float32
export with onnxruntime's quantisation tools, calibrated on DIR's images through the checkpoint's own
preprocessing, and accepted only when its top-1 agrees with float32's on enough of those images.

Format: QDQ (QuantizeLinear/DequantizeLinear pairs, the one onnxruntime recommends and every runtime reads),
activations uint8 and weights int8 per output channel (what x86 CPUs' u8 x s8 VNNI instructions multiply),
MinMax calibration (the ranges the calibration images reach).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bitcli import pipeline
from bitcli.errors import BitError
from bitcli.formats.onnx import INPUT
from bitcli.images import list_images, stack_by_size
from bitcli.inputs import path_decoder
from bitcli.onnx_engine import OnnxEngine, pixel_values
from bitcli.options import DEFAULT_WORKERS
from bitcli.preprocess import Preprocess
from bitcli.ui import display, log, progress_bar, quiet_logger

# The convolutions and the head: nearly all of the arithmetic. GroupNorm (InstanceNormalization in the graph)
# stays float: it is cheap, sensitive to rounding, and its constant scale and bias are one tensor shared by
# every layer, which onnxruntime's quantiser refuses ("shared mode is not supported for weight").
QUANTIZED_OPS = ["Conv", "Gemm"]
BATCH = 16  # images per decoding chunk and per onnxruntime call while measuring agreement


def quantize_int8(
    proto, preprocess: Preprocess, images: list[np.ndarray], folder: Path, *, min_agreement: float
) -> tuple[Any, dict[str, Any]]:
    """(the int8 ModelProto, what was checked): calibrated on `images` (calibration_images of `folder`), and
    refused when its top-1 agrees with `proto`'s on fewer than `min_agreement` of them."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )  # fmt: skip

    class Feed(CalibrationDataReader):  # onnxruntime pulls one input at a time until None
        def __init__(self) -> None:
            self.pending = iter(images)

        def get_next(self) -> dict[str, np.ndarray] | None:
            image = next(self.pending, None)
            return (
                None if image is None else {INPUT: pixel_values(preprocess.normalize, image[None].copy())}
            )  # writable for torch

    log(f"calibrating int8 on {len(images)} images from {display(folder)}")
    # Through files: quantize_static moves the initialisers of a ModelProto it is given out to external data.
    with tempfile.TemporaryDirectory(prefix="bitcli-int8-") as tmp, quiet_logger(None):
        fp32, prepared, out = (Path(tmp) / name for name in ("fp32.onnx", "prepared.onnx", "int8.onnx"))
        onnx.save(proto, str(fp32))
        quant_pre_process(str(fp32), str(prepared))  # shape inference and graph fusions, as onnxruntime advises
        quantize_static(
            prepared, out, Feed(), quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=QUANTIZED_OPS,
        )  # fmt: skip
        int8 = onnx.load(str(out))
    agreed = top1_agreement(proto, int8, images, preprocess)
    share = agreed / len(images)
    log(f"int8 top-1 agrees with float32 on {agreed} of {len(images)} calibration images ({share:.1%})")
    if share < min_agreement:
        raise BitError(
            f"int8 top-1 agrees with float32 on {share:.1%} of the calibration images, below --min-agreement "
            f"{min_agreement:g}; nothing was written (calibrate on more images like the ones you will serve, or keep float32)"
        )
    return int8, {
        "top1_agreement": share,
        "images": len(images),
        "min_agreement": min_agreement,
        "against": "onnx float32",
    }


def calibration_images(folder: Path, preprocess: Preprocess) -> list[np.ndarray]:
    """Every image in `folder` (any depth), decoded and resized as the checkpoint says (uint8 HWC); one that
    does not decode is named on stderr and left out."""
    if not folder.is_dir():
        raise BitError(
            f"--calibrate {display(folder)}: not a folder; give a folder of images like the ones you will serve"
        )
    paths = list_images(folder, recursive=True)
    images = []
    with progress_bar("decoding calibration images", total=len(paths), unit="img") as advance:
        batches = pipeline.run(paths, path_decoder(preprocess), None, batch_size=BATCH, workers=DEFAULT_WORKERS,
                               advance=advance)  # fmt: skip
        for outcome in (o for batch in batches for o in batch):
            if outcome.error is not None:
                log(f"skipped: {outcome.error}")
            else:
                images.append(outcome.value)
    if not images:
        raise BitError(f"--calibrate {display(folder)}: holds no image that decodes; int8 needs images to calibrate on")
    return images


def top1_agreement(fp32, int8, images: list[np.ndarray], preprocess: Preprocess) -> int:
    """How many images the two graphs give the same top-1 class (the ONNX engine on the CPU, batches by size)."""
    engines = [OnnxEngine.of_graph(proto, preprocess, name) for proto, name in ((fp32, "the float32 graph"), (int8, "the int8 graph"))]  # fmt: skip
    agreed = 0
    for _, batch in stack_by_size(enumerate(images)):
        for start in range(0, len(batch), BATCH):
            a, b = (engine.logits(batch[start : start + BATCH]).argmax(-1) for engine in engines)
            agreed += int((a == b).sum())
    return agreed
