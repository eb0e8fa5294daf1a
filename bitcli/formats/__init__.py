"""Checkpoint formats: one module each (bitcli, hf, timm, npz, onnx), and the one registry that `bit` finds a
format's reader (by what a path holds) and writer (by name) in.

Every reader maps its format's names and axis layout onto bitcli's (`tensors.Layout`) and returns lazy
tensor references, so that a converter streams a checkpoint tensor by tensor; every shape is checked
(`checkpoint.check_tensors`) before a model is built or a file written.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bitcli.errors import BitError
from bitcli.formats import bitcli, hf, npz, onnx, timm
from bitcli.formats.checkpoint import (
    BIT_DEFAULT_PREPROCESS,
    GOOGLE_EVAL_PREPROCESS,
    Checkpoint,
    check_tensors,
    expected_shapes,
    infer_config,
    read_class_names,
)
from bitcli.formats.raw import read_json, read_safetensors, write_safetensors
from bitcli.formats.tensors import Layout, TensorRef

__all__ = [
    "BIT_DEFAULT_PREPROCESS",
    "FORMATS",
    "GOOGLE_EVAL_PREPROCESS",
    "MODEL_FILE_SUFFIXES",
    "Checkpoint",
    "Format",
    "Layout",
    "TensorRef",
    "check_tensors",
    "detect",
    "expected_shapes",
    "infer_config",
    "read",
    "read_class_names",
    "read_json",
    "read_safetensors",
    "write_safetensors",
]  # fmt: skip


@dataclass(frozen=True)
class Format:
    """One checkpoint format: what it reads, how, and how it writes."""

    name: str
    read: Callable[[Path], Checkpoint]
    # (checkpoint, path, dtype) -> None; None for ONNX, which is exported (bitcli.export), not written from tensors
    write: Callable[[Checkpoint, Path, Any], None] | None
    folder: bool  # written as a folder of files (else as one file)
    suffixes: tuple[str, ...] = ()  # the model files it reads, by suffix
    claims: Callable[[dict[str, Any]], bool] | None = None  # the model folders it reads, by their config.json
    fixed_eps_library: str | None = None  # the library that reads this layout standardising with its own eps 1e-8
    # A one-file format: what an existing file is when this writer did not write it (None when it did), from
    # its header; `bit convert --overwrite` replaces only files it wrote. Without it, no file is replaced.
    foreign: Callable[[Path], str | None] | None = None


# A folder is read by the first format that claims its config.json: timm's before transformers', as a timm
# config.json is recognised by its "architecture" alone.
FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format(bitcli.NAME, bitcli.read, bitcli.write, folder=False, suffixes=(".safetensors",), foreign=bitcli.foreign),
        Format(timm.NAME, timm.read, timm.write, folder=True, suffixes=(".bin", ".pth", ".pt"), claims=timm.claims,
               fixed_eps_library="timm"),
        Format(hf.NAME, hf.read, hf.write, folder=True, claims=hf.claims, fixed_eps_library="transformers"),
        Format(npz.NAME, npz.read, npz.write, folder=False, suffixes=(".npz",)),
        Format(onnx.NAME, onnx.read, None, folder=False, suffixes=(".onnx",), foreign=onnx.foreign),
    )
}  # fmt: skip
# Suffixes of model files: a model spec ending in one names a file, never a Hub repo.
MODEL_FILE_SUFFIXES = tuple(s for f in FORMATS.values() for s in f.suffixes)


def detect(path: Path) -> Format:
    """The format that reads `path`: a folder by its config.json, a file by its suffix."""
    if path.is_dir():
        config_path = path / "config.json"
        if not os.path.lexists(config_path):  # (a FIFO or device there: read_json refuses it)
            raise BitError(f"{path}: folder has no config.json; expected a transformers or timm model folder")
        config = read_json(config_path)
        for fmt in FORMATS.values():
            if fmt.claims is not None and fmt.claims(config):
                return fmt
        raise BitError(f"{config_path}: neither a transformers BiT config (model_type 'bit') nor a timm config")
    suffix = path.suffix.lower()
    for fmt in FORMATS.values():
        if suffix in fmt.suffixes:
            return fmt
    raise BitError(
        f"{path}: unknown model file type {suffix!r}; use .safetensors, .npz, .bin/.pth, .onnx or a model folder"
    )


def read(path: Path) -> Checkpoint:
    """The checkpoint at a local path, whatever its format."""
    return detect(path).read(path)
