"""ONNX: a BiT exported by torch's own exporter into one `.onnx` file that carries its labels, preprocessing and
architecture as metadata, and that is proven against the torch model with onnxruntime before it is written.

The graph: input `pixel_values` float32 [batch, 3, H, W] (normalised as `bitcli.preprocess` says), output
`logits` float32 [batch, classes]; batch is dynamic, and so are H and W when the preprocessing gives images of
varying size (no centre crop and no fixed resize). Weight standardisation is folded into constant kernels.

Read back, an `.onnx` file is a Checkpoint whose weights live in the graph (`Checkpoint.graph`): `bit predict`
and `bit eval` run it in onnxruntime (bitcli.onnx_engine); it cannot be converted or fine-tuned further.
onnx and onnxruntime are the optional extra `bitcli[onnx]`, imported only here and in the engine.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bitcli import __version__
from bitcli.config import BitConfig
from bitcli.errors import BitError, one_line
from bitcli.formats.checkpoint import Checkpoint, checked_labels
from bitcli.model import BitModel, StdConv2d, standardize
from bitcli.preprocess import Preprocess
from bitcli.ui import log
from bitcli.writes import atomic_write

NAME = "onnx"
INSTALL = "pip install 'bitcli[onnx]'"
INPUT, OUTPUT = "pixel_values", "logits"
# metadata_props keys; every value is JSON.
LABELS, PREPROCESS, CONFIG = "bitcli.labels", "bitcli.preprocess", "bitcli.config"
SOURCE, VERSION, PRECISION, CHECK = "bitcli.source", "bitcli.version", "bitcli.precision", "bitcli.check"
DEFAULT_OPSET = 18  # the oldest opset torch's dynamo exporter writes natively; onnxruntime >= 1.14 runs it
# Largest |onnxruntime - torch| allowed, relative to the largest |logit| of the check batch. float16 keeps
# 11 significant bits (a relative step of 1e-3 per value), and a deep net accumulates several steps, so 1e-4
# cannot hold for it; 1e-2 still catches a wrong graph (a wrong kernel or padding moves logits by 10-100%).
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2}
PROTOBUF_LIMIT = 2**31 - 2**24  # one .onnx file is one protobuf message: < 2 GiB, minus room for the graph
CHECK_BATCH = 3  # images in the proof batch; the export's example batch has 2, so the proof runs another size


def require() -> tuple[Any, Any]:
    """(onnx, onnxruntime), or one line saying what to install."""
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise BitError(f"ONNX support is not installed; run: {INSTALL}") from None
    return onnx, onnxruntime


# ----------------------------------------------------------------------------------------------------------
# Reading


def read(path: Path) -> Checkpoint:
    """The labels, preprocessing and architecture of a `.onnx` written by `bit convert`; the weights stay in
    the graph, for onnxruntime."""
    onnx, _ = require()
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 -- protobuf's DecodeError, onnx's own errors, OSError alike
        raise BitError(f"{path}: not a valid ONNX file ({one_line(exc)}); it may be truncated or corrupt") from None
    meta = {p.key: p.value for p in proto.metadata_props}
    if CONFIG not in meta:
        raise BitError(
            f"{path}: has no bitcli metadata ({CONFIG}); bit runs only ONNX files written by "
            "`bit convert SRC model.onnx` (a truncated one loses its metadata too)"
        )
    try:
        config = BitConfig.from_dict(json.loads(meta[CONFIG]))
        labels = json.loads(meta[LABELS])
        preprocess = Preprocess.from_dict(json.loads(meta[PREPROCESS]))
    except BitError as exc:
        raise BitError(f"{path}: {exc}") from None
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise BitError(
            f"{path}: bitcli metadata is damaged ({one_line(exc)}); export it again with bit convert"
        ) from None
    inputs, outputs = [i.name for i in proto.graph.input], [o.name for o in proto.graph.output]
    if inputs != [INPUT] or outputs != [OUTPUT]:
        raise BitError(
            f"{path}: graph has inputs {inputs} and outputs {outputs}, not [{INPUT!r}] and [{OUTPUT!r}]; export it again with bit convert"
        )
    if not config.num_classes:
        raise BitError(f"{path}: metadata describes a model without a classification head")
    labels = checked_labels(labels, config.num_classes, str(path))
    return Checkpoint(config, labels, preprocess, {}, str(path), NAME, graph=path)


# ModelProto's field numbers (onnx.proto), and the wire types of protobuf's encoding.
_IR_VERSION, _GRAPH, _METADATA_PROPS = 1, 7, 14
_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5
_MAX_FIELDS = 100_000  # an ONNX model has a few dozen top-level fields; more means it is something else
_MAX_ENTRY = 64 << 20  # a metadata entry read to find its key (bitcli's largest, 21k labels, is under 1 MB)


def foreign(path: Path) -> str | None:
    """None when `path` is an ONNX file that bitcli's export wrote (its metadata_props hold bitcli.config),
    else what it is; `bit convert --overwrite` replaces only the former. The protobuf is read field by field
    at its top level, skipping over the graph: milliseconds for any size, and onnx need not be installed."""
    try:
        with open(path, "rb") as f:
            fields = _top_level_fields(f, path.stat().st_size)
    except OSError as exc:
        return f"a file that cannot be read ({exc.strerror})"
    if fields is None or _IR_VERSION not in fields or _GRAPH not in fields:
        return "not an ONNX file"
    if CONFIG not in fields.get(_METADATA_PROPS, []):
        return "an ONNX file without bitcli's metadata (bitcli.config)"
    return None


def _top_level_fields(f, size: int) -> dict[int, list[str]] | None:
    """{field number: the keys of its metadata entries (for metadata_props), else []} of a ModelProto, or None
    when the bytes are not a protobuf message."""
    fields: dict[int, list[str]] = {}
    for _ in range(_MAX_FIELDS):
        tag = _varint(f)
        if tag is None:
            return fields  # the end of the message, on a field boundary
        number, wire = tag >> 3, tag & 7
        length = {_FIXED64: 8, _FIXED32: 4}.get(wire)
        if wire == _VARINT:
            length = 0 if _varint(f) is not None else -1
        elif wire == _LEN:
            length = _varint(f)
        if number == 0 or length is None or length < 0 or f.tell() + length > size:
            return None
        keys = fields.setdefault(number, [])
        if number == _METADATA_PROPS and wire == _LEN and length <= _MAX_ENTRY:
            keys.append(_entry_key(f.read(length)))
        else:
            f.seek(length, 1)
    return None


def _entry_key(entry: bytes) -> str:
    """The key (field 1) of a StringStringEntryProto; '' when it has none."""
    stream = io.BytesIO(entry)
    tag = _varint(stream)
    if tag != (1 << 3 | _LEN):
        return ""
    length = _varint(stream)
    return stream.read(length or 0).decode("utf-8", "replace")


def _varint(f) -> int | None:
    """A base-128 varint; None at the end of the stream (or inside a varint cut short)."""
    value = shift = 0
    while shift < 70:
        byte = f.read(1)
        if not byte:
            return None
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value
        shift += 7
    return None


# ----------------------------------------------------------------------------------------------------------
# Writing: export, prove, (quantise), write


def write(ckpt: Checkpoint, path: Path, dtype: torch.dtype | None = None, *, opset: int | None = None,
          calibrate: Path | None = None, min_agreement: float = 0.99) -> None:  # fmt: skip
    """Export `ckpt` to `path`: proven with onnxruntime first, and (with `calibrate`) quantised to int8
    on the images of that folder. Nothing is written when a check fails."""
    onnx, _ = require()
    dtype = dtype or torch.float32
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
    if calibrate is not None:  # decoded first: a folder without usable images is refused before the export
        from bitcli.quantize import calibration_images, quantize_int8

        images = calibration_images(calibrate, ckpt.preprocess)
    sizes = input_sizes(ckpt.preprocess)
    proto = export(model, dtype, opset, sizes[0], dynamic_size=len(sizes) > 1)
    check: dict[str, Any] = prove(proto, model, ckpt.preprocess, sizes, dtype)
    log(
        f"checked with onnxruntime: logits within {check['max_rel_diff']:.1e} of the largest logit of the torch model's (allowed {check['tolerance']:g})"
    )
    precision = "float16" if dtype == torch.float16 else "float32"
    if calibrate is not None:
        proto, check = quantize_int8(proto, ckpt.preprocess, images, calibrate, min_agreement)
        precision = "int8"
    values = {
        LABELS: ckpt.labels, PREPROCESS: ckpt.preprocess.to_dict(), CONFIG: ckpt.config.to_dict(),
        SOURCE: ckpt.source, VERSION: __version__, PRECISION: precision, CHECK: check,
    }  # fmt: skip
    del proto.metadata_props[:]
    for key, value in values.items():
        proto.metadata_props.add(key=key, value=json.dumps(value, ensure_ascii=False))
    data = proto.SerializeToString()
    atomic_write(path, lambda f: f.write(data))


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
    import copy

    folded = copy.deepcopy(model)
    with torch.no_grad():
        for conv in folded.modules():
            if isinstance(conv, StdConv2d):
                conv.weight.copy_(standardize(conv.weight, conv.eps))
                conv.__class__ = _FoldedConv2d
    return folded


def export(model: BitModel, dtype: torch.dtype, opset: int, size: tuple[int, int], dynamic_size: bool):
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
    return program.model_proto


@contextlib.contextmanager
def _exporter_quiet() -> Iterator[None]:
    """The exporter's warnings (deprecations, "training mode" hints) are not the user's: bit convert says
    what matters in its own lines."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def check_batch(preprocess: Preprocess, size: tuple[int, int], count: int = CHECK_BATCH) -> np.ndarray:
    """A fixed batch (the same at every export): smooth gradients plus seeded noise as uint8 images, through
    the checkpoint's normalisation, float32 [count, 3, H, W]."""
    h, w = size
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    images = np.stack([(np.stack([xx * 255 // max(w, 1), yy * 255 // max(h, 1), (xx + yy) * 127 // max(h + w, 1)], -1)
                        + rng.integers(-40, 40, (h, w, 3))).clip(0, 255) for _ in range(count)]).astype(np.uint8)  # fmt: skip
    return preprocess.normalize(torch.from_numpy(images)).numpy()


def prove(
    proto, model: BitModel, preprocess: Preprocess, sizes: list[tuple[int, int]], dtype: torch.dtype
) -> dict[str, Any]:
    """Run the exported graph with onnxruntime and the torch model (fp32) on the fixed batch at every size;
    a relative difference above TOLERANCE[dtype] is an error. Returns what was checked, for the metadata."""
    from bitcli.onnx_engine import session

    runner = session(proto.SerializeToString(), torch.device("cpu"), "the exported graph")
    worst = 0.0
    for size in sizes:
        pixels = check_batch(preprocess, size)
        got = runner.run([OUTPUT], {INPUT: pixels})[0]
        with torch.inference_mode():
            want = model(torch.from_numpy(pixels)).numpy()
        worst = max(worst, float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12)))
    tolerance = TOLERANCE[dtype]
    if not worst <= tolerance:  # `not <=`: a NaN fails too
        raise BitError(
            f"the exported graph differs from the torch model by {worst:.2g} of the largest logit (allowed {tolerance:g}) "
            "on the check batch; nothing was written (this is a bug: please report it with the source checkpoint)"
        )
    return {"max_rel_diff": worst, "tolerance": tolerance, "batch": CHECK_BATCH, "sizes": [list(s) for s in sizes],
            "against": "torch float32"}  # fmt: skip


def write_options(opts) -> dict[str, Any]:
    """`bit convert`'s options that this writer takes (bitcli.options.ConvertOptions)."""
    return {"opset": opts.opset, "calibrate": opts.calibrate, "min_agreement": opts.min_agreement}
