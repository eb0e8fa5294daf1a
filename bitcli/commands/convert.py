"""`bit convert`: any supported checkpoint in, bitcli / transformers / timm out, streamed tensor by tensor (the
format writers, bitcli.formats), or an ONNX export (bitcli.export: the graph is proven before it is written)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import torch

from bitcli.errors import BitError, UsageError
from bitcli.export import write_onnx
from bitcli.formats import FORMATS, Format
from bitcli.hub import load_checkpoint
from bitcli.options import ConvertOptions, DType, convert_format
from bitcli.ui import log
from bitcli.writes import MODEL_FILES_SHOWN, model_files_in, unwritable

DTYPES = {DType.float32: torch.float32, DType.float16: torch.float16, DType.bfloat16: torch.bfloat16}


def run(opts: ConvertOptions) -> None:
    dst = opts.dst
    fmt = FORMATS[convert_format(opts.format, dst).value]
    if not fmt.folder and dst.suffix.lower() not in fmt.suffixes:
        raise UsageError(f"{dst}: a {fmt.name} checkpoint is one file; name it *{fmt.suffixes[0]}")
    if fmt.folder and dst.suffix:
        raise UsageError(f"{dst}: the {fmt.name} layout is a folder; give a folder name without an extension")
    check_dst(dst, fmt, opts.overwrite)
    ckpt = load_checkpoint(
        opts.src, opts.revision, str(opts.labels) if opts.labels else None
    )  # readers check every shape
    ckpt.refuse_graph()
    if fmt.write is None:  # ONNX: an export, not a file writer (it needs the engine to prove the graph)
        write_onnx(ckpt, dst, DTYPES[opts.dtype], opset=opts.opset, calibrate=opts.calibrate,
                   min_agreement=opts.min_agreement)  # fmt: skip
    else:
        fmt.write(ckpt, dst, DTYPES[opts.dtype])
    cfg = ckpt.config
    if fmt.fixed_eps_library and cfg.ws_eps != 1e-8:
        log(
            f"note: {fmt.fixed_eps_library} standardises weights with eps 1e-8; these were trained with {cfg.ws_eps:g}, "
            "which bitcli keeps in config.json. For trained weights the outputs differ only in the last digits"
        )
    log(
        f"wrote {dst} ({fmt.name}): {len(cfg.depths)} stages {list(cfg.depths)}, width {cfg.num_features}, "
        f"{cfg.num_classes} classes, {len(ckpt.tensors)} tensors"
    )


def check_dst(dst: Path, fmt: Format, overwrite: bool) -> None:
    """Refuse a DST that the conversion would have to destroy, or could not write, before the source is read.

    --overwrite replaces a DST file that bitcli wrote (its header says so: Format.foreign), or the model files
    of a DST folder; any other file, and a folder holding anything else, is never written over (the folder
    writer checks again). A symlink is judged by the file it points to, which is what would be replaced."""
    if not fmt.folder:
        if dst.is_dir():
            raise BitError(
                f"{dst}: is a folder; a {fmt.name} checkpoint is one file, so pick a file name (*{fmt.suffixes[0]})"
            )
        if dst.exists():
            if not overwrite:
                raise BitError(f"{dst}: already exists; pass --overwrite to replace this file")
            _refuse_foreign(dst, fmt)
    elif (dst.exists() or dst.is_symlink()) and model_files_in(dst) and not overwrite:  # an empty folder is filled
        raise BitError(
            f"{dst}: already holds a model; pass --overwrite to replace its model files ({MODEL_FILES_SHOWN})"
        )
    reason = unwritable(dst, folder=fmt.folder)
    if reason is not None:
        raise BitError(f"{dst}: {reason}")


def _refuse_foreign(dst: Path, fmt: Format) -> None:
    """An existing DST file that bitcli did not write (a FIFO or a device is written through: nothing is replaced)."""
    if not stat.S_ISREG(os.stat(dst).st_mode):
        return
    what = fmt.foreign(dst) if fmt.foreign is not None else f"a file bitcli cannot tell as its own {fmt.name} file"
    if what is None:
        return
    subject = f"links to {os.path.realpath(dst)}, which is" if dst.is_symlink() else "is"
    raise BitError(
        f"{dst}: {subject} {what}; --overwrite replaces only a file that bitcli wrote, "
        "so choose another DST or remove this one yourself"
    )
