"""Terminal output helpers: progress on stderr (silent when stderr is not a terminal), one console for logs,
and the one place that makes data (paths, labels, error texts) safe to show: literal, printable, on one line."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator


def stderr_console():
    from rich.console import Console

    return Console(file=sys.stderr, highlight=False)


@contextlib.contextmanager
def progress_bar(description: str, total: int | None, unit: str = "") -> Iterator[Callable[[int], None]]:
    """Yields advance(n). Rich progress on a TTY stderr; nothing otherwise (logs and pipes stay clean)."""
    if not sys.stderr.isatty():
        yield lambda n: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    # markup=False: a description may come from data (a folder name) and is shown as it is spelled.
    columns = [TextColumn("{task.description}", style="progress.description", markup=False), BarColumn(),
               MofNCompleteColumn(), TextColumn(unit, markup=False), TimeElapsedColumn(), TimeRemainingColumn()]  # fmt: skip
    with Progress(*columns, console=stderr_console(), transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.update(task, advance=n)


@contextlib.contextmanager
def quiet_logger(name: str | None) -> Iterator[None]:
    """Silence a library's warnings for a while (huggingface_hub logs every retry, onnxruntime's quantiser
    logs advice on the root logger): our own one-line errors say what matters."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def log(message: str) -> None:
    """A line for people, on stderr."""
    print(message, file=sys.stderr, flush=True)


def human_size(n: int) -> str:
    """A size in bytes for people: `512 B`, `43.2 KiB`, `1.5 MiB`, `3.1 GiB`."""
    value, unit = float(n), "B"
    for bigger in ("KiB", "MiB", "GiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"


MB = 1_000_000  # the unit of the --max-*-mb flags


def mb_to_bytes(value: float) -> int:
    """A --max-*-mb flag's value in bytes, to the nearest byte (int() would make 2.01 MB 2,009,999 bytes)."""
    return round(value * MB)


def megabytes(n: int) -> str:
    """A size in bytes in the unit of the --max-*-mb flags (MB = 10^6 bytes), exact to the byte: `5 MB`,
    `0.02 MB`, `5.000001 MB` (a size just over a cap never reads as equal to it)."""
    whole, part = divmod(n, MB)
    return f"{whole}.{part:06d}".rstrip("0").rstrip(".") + " MB"


_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# Characters that would break a line or a table row, or reorder what is shown: C0/C1 controls, line and
# paragraph separators, and the bidirectional overrides and isolates.
_INVISIBLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def visible(text: str) -> str:
    """`text` (a path or label from data) on one line for people: control characters shown as escapes
    (newline as \\n), nothing else changed. Print it as plain text (rich Text, markup=False), never as markup."""
    return _INVISIBLE.sub(lambda m: _ESCAPES.get(m[0]) or f"\\u{ord(m[0]):04x}", text)


def display(path: str | os.PathLike[str]) -> str:
    """A path as text: names that are not UTF-8 stay printable (surrogate escapes become U+FFFD) and valid JSON."""
    return os.fsencode(path).decode("utf-8", "replace")
