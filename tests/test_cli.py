"""The app shell: help, entry points, lazy imports (torch stays unloaded for --help)."""

from __future__ import annotations

import subprocess
import sys

from conftest import run_bit


def test_help_lists_every_command():
    result = run_bit("--help")
    assert result.returncode == 0
    for command in ("predict", "convert"):
        assert command in result.stdout


def test_help_does_not_import_torch():
    """`bit --help` must answer instantly: the command modules (and torch) load only when a command runs."""
    code = "import sys\nfrom bitcli.cli import app\nprint(sorted(m for m in ('torch', 'numpy', 'PIL', 'huggingface_hub') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_no_arguments_shows_usage():
    result = run_bit()
    assert result.returncode == 2 and "Usage" in (result.stdout + result.stderr)


def test_console_script_is_installed():
    import shutil

    bit = shutil.which("bit", path=str(__import__("pathlib").Path(sys.executable).parent))
    assert bit is not None
    result = subprocess.run([bit, "predict", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--top-k" in result.stdout
