"""`bit finetune`: BiT-HyperRule transfer of a BiT model to an image folder; resumable, optionally distributed.

Reading order: command.run (checks, then the run) -> plan (FinetuneOptions -> Plan: every choice, written to
DIR/finetune_config.json) -> loop (the training loop). Around them: datasets (the images that decode),
start (the model to start from), memory (automatic micro-batching), distributed (torchrun processes),
rundir (the output folder, its lock and files), state (the resumable checkpoint), progress (the terminal bar).
"""

from bitcli.finetune.command import run

__all__ = ["run"]
