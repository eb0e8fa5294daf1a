"""`bit convert`: any supported checkpoint in, bitcli / transformers / timm out, streamed tensor by tensor."""

from __future__ import annotations

from pathlib import Path

import torch

from bitcli.checkpoints import write_bitcli, write_hf, write_timm
from bitcli.errors import BitError, UsageError
from bitcli.hub import load_checkpoint
from bitcli.ui import log
from bitcli.writes import MODEL_FILES_SHOWN, model_files_in

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
WRITERS = {"bitcli": write_bitcli, "hf": write_hf, "timm": write_timm}


def run(
    src: str, dst: Path, fmt: str | None, labels: Path | None, dtype: str, revision: str | None, overwrite: bool
) -> None:
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r}: use float32, float16 or bfloat16")
    fmt = fmt or ("bitcli" if dst.suffix.lower() == ".safetensors" else "hf")
    if fmt not in WRITERS:
        raise UsageError(f"--format {fmt!r}: use bitcli, hf or timm")
    if fmt == "bitcli" and dst.suffix.lower() != ".safetensors":
        raise UsageError(f"{dst}: a bitcli checkpoint is one file; name it *.safetensors")
    if fmt != "bitcli" and dst.suffix:
        raise UsageError(f"{dst}: the {fmt} layout is a folder; give a folder name without an extension")
    check_dst(dst, fmt, overwrite)
    ckpt = load_checkpoint(src, revision, str(labels) if labels else None)  # readers check every shape
    WRITERS[fmt](ckpt, dst, DTYPES[dtype])
    cfg = ckpt.config
    if fmt != "bitcli" and cfg.ws_eps != 1e-8:
        lib = "transformers" if fmt == "hf" else "timm"
        log(
            f"note: {lib} standardises weights with eps 1e-8; these were trained with {cfg.ws_eps:g}, which bitcli "
            f"keeps in config.json. For trained weights the outputs differ only in the last digits"
        )
    log(
        f"wrote {dst} ({fmt}): {len(cfg.depths)} stages {list(cfg.depths)}, width {cfg.num_features}, "
        f"{cfg.num_classes} classes, {len(ckpt.tensors)} tensors"
    )


def check_dst(dst: Path, fmt: str, overwrite: bool) -> None:
    """Refuse a DST that the conversion would have to destroy, before the source is read.

    --overwrite replaces a bitcli file, or the model files of a folder; a folder holding anything else is
    never written into (the writer checks again)."""
    if fmt == "bitcli":
        if dst.is_dir():
            raise BitError(f"{dst}: is a folder; a bitcli checkpoint is one file, so pick a file name (*.safetensors)")
        if dst.exists() and not overwrite:
            raise BitError(f"{dst}: already exists; pass --overwrite to replace this file")
        return
    if not (dst.exists() or dst.is_symlink()):
        return
    if model_files_in(dst) and not overwrite:  # an empty folder is simply filled
        raise BitError(f"{dst}: already holds a model; pass --overwrite to replace its model files ({MODEL_FILES_SHOWN})")
