"""Google's original BiT .npz: `resnet/`-prefixed names, HWIO kernels, the head a [1, 1, C, N] convolution,
and weights standardised with eps 1e-10 (Google's code). It carries no labels and no preprocessing: Google's
evaluation transform (GOOGLE_EVAL_PREPROCESS, 480x480 without a centre crop) goes with it."""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from bitcli.errors import BitError
from bitcli.formats.checkpoint import GOOGLE_EVAL_PREPROCESS, Checkpoint, check_tensors, checked_labels, infer_config
from bitcli.formats.raw import read_npz_arrays
from bitcli.formats.tensors import HEAD, Layout, TensorRef
from bitcli.writes import atomic_write

NAME = "npz"
GOOGLE_WS_EPS = 1e-10
_PREFIX = "resnet/"
_GLOBAL = {
    "stem.conv.weight": "root_block/standardized_conv2d/kernel",
    "norm.weight": "group_norm/gamma",
    "norm.bias": "group_norm/beta",
    "head.weight": "head/conv2d/kernel",
    "head.bias": "head/conv2d/bias",
}
# Google names a unit's pre-activation norm (norm1) under `a`, beside conv1.
_UNIT = {
    **{f"conv{n}.weight": f"{p}/standardized_conv2d/kernel" for n, p in zip("123", "abc")},
    **{f"norm{n}.weight": f"{p}/group_norm/gamma" for n, p in zip("123", "abc")},
    **{f"norm{n}.bias": f"{p}/group_norm/beta" for n, p in zip("123", "abc")},
    "downsample.conv.weight": "a/proj/standardized_conv2d/kernel",
}
_GLOBAL_BACK = {v: k for k, v in _GLOBAL.items()}
_UNIT_BACK = {v: k for k, v in _UNIT.items()}


def npz_key(bitcli_key: str) -> str | None:
    """bitcli name -> name inside Google's .npz; None for a tensor Google's layout has no name for (a v1.5 stem norm)."""
    if bitcli_key in _GLOBAL:
        return _PREFIX + _GLOBAL[bitcli_key]
    m = re.fullmatch(r"stages\.(\d+)\.units\.(\d+)\.(.+)", bitcli_key)
    if not m or m.group(3) not in _UNIT:
        return None
    return f"{_PREFIX}block{int(m.group(1)) + 1}/unit{int(m.group(2)) + 1:02d}/{_UNIT[m.group(3)]}"


def bitcli_key(key: str) -> str | None:
    """Name inside Google's .npz -> bitcli name; None for a name that is not Google's."""
    if not key.startswith(_PREFIX):
        return None
    key = key.removeprefix(_PREFIX)
    if key in _GLOBAL_BACK:
        return _GLOBAL_BACK[key]
    m = re.fullmatch(r"block(\d+)/unit(\d+)/(.+)", key)
    if not m or m.group(3) not in _UNIT_BACK or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        return None
    return f"stages.{int(m.group(1)) - 1}.units.{int(m.group(2)) - 1}.{_UNIT_BACK[m.group(3)]}"


LAYOUT = Layout(
    "Google's layout", source_key=npz_key, bitcli_key=bitcli_key, kernel_axes=(2, 3, 1, 0), conv_head=True,
    noun="array", thing="BiT .npz",
)  # fmt: skip


def read(path: Path) -> Checkpoint:
    arrays = read_npz_arrays(path)
    names = LAYOUT.map_keys(str(path), arrays)
    for key, name in names.items():
        _check_rank(path, name, key, arrays[name])
    tensors = LAYOUT.refs_to_bitcli(str(path), arrays)
    if ("head.weight" in tensors) != ("head.bias" in tensors):
        raise BitError(f"{path}: has only one of resnet/head/conv2d/kernel and resnet/head/conv2d/bias")
    shapes = {k: r.shape for k, r in tensors.items()}
    config = infer_config(shapes, str(path), LAYOUT, ws_eps=GOOGLE_WS_EPS)
    check_tensors(config, tensors, str(path), LAYOUT)
    labels = checked_labels(None, config.num_classes, str(path))
    return Checkpoint(
        config=config,
        labels=labels,
        preprocess=GOOGLE_EVAL_PREPROCESS,
        tensors=tensors,
        source=str(path),
        format=NAME,
        layout=LAYOUT,
    )


def _check_rank(path: Path, npz_name: str, key: str, ref: TensorRef) -> None:
    """Kernels are 4-d (the head's a 1x1 conv), everything else 1-d: checked before any axis is moved."""
    rank = 4 if npz_name.endswith("/kernel") else 1
    if len(ref.shape) != rank:
        raise BitError(f"{path}: {npz_name} has shape {ref.shape}; expected a {rank}-d array")
    if key == HEAD and ref.shape[:2] != (1, 1):
        raise BitError(f"{path}: {npz_name} has shape {ref.shape}; expected (1, 1, {ref.shape[2]}, {ref.shape[3]})")


def write(ckpt: Checkpoint, path: Path, dtype: torch.dtype | None = None) -> None:
    """Google's layout (used by tests and by anyone going back to the original code), one array at a time,
    as float32 or, if `dtype` says so, float16 (numpy has no bfloat16)."""
    if dtype not in (None, torch.float32, torch.float16):
        raise BitError(f"{path}: Google's .npz holds float32 or float16 arrays, not {dtype}")
    arrays = LAYOUT.refs_from_bitcli(ckpt.source, ckpt.tensors)

    def fill(f) -> None:
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, ref in arrays.items():
                t = ref.load().to(dtype or torch.float32)
                with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.ascontiguousarray(t.numpy()), allow_pickle=False)
                del t

    atomic_write(path, fill)
