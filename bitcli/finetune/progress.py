"""The training progress line on a terminal: step, lr, loss, images/s and the time left."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from bitcli.ui import log, stderr_console

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID


class TrainProgress:
    """Rich progress on a TTY stderr (step, lr, loss, images/s, ETA); nothing otherwise. `log` prints a
    line above the bar (or plainly, without one)."""

    def __init__(self, enabled: bool, total: int, start: int) -> None:
        self.enabled, self.total, self.start = enabled and sys.stderr.isatty(), total, start
        self.progress: Progress | None = None
        self.task: TaskID

    def __enter__(self) -> TrainProgress:
        if self.enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                TextColumn("lr {task.fields[lr]:.2e}"), TextColumn("loss {task.fields[loss]:.4f}"),
                TextColumn("{task.fields[ips]:.0f} img/s"), TimeRemainingColumn(),
                console=stderr_console(), transient=True,
            )  # fmt: skip
            self.progress.__enter__()
            self.task = self.progress.add_task(
                "finetune", total=self.total, completed=self.start, lr=0.0, loss=0.0, ips=0.0
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.__exit__(None, None, None)

    def update(self, done: int, lr: float, loss: float, ips: float) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=done, lr=lr, loss=loss, ips=ips)

    def log(self, message: str) -> None:
        if self.progress is not None:
            self.progress.console.print(message, highlight=False, markup=False)
        else:
            log(message)
