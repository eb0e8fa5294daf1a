"""Tests of bitcli.formats: one module per format, the shared pieces and the registry."""
