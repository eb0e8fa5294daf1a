"""Files read with the standard library alone (no torch, no numpy): JSON objects, a safetensors file's header and
a text file's lines. `bit report` reads a run with these, so it answers in a fraction of a second; the tensor
readers in bitcli.formats.raw build on the same header check.

Only regular files are read (through symlinks): a FIFO would block the read until some writer comes, and a
device such as /dev/zero never ends. A file of a folder that is published (`bit push` reads a run folder) is
also kept inside it (`inside`): a symlink in the folder must not bring in a file from anywhere else on disk. Lines are read with a bound on their length, so no line, however long
(a run of NUL bytes), is ever held whole.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from bitcli.errors import BitError, one_line
from bitcli.ui import human_size

MAX_LINE = 1 << 20  # bytes: a longer line is no line that bitcli wrote (a metrics.jsonl record is ~200 bytes)
SKIP_CHUNK = 1 << 16  # bytes read at a time while passing over an over-long line
MAX_SAFETENSORS_HEADER = 100_000_000  # bytes: the safetensors library's own limit (MAX_HEADER_SIZE)
_KINDS = {
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a folder",
}


def not_regular(name: object, mode: int) -> str:
    """The one message for a FIFO, socket or device (file mode `mode`) given as a file to read, an image, a
    model file or a run's file alike: opening it would block or never end."""
    return f"{name}: is {_KINDS.get(stat.S_IFMT(mode), 'a special file')}, not a regular file"


def file_size(path: Path, *, what: str = "") -> int:
    """The size of a file to read, after refusing what is not a regular file (a FIFO would hang the read);
    `what` names the file in the error of one that cannot be read ("label file")."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise BitError(f"{path}: cannot read{' ' + what if what else ''} ({exc.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        raise BitError(f"{path}: is a folder, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise BitError(not_regular(path, st.st_mode))
    return st.st_size


def open_regular(path: Path) -> BinaryIO:
    """`path` open for reading in binary, if it is a regular file (a symlink is followed); else one line saying
    what it is. Opened without blocking, so that a FIFO is refused instead of waited on. A missing file raises
    FileNotFoundError, for the caller to say what a missing file means."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise
    except OSError as exc:  # a socket cannot be opened at all (ENXIO): say what it is, as for a FIFO
        with contextlib.suppress(OSError):
            if not stat.S_ISREG(mode := os.stat(path).st_mode):
                raise BitError(not_regular(path, mode)) from None
        raise BitError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise BitError(not_regular(path, mode))
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def inside(folder: Path, name: str) -> Path:
    """`folder / name` with its symlinks resolved, if that stays inside `folder` (a symlink to another file of
    the folder is fine); else one line saying where it leads."""
    path = folder / name
    real = path.resolve()
    if not real.is_relative_to(folder.resolve()):
        raise BitError(f"{path}: is a symlink to {real}, outside {folder}; copy the file into the folder instead")
    return real


def read_bounded(path: Path, limit: int) -> bytes:
    """The bytes of `path`, a regular file (open_regular's rule) of at most `limit` bytes; else one line. No more
    than `limit` + 1 bytes are ever read, however large the file."""
    try:
        with open_regular(path) as f:
            data = f.read(limit + 1)
    except OSError as exc:  # missing too: `path` was found a moment ago, through a symlink that leads nowhere
        raise BitError(f"{path}: cannot read ({exc.strerror})") from None
    if len(data) > limit:
        raise BitError(f"{path}: is over {human_size(limit)}")
    return data


def bounded_lines(file: BinaryIO, limit: int = MAX_LINE) -> Iterator[bytes | None]:
    """Each line of `file` (with its line break), or None for a line of over `limit` bytes: that one is passed
    over in chunks, never held."""
    while line := file.readline(limit + 1):
        if len(line) > limit and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):
                line = file.readline(SKIP_CHUNK)
            yield None
        else:
            yield line


def read_json(path: Path) -> dict[str, Any]:
    try:
        with open_regular(path) as f:
            data = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise BitError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise BitError(f"{path}: not valid JSON ({one_line(exc)})") from None
    if not isinstance(data, dict):
        raise BitError(f"{path}: expected a JSON object")
    return data


def safetensors_header(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """(each tensor's header entry, the metadata) of a safetensors file, its data unread; one line when the
    header is not valid or promises more data than the file holds."""
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise BitError(f"{path}: file is too short to be safetensors (truncated or empty)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise BitError(f"{path}: safetensors header runs past the end of the file (truncated)")
            if n > MAX_SAFETENSORS_HEADER:
                raise BitError(f"{path}: safetensors header of {n:,} bytes is over the format's limit of 100 MB")
            header = json.loads(f.read(n))
        metadata = dict(header.pop("__metadata__", None) or {})
        end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
        if 8 + n + end > size:
            raise BitError(f"{path}: safetensors data runs past the end of the file (truncated)")
    except BitError:
        raise
    except FileNotFoundError as exc:
        raise BitError(f"{path}: cannot read ({exc.strerror})") from None
    except Exception as exc:  # noqa: BLE001 -- malformed JSON, wrong field types
        raise BitError(f"{path}: not a valid safetensors file ({one_line(exc)})") from None
    return header, metadata
