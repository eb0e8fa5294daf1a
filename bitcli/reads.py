"""Files read with the standard library alone (no torch, no numpy): JSON objects and a safetensors file's header.
`bit report` reads a run with these, so it answers in a fraction of a second; the tensor readers in
bitcli.formats.raw build on the same header check."""

from __future__ import annotations

import json
import os
import stat
import struct
from pathlib import Path
from typing import Any

from bitcli.errors import BitError, one_line


def not_regular(name: object, what: str) -> str:
    """The one message for a FIFO, socket or device given as a file to read: opening it would block or never end."""
    return f"{name}: not a regular file (pipe, socket or device); copy the {what} to a file"


def file_size(path: Path, what: str = "model") -> int:
    """The size of a file to read, after refusing what is not a regular file (a FIFO would hang the read)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise BitError(f"{path}: cannot read ({exc.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        raise BitError(f"{path}: is a folder, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise BitError(not_regular(path, what))
    return st.st_size


def read_json(path: Path) -> dict[str, Any]:
    try:
        if os.path.exists(path):  # (a missing file is said below, as `missing`)
            file_size(path, "JSON")
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BitError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BitError(f"{path}: not valid JSON ({one_line(exc)})") from None
    if not isinstance(data, dict):
        raise BitError(f"{path}: expected a JSON object")
    return data


def safetensors_header(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """(each tensor's header entry, the metadata) of a safetensors file, its data unread; one line when the
    header is not valid or promises more data than the file holds."""
    size = file_size(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise BitError(f"{path}: file is too short to be safetensors (truncated or empty)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise BitError(f"{path}: safetensors header runs past the end of the file (truncated)")
            header = json.loads(f.read(n))
        metadata = dict(header.pop("__metadata__", None) or {})
        end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
        if 8 + n + end > size:
            raise BitError(f"{path}: safetensors data runs past the end of the file (truncated)")
    except BitError:
        raise
    except Exception as exc:  # noqa: BLE001 -- malformed JSON, wrong field types
        raise BitError(f"{path}: not a valid safetensors file ({one_line(exc)})") from None
    return header, metadata
