"""The commands, one module each: `run(opts)` turns a typed options object (bitcli.options) into the exit code,
thin over the layers below (bitcli.pipeline, bitcli.engine, bitcli.evaluation, bitcli.export, bitcli.finetune).
Only bitcli.cli imports them, lazily, and no module below imports a command (tests/test_layers.py checks both).
"""
