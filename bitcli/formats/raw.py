"""Files of named tensors, read safely whatever their bytes: safetensors (header checked before any data is
read), torch .bin/.pth (weights only: pickled code is refused, never run), numpy .npz (no pickles, members
checked against their headers); and the streamed safetensors writer. Names here are the file's own."""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
import warnings
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from bitcli.errors import BitError, one_line
from bitcli.formats.tensors import TensorRef
from bitcli.reads import file_size, safetensors_header
from bitcli.reads import read_json as read_json  # still read from here by the format modules
from bitcli.writes import atomic_write

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def read_safetensors(path: Path) -> tuple[dict[str, TensorRef], dict[str, str]]:
    """Lazy references to every tensor, and the metadata. The header is validated before anything is read."""
    header, metadata = safetensors_header(path)
    try:
        for key, v in header.items():
            if v["dtype"] not in _ST_DTYPES:
                raise BitError(f"{path}: tensor {key} has unsupported dtype {v['dtype']}")
        handle = safe_open(str(path), framework="pt")
    except BitError:
        raise
    except Exception as exc:  # noqa: BLE001 -- wrong field types, the Rust reader's own checks
        raise BitError(f"{path}: not a valid safetensors file ({one_line(exc)})") from None

    def loader(key: str) -> Callable[[], torch.Tensor]:
        return lambda: handle.get_tensor(key)

    refs = {k: TensorRef(tuple(v["shape"]), _ST_DTYPES[v["dtype"]], loader(k)) for k, v in header.items()}
    return refs, metadata


def write_safetensors(
    path: Path, tensors: Mapping[str, TensorRef], metadata: dict[str, str], dtype: torch.dtype | None = None
) -> None:
    """Stream tensors into a safetensors file one at a time (peak memory: one tensor), atomically."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for key, ref in tensors.items():
        out_dtype = dtype if (dtype is not None and ref.dtype.is_floating_point) else ref.dtype
        nbytes = _numel(ref.shape) * torch.empty((), dtype=out_dtype).element_size()
        header[key] = {
            "dtype": _ST_NAMES[out_dtype],
            "shape": list(ref.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep the data 8-byte aligned, as the reference writer does

    def write(f) -> None:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for key, ref in tensors.items():
            t = ref.load()
            if tuple(t.shape) != tuple(ref.shape):
                raise BitError(f"{key}: shape {tuple(t.shape)} differs from its header {ref.shape}")
            t = t.to(_ST_DTYPES[header[key]["dtype"]]).contiguous()
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))  # type: ignore[arg-type]  # no copy; numpy stubs: a buffer from Python 3.12 only
            del t

    atomic_write(path, write)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def read_torch_bin(path: Path) -> dict[str, TensorRef]:
    """A torch state dict, loaded with weights_only=True: pickled code is refused, never run."""
    file_size(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols; the error below says enough
            # mmap needs torch's zip container; legacy (pre-1.6) files are read the ordinary way.
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        what = re.search(r"GLOBAL (\S+)", str(exc))
        detail = f"it refers to {what.group(1)}" if what else "torch's weights-only loader cannot read it"
        raise BitError(
            f"{path}: pickled Python objects, not plain weights ({detail}); bitcli never unpickles those. "
            "If you trust the file, re-save its weights as safetensors with the tool that wrote it"
        ) from None
    except Exception as exc:  # noqa: BLE001 -- the unpickler's own errors, of many types
        raise BitError(f"{path}: not a torch weights file ({one_line(exc, limit=200)})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BitError(f"{path}: does not hold a flat dict of tensors")
    return {k: TensorRef(tuple(v.shape), v.dtype, (lambda v=v: v)) for k, v in state.items()}  # type: ignore[misc]  # python/mypy#15459: a default-argument lambda


def folder_weights(folder: Path) -> dict[str, TensorRef]:
    """The weights of a transformers or timm folder: model.safetensors, else pytorch_model.bin."""
    st, bin_ = folder / "model.safetensors", folder / "pytorch_model.bin"
    if os.path.lexists(st):  # (not is_file: a FIFO there is refused by the reader, not passed over)
        return read_safetensors(st)[0]
    if os.path.lexists(bin_):
        return read_torch_bin(bin_)
    raise BitError(f"{folder}: holds no model.safetensors or pytorch_model.bin")


# numpy dtypes a BiT .npz may hold (any byte order), and their torch equivalents.
_NPZ_DTYPES = {
    np.dtype("float16"): torch.float16,
    np.dtype("float32"): torch.float32,
    np.dtype("float64"): torch.float64,
}


def read_npz_arrays(path: Path) -> dict[str, TensorRef]:
    """Lazy references to the arrays of an .npz, one zip member each. Only the .npy headers are read here:
    object arrays (pickles) are refused, and a member shorter than its header promises is reported as
    truncated before anything is converted. `load()` reads one member, so peak memory is one array."""
    file_size(path)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as exc:
        with open(path, "rb") as f:
            magic = f.read(6)
        if magic == b"\x93NUMPY":
            raise BitError(f"{path}: is a single .npy array, not an .npz archive of named arrays") from None
        if magic.startswith(b"PK\x03\x04"):
            raise BitError(
                f"{path}: the .npz archive is truncated (its zip directory is missing); download or copy it again"
            ) from None
        raise BitError(f"{path}: not an .npz (zip) archive ({one_line(exc)})") from None
    refs: dict[str, TensorRef] = {}
    for info in zf.infolist():
        key = info.filename.removesuffix(".npy")
        shape, dtype, data_start = _npy_header(path, zf, info, key)
        if dtype.hasobject:
            raise BitError(f"{path}: array {key} holds Python objects (a pickle); bitcli refuses to load it")
        native = dtype.newbyteorder("=")
        if native not in _NPZ_DTYPES:
            raise BitError(f"{path}: array {key} has dtype {dtype}; BiT weights must be float16, float32 or float64")
        need = data_start + _numel(shape) * dtype.itemsize
        if info.file_size != need:
            state = "is truncated" if info.file_size < need else "has bytes after its data"
            raise BitError(
                f"{path}: array {key} {state} ({info.file_size} bytes, its header promises {need}); the file is corrupt"
            )
        refs[key] = TensorRef(tuple(int(n) for n in shape), _NPZ_DTYPES[native], _npz_loader(path, zf, info, key))
    return refs


def _npy_header(
    path: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo, key: str
) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, offset of the data) of one .npy member, from its header alone."""
    try:
        with zf.open(info) as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
            else:  # 3.0 only exists for non-Latin-1 field names, which weights never have
                raise BitError(f"{path}: array {key} uses .npy format {version[0]}.{version[1]}; expected 1.0 or 2.0")
            return shape, dtype, fh.tell()
    except BitError:
        raise
    except zipfile.BadZipFile as exc:  # a small member is read whole with its header: CRC checked here
        raise BitError(f"{path}: array {key} is corrupt ({one_line(exc)}); download or copy the file again") from None
    except Exception as exc:  # noqa: BLE001 -- not a .npy member, a damaged header, a zip entry that cannot be opened
        raise BitError(f"{path}: member {info.filename} is not a readable .npy array ({one_line(exc)})") from None


def _npz_loader(path: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo, key: str) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        try:
            with zf.open(info) as fh:
                array = np.lib.format.read_array(fh, allow_pickle=False)
        except Exception as exc:  # noqa: BLE001 -- CRC mismatch, a member cut short
            raise BitError(
                f"{path}: array {key} cannot be read ({one_line(exc)}); the file is corrupt, download or copy it again"
            ) from None
        if not array.dtype.isnative:
            array = array.astype(array.dtype.newbyteorder("="))
        return torch.from_numpy(np.ascontiguousarray(array))

    return load
