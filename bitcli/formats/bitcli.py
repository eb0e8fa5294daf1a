"""bitcli's own format: one .safetensors file whose metadata holds the config, labels and preprocessing."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from bitcli import __version__
from bitcli.config import BitConfig
from bitcli.errors import BitError, one_line
from bitcli.formats import timm
from bitcli.formats.checkpoint import (
    TEMPERATURE_KEY,
    THRESHOLDS_KEY,
    Checkpoint,
    check_tensors,
    checked_labels,
    stored_temperature,
    stored_thresholds,
    temperature_record,
    thresholds_record,
)
from bitcli.formats.raw import read_safetensors, write_safetensors
from bitcli.preprocess import Preprocess

NAME = "bitcli"
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit (MAX_HEADER_SIZE)


def read(path: Path) -> Checkpoint:
    """A bitcli file; a .safetensors file without bitcli's metadata is read as timm weights (their names)."""
    refs, meta = read_safetensors(path)
    if meta.get("format") != NAME:
        return timm.read_weights(path, refs)
    try:
        config = BitConfig.from_dict(json.loads(meta["config"]))
        labels = json.loads(meta["labels"])
        preprocess = Preprocess.from_dict(json.loads(meta["preprocess"]))
        stored = json.loads(meta[TEMPERATURE_KEY]) if TEMPERATURE_KEY in meta else None
        stored_cuts = json.loads(meta[THRESHOLDS_KEY]) if THRESHOLDS_KEY in meta else None
    except BitError as exc:
        raise BitError(f"{path}: {exc}") from None
    except (KeyError, ValueError, TypeError) as exc:
        raise BitError(f"{path}: bitcli metadata is damaged ({one_line(exc)}); convert the source again") from None
    check_tensors(config, refs, str(path))
    labels = checked_labels(labels, config.num_classes, str(path))
    temperature = stored_temperature(stored, path)
    thresholds = stored_thresholds(stored_cuts, config.num_classes, path)
    return Checkpoint(config=config, labels=labels, preprocess=preprocess, tensors=refs, source=str(path), format=NAME,
                      temperature=temperature, thresholds=thresholds)  # fmt: skip


def write(ckpt: Checkpoint, path: Path, dtype: torch.dtype | None = None) -> None:
    meta = {
        "format": NAME,
        "bitcli_version": __version__,
        "config": json.dumps(ckpt.config.to_dict()),
        "labels": json.dumps(ckpt.labels),
        "preprocess": json.dumps(ckpt.preprocess.to_dict()),
        **{k: json.dumps(v) for k, v in (temperature_record(ckpt) | thresholds_record(ckpt)).items()},
    }
    write_safetensors(path, ckpt.tensors, meta, dtype)


def foreign(path: Path) -> str | None:
    """None when `path` is a file this writer wrote (its header's metadata says format bitcli), else what it
    is; `bit convert --overwrite` replaces only the former. Only the header is read."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            size = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            header = json.loads(f.read(size)) if 2 <= size <= MAX_HEADER_BYTES else None
    except OSError as exc:
        return f"a file that cannot be read ({exc.strerror})"
    except ValueError:  # not JSON, or not UTF-8
        header = None
    if not isinstance(header, dict):
        return "not a safetensors file"
    metadata = header.get("__metadata__")
    if isinstance(metadata, dict) and metadata.get("format") == NAME:
        return None
    return "a safetensors file without bitcli's metadata"
