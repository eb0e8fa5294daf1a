"""Terminal output helpers: progress on stderr (silent when stderr is not a terminal), one console for logs."""

from __future__ import annotations

import contextlib
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
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    # markup=False: a description may come from data (a folder name) and is shown as it is spelled.
    columns = [TextColumn("{task.description}", style="progress.description", markup=False), BarColumn(),
               MofNCompleteColumn(), TextColumn(unit, markup=False), TimeElapsedColumn(), TimeRemainingColumn()]  # fmt: skip
    with Progress(*columns, console=stderr_console(), transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.update(task, advance=n)


def log(message: str) -> None:
    """A line for people, on stderr."""
    print(message, file=sys.stderr, flush=True)
