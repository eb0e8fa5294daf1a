"""ONNX files: one `.onnx` that carries a BiT's graph and, as metadata, its labels, preprocessing and
architecture. This module reads and writes the file and its metadata; making the graph (torch's exporter, the
onnxruntime proof, int8 quantisation) is bitcli.export's, a layer above.

The graph: input `pixel_values` float32 [batch, 3, H, W] (normalised as `bitcli.preprocess` says), output
`logits` float32 [batch, classes]; batch is dynamic, and so are H and W when the preprocessing gives images of
varying size (no centre crop and no fixed resize). Weight standardisation is folded into constant kernels.

Read back, an `.onnx` file is a Checkpoint whose weights live in the graph (`Checkpoint.graph`): `bit predict`
and `bit eval` run it in onnxruntime (bitcli.onnx_engine); it cannot be converted or fine-tuned further.
onnx, onnxruntime and onnxscript are the optional extra `bitcli[onnx]` (bitcli.extras); reading a file needs
onnx only, running it onnxruntime too, and only an export needs onnxscript.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from bitcli import __version__, extras
from bitcli.config import BitConfig
from bitcli.errors import BitError, one_line
from bitcli.formats.checkpoint import Checkpoint, checked_labels, stored_temperature, stored_thresholds
from bitcli.preprocess import Preprocess
from bitcli.reads import file_size
from bitcli.writes import atomic_write

NAME = "onnx"
INPUT, OUTPUT = "pixel_values", "logits"
# metadata_props keys; every value is JSON.
LABELS, PREPROCESS, CONFIG = "bitcli.labels", "bitcli.preprocess", "bitcli.config"
SOURCE, VERSION, PRECISION, CHECK = "bitcli.source", "bitcli.version", "bitcli.precision", "bitcli.check"
# A calibrated model's temperature (absent: 1). The graph's output stays the model's logits, as the torch model
# gives them (the export is proven against it); bitcli's ONNX engine divides them by it, as the torch engine
# does, and another runtime must do so itself for calibrated scores.
TEMPERATURE = "bitcli.temperature"
THRESHOLDS = "bitcli.thresholds"  # a multi-label model's (absent: single-label); the graph still gives logits


# ----------------------------------------------------------------------------------------------------------
# Reading


def read(path: Path) -> Checkpoint:
    """The labels, preprocessing and architecture of a `.onnx` written by `bit convert`; the weights stay in
    the graph, for onnxruntime."""
    file_size(path)
    extras.require("onnx", "Reading an .onnx file", modules=("onnx",))  # reading needs no exporter (onnxscript)
    import onnx

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
        stored = json.loads(meta[TEMPERATURE]) if TEMPERATURE in meta else None
        stored_cuts = json.loads(meta[THRESHOLDS]) if THRESHOLDS in meta else None
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
    temperature = stored_temperature(stored, path)
    thresholds = stored_thresholds(stored_cuts, config.num_classes, path)
    return Checkpoint(
        config=config,
        labels=labels,
        preprocess=preprocess,
        tensors={},
        source=str(path),
        format=NAME,
        graph=path,
        temperature=temperature,
        thresholds=thresholds,
    )


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
# Writing


def save(proto, path: Path, ckpt: Checkpoint, precision: str, *, check: dict[str, Any]) -> None:
    """Write `proto` (the graph bitcli.export made and proved) to `path` with the metadata that `read` needs:
    `ckpt`'s labels, preprocessing and architecture, and `check`, what the proof measured."""
    values = {
        LABELS: ckpt.labels, PREPROCESS: ckpt.preprocess.to_dict(), CONFIG: ckpt.config.to_dict(),
        SOURCE: ckpt.source, VERSION: __version__, PRECISION: precision, CHECK: check,
        **({TEMPERATURE: ckpt.temperature} if ckpt.temperature != 1.0 else {}),
        **({THRESHOLDS: ckpt.thresholds} if ckpt.thresholds is not None else {}),
    }  # fmt: skip
    del proto.metadata_props[:]
    for key, value in values.items():
        proto.metadata_props.add(key=key, value=json.dumps(value, ensure_ascii=False))
    data = proto.SerializeToString()
    atomic_write(path, lambda f: f.write(data))
