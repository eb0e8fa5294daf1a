"""The training library under `bit finetune` (bitcli.commands.finetune): BiT-HyperRule transfer of a BiT model to
labelled images; resumable, optionally distributed.

Reading order: prepare (the checks, then the plan and start model) -> plan (FinetuneOptions -> Plan: every
choice, written to DIR/finetune_config.json) -> loop (the training loop). Around them: datasets (the images that
decode), start (the model to start from), memory (automatic micro-batching), rundir (the output folder, its lock
and files), runfiles (the files' names and their torch-free readers), state (the resumable checkpoint), watch
(the loop's per-step hook), tensorboard, progress (the terminal bar).

Importing this package imports nothing: `bit report` reads a run with runfiles alone, without torch.
"""
