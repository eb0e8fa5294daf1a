"""What the user named on the command line, as images: files, folders and glob patterns expanded in argument
order, `-` for paths listed on stdin, http(s) URLs (bitcli.urls: fetched when the image is decoded, so on the
pipeline's decoding threads, in parallel), and the decoding of one image for a checkpoint. `bit predict` and
`bit embed` take their inputs here, and int8 calibration decodes its images with `path_decoder`.
"""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from bitcli import urls
from bitcli.errors import BitError, UsageError
from bitcli.images import list_images
from bitcli.preprocess import Preprocess, load_image
from bitcli.ui import display


@dataclass(frozen=True)
class Input:
    """One row of the report: a path to classify, or an argument that named nothing usable (`error` set)."""

    path: str
    error: str | None = None


def _expand(arg: str, recursive: bool) -> list[Input]:
    """A file as given; a folder to the images it holds; a glob to its matches (folders among them expanded);
    a URL as given (an error row for a scheme other than http and https)."""
    if urls.is_url(arg):
        reason = urls.refusal(arg)
        return [Input(arg, None if reason is None else f"{display(arg)}: {reason}")]
    p = Path(arg)
    try:
        if p.is_dir():
            images = list_images(p, recursive)
            return [Input(i) for i in images] or [Input(arg, f"{display(arg)}: folder holds no images")]
        if p.exists() or p.is_symlink():
            return [Input(arg)]
        if not glob.has_magic(arg):
            return [Input(arg, f"{display(arg)}: no such file or folder")]
        matches = sorted(glob.glob(arg, recursive=recursive))
        if not matches:
            return [Input(arg, f"{display(arg)}: no files match this pattern")]
        return [Input(i) for m in matches for i in (list_images(Path(m), recursive) if Path(m).is_dir() else [m])]
    except BitError as exc:  # a folder that cannot be listed is one failed row; the other arguments go on
        return [Input(arg, str(exc))]


def _stdin_paths(stdin: IO[bytes]) -> list[str]:
    """The lines of stdin, blank ones skipped; bytes kept as the file system spells them (surrogate escapes)."""
    paths = []
    for raw in stdin.read().split(b"\n"):
        line = raw[:-1] if raw.endswith(b"\r") else raw
        if line.strip():
            paths.append(os.fsdecode(line))
    return paths


def expand_inputs(args: list[str], recursive: bool, stdin: IO[bytes] | None = None) -> list[Input]:
    """One entry per image in argument order, repeats kept (one row per occurrence): folders and globs expand
    in place, sorted; `-` stands for the paths listed on stdin, one per line, each read like an argument."""
    if args.count("-") > 1:
        raise UsageError("`-` (read paths from stdin) may be given only once")
    out: list[Input] = []
    for arg in args:
        if arg != "-":
            out += _expand(arg, recursive)
            continue
        if stdin is None and sys.stdin is None:  # started with stdin closed (a service, `<&-`)
            raise UsageError("`-` reads paths from stdin, but this process has no stdin")
        lines = _stdin_paths(stdin if stdin is not None else sys.stdin.buffer)
        out += [i for line in lines for i in _expand(line, recursive)] or [Input("-", "-: stdin lists no paths")]
    return out


def decode(path: str, preprocess: Preprocess, downloads: urls.Limits = urls.DEFAULT) -> np.ndarray:
    """An image file, or a URL's image (fetched within `downloads`), as `preprocess` gives it to a model:
    uint8 [H, W, 3]."""
    image = urls.open_image(path, downloads) if urls.is_url(path) else load_image(path)
    return preprocess.to_uint8(image)


def path_decoder(preprocess: Preprocess, downloads: urls.Limits = urls.DEFAULT) -> Callable[[str], np.ndarray]:
    """decode(path, preprocess, downloads) as a function of the path, for bitcli.pipeline (`decode` is looked up
    when an image is decoded)."""
    return lambda path: decode(path, preprocess, downloads)
