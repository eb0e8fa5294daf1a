"""`bit finetune`: BiT-HyperRule transfer of a BiT model to an image folder; resumable, optionally distributed.

Reading order: command.run (checks, then the run) -> plan (FinetuneOptions -> Plan: every choice, written to
DIR/finetune_config.json) -> loop (the training loop). Around them: datasets (the images that decode),
start (the model to start from), memory (automatic micro-batching), distributed (torchrun processes),
rundir (the output folder, its lock and files), runfiles (the files' names and their torch-free readers),
state (the resumable checkpoint), progress (the terminal bar).

Importing this package imports no training code: `bit report` reads a run with runfiles alone, without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bitcli.options import FinetuneOptions


def run(opts: FinetuneOptions) -> None:
    """`bit finetune` (command.run); the training stack, torch included, is imported here."""
    from bitcli.finetune.command import run as run_command

    run_command(opts)


__all__ = ["run"]
