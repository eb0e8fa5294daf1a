"""The optional extras (bitcli.extras): the one table of what each installs, and the one-line hint when any of its
modules is missing, whichever command needs it."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from conftest import run_main

from bitcli import extras
from bitcli.errors import BitError

PYPROJECT = Path(__file__).parents[1] / "pyproject.toml"
HINTS = {
    "onnx": "--flag needs {module}, which is not installed: pip install 'bitcli[onnx]'",
    "plots": "--flag needs {module}, which is not installed: pip install 'bitcli[plots]'",
    "tensorboard": "--flag needs the {module} package, which is not installed: pip install 'bitcli[tensorboard]'",
    "datasets": "--flag needs {module}, which is not installed: pip install 'bitcli[datasets]'",
    "audit": "--flag needs {module} (label issues), which is not installed: pip install 'bitcli[audit]'",
    "serve": "--flag needs {module}, which is not installed: pip install 'bitcli[serve]'",
}


def test_the_table_lists_modules_of_the_extras_pyproject_installs():
    tomllib = pytest.importorskip("tomllib")  # (Python 3.11 on)
    declared = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    packages = {name: {re.split(r"[<>=\[ ]", req)[0] for req in reqs} for name, reqs in declared.items()}
    assert set(extras.EXTRAS) == set(packages) - {"test"}
    for name, extra in extras.EXTRAS.items():
        assert set(extra.modules) <= packages[name], name


@pytest.mark.parametrize("extra, module", [(e, m) for e, x in extras.EXTRAS.items() for m in x.modules])
def test_any_missing_module_is_the_install_hint(monkeypatch, extra, module):
    assert extras.available(extra)  # the test environment installs every extra
    monkeypatch.setitem(sys.modules, module, None)  # as on a machine without it
    assert extras.missing(extra) == module and not extras.available(extra)
    with pytest.raises(BitError) as err:
        extras.require(extra, "--flag")
    assert str(err.value) == HINTS[extra].format(module=module)


def test_convert_to_onnx_without_the_exporter_is_the_install_hint(tiny_dir, tmp_path, monkeypatch):
    """onnx and onnxruntime installed by hand, not the extra: torch's exporter needs onnxscript too. It was
    `internal error: ModuleNotFoundError: No module named 'onnxscript'` (exit 3); now the one-line hint, exit 1,
    and nothing written."""
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    code, out, err = run_main("convert", tiny_dir, tmp_path / "x.onnx")
    assert (code, out, err) == (
        1,
        "",
        "Error: An ONNX export needs onnxscript, which is not installed: pip install 'bitcli[onnx]'\n",
    )
    assert list(tmp_path.iterdir()) == []


def test_a_use_checks_only_the_modules_it_imports(monkeypatch):
    """Review of issue 20: running an exported .onnx imports onnx and onnxruntime, never onnxscript (the
    exporter's), so a machine without onnxscript runs it; an export needs all three."""
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    assert extras.missing("onnx", ("onnx", "onnxruntime")) is None and extras.missing("onnx") == "onnxscript"
    extras.require("onnx", "running", modules=("onnx", "onnxruntime"))
    with pytest.raises(
        BitError, match=r"^ONNX export needs onnxscript, which is not installed: pip install 'bitcli\[onnx\]'$"
    ):
        extras.require("onnx", "ONNX export")
    with pytest.raises(ValueError):  # a module the extra does not install: a mistake in bitcli's own table
        extras.missing("onnx", ("torch",))
