"""The app shell: help, entry points, lazy imports (torch stays unloaded for --help)."""

from __future__ import annotations

import subprocess
import sys

import pytest
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


def test_version():
    from importlib.metadata import version

    import bitcli
    from conftest import run_main

    assert bitcli.__version__ == version("bitcli")
    assert run_main("--version") == (0, f"bit {bitcli.__version__}\n", "")


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--version"], 0, ""),
        (["predict", "x.jpg", "--format", "xml"], 2, "Invalid value for '--format'"),
        (["predict", "x.jpg", "--precision", "fp8"], 2, "Invalid value for '--precision'"),
        (["eval", "data", "-f", "csv"], 2, "Invalid value for '--format'"),
        (["convert", "a", "b", "--dtype", "int8"], 2, "Invalid value for '--dtype'"),
        (["convert", "a", "b", "--format", "onnx"], 2, "Invalid value for '--format'"),
    ],
)
def test_version_and_bad_choices_answer_before_torch_is_imported(args, code, message):
    script = (
        "import sys\nfrom bitcli.cli import main\nsys.argv = ['bit', *sys.argv[1:]]\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    print('exit', exc.code, 'torch' in sys.modules)"
    )  # fmt: skip
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True)
    assert result.stdout.splitlines()[-1] == f"exit {code} False", result.stdout + result.stderr
    assert message in result.stderr


def test_help_lists_the_allowed_values():
    from conftest import run_main

    expected = {
        "predict": ["<table|json|jsonl|csv>", "<auto|fp32|bf16|fp16>"],
        "eval": ["<table|json>", "<auto|fp32|bf16|fp16>"],
        "finetune": ["<auto|fp32|bf16|fp16>"],
        "convert": ["<bitcli|hf|timm>", "<float32|float16|bfloat16>"],
    }
    for command, choices in expected.items():
        code, out, _ = run_main(command, "--help")
        assert code == 0 and all(c in out for c in choices), (command, out)


def test_choices_are_case_insensitive_and_reach_commands_in_lower_case(monkeypatch, tmp_path):
    """`-f JSON`, `--precision FP32`, `--dtype Float16`, `--format HF`: the command modules get plain strings."""
    from conftest import run_main

    from bitcli import convert, evaluate, finetune, predict

    seen = {}
    monkeypatch.setattr(predict, "run", lambda *a: seen.setdefault("predict", (a[6], a[7])) and 0)
    monkeypatch.setattr(evaluate, "run", lambda *a: seen.setdefault("eval", (a[5], a[6])))
    monkeypatch.setattr(convert, "run", lambda *a: seen.setdefault("convert", (a[2], a[4])))
    monkeypatch.setattr(finetune, "run", lambda opts: seen.setdefault("finetune", opts.precision))
    assert run_main("predict", "x.jpg", "-f", "JSON", "--precision", "FP32")[0] == 0
    assert run_main("eval", tmp_path, "-f", "Json", "--precision", "Bf16")[0] == 0
    assert run_main("convert", "a", tmp_path / "b", "--format", "HF", "--dtype", "Float16")[0] == 0
    assert run_main("finetune", tmp_path, "-m", "tiny", "-o", tmp_path / "run", "--precision", "FP16")[0] == 0
    assert seen == {"predict": ("fp32", "json"), "eval": ("bf16", "json"), "convert": ("hf", "float16"), "finetune": "fp16"}


def test_predict_format_defaults_to_not_given(monkeypatch):
    """None lets predict infer the format from --output's suffix."""
    from conftest import run_main

    from bitcli import predict

    seen = []
    monkeypatch.setattr(predict, "run", lambda *a: seen.append(a[7]) or 0)
    assert run_main("predict", "x.jpg", "-o", "p.csv")[0] == 0
    assert seen == [None]
