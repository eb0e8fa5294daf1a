"""The app shell: help, entry points, flag parsing into typed options, lazy imports (torch stays unloaded for
--help and for every bad flag value)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_main

from bitcli.errors import UsageError
from bitcli.hyperrule import Resolution
from bitcli.options import DEFAULT_WORKERS, FinetuneOptions, Precision, PredictFormat, PredictOptions, parse_resolution


def test_help_lists_every_command():
    code, out, err = run_main("--help")
    assert (code, err) == (0, "")
    commands = re.findall(r"^  (\w+) ", out.split("Commands:\n")[1], flags=re.M)
    assert commands == [
        "predict",
        "embed",
        "convert",
        "finetune",
        "eval",
        "explain",
        "audit",
        "report",
        "push",
        "serve",
    ]


def test_help_shows_each_command_s_whole_summary():
    """`bit --help` lists each command with the whole first paragraph of its help (click cut it at one line)."""
    from bitcli.cli import app

    code, out, err = run_main("--help")
    assert (code, err) == (0, "")
    listed = " ".join(out.split("Commands:\n")[1].split())
    for command in app.registered_commands:
        summary = " ".join(command.callback.__doc__.split("\n\n")[0].split())
        assert f"{command.name or command.callback.__name__} {summary}" in listed, summary
    assert "..." not in listed
    assert "eval Accuracy on labelled images: top-1, top-5 (models with over 5 classes), per-class accuracy, " in listed


def test_every_option_has_help():
    """Every argument and option of every command says what it is for (-b, eval's -f and convert's --dtype said
    nothing); --model names the .onnx files that predict and eval run (embed cannot)."""
    import typer

    from bitcli.cli import app

    commands = typer.main.get_command(app).commands
    assert [(name, p.name) for name, c in commands.items() for p in c.params if not p.help] == []
    for command in ("predict", "embed", "eval"):
        out = " ".join(run_main(command, "--help")[1].split())
        assert "-b, --batch-size <int range> Images per forward pass: more is faster, up to memory. [default: " in out
        onnx = "or a .onnx file from bit convert."
        assert (onnx in out) == (command != "embed"), command
    out = " ".join(run_main("eval", "-h")[1].split())
    assert (
        "-f, --format <table|json> table: for people; json: every metric (per class too) and the whole confusion "
        "matrix. [default: table]" in out
    )


def test_help_does_not_import_torch():
    """`bit --help` must answer instantly: the command modules (and torch) load only when a command runs."""
    code = "import sys\nfrom bitcli.cli import app\nprint(sorted(m for m in ('torch', 'numpy', 'PIL', 'huggingface_hub') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_no_arguments_shows_usage():
    code, out, err = run_main()
    assert (code, out) == (2, "")
    assert re.match(r"Usage: .*bit \[OPTIONS\] COMMAND \[ARGS\]\.\.\.\n", err) and "Commands:\n  predict " in err


def test_console_script_is_installed():
    bit = shutil.which("bit", path=str(Path(sys.executable).parent))
    assert bit is not None
    result = subprocess.run([bit, "predict", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--top-k" in result.stdout


def test_version():
    from importlib.metadata import version

    import bitcli

    assert bitcli.__version__ == version("bitcli")
    assert run_main("--version") == (0, f"bit {bitcli.__version__}\n", "")


# (arguments, exit code, the one line of stderr). One fresh process runs them all: torch must still be unimported.
EARLY_ANSWERS = [
    (["--version"], 0, ""),
    (["predict", "x.jpg", "--format", "xml"], 2, "Error: Invalid value for '--format' / '-f': 'xml' is not one of 'table', 'json', 'jsonl', 'csv'. (`bit predict -h` lists the options)"),
    (["predict", "x.jpg", "--precision", "fp8"], 2, "Error: Invalid value for '--precision': 'fp8' is not one of 'auto', 'fp32', 'bf16', 'fp16'. (`bit predict -h` lists the options)"),
    (["convert", "a"], 2, "Error: Missing argument 'DST'. (`bit convert -h` lists the options)"),
    (["predict", "x.jpg", "--no-such-flag"], 2, "Error: No such option: --no-such-flag (`bit predict -h` lists the options)"),
    (["predict", "x.jpg", "--device", "tpu"], 2, "Error: --device 'tpu': use auto, cpu, cuda, cuda:N or mps"),
    (["predict", "x.jpg", "--workers", "-1"], 2, "Error: Invalid value for '--workers': Input should be greater than or equal to 0 (`bit predict -h` lists the options)"),
    (["predict", "x.jpg", "-f", "csv", "-o", "x.json"], 2,
     "Error: --format csv contradicts --output x.json (a .json file holds json); drop --format or give the file a name that matches"),
    (["embed", "x.jpg", "-f", "npy"], 2, "Error: --format npy is binary; give --output FILE (only jsonl goes to stdout)"),
    (["embed", "x.jpg", "-f", "csv"], 2, "Error: Invalid value for '--format' / '-f': 'csv' is not one of 'safetensors', 'npy', 'jsonl'. (`bit embed -h` lists the options)"),
    (["embed", "x.jpg", "-o", "x.npy", "--batch-size", "0"], 2, "Error: Invalid value for '--batch-size' / '-b': Input should be greater than or equal to 1 (`bit embed -h` lists the options)"),
    (["eval", "data", "-f", "csv"], 2, "Error: Invalid value for '--format' / '-f': 'csv' is not one of 'table', 'json'. (`bit eval -h` lists the options)"),
    (["eval", "data", "--device", "cuda:x"], 2, "Error: --device 'cuda:x': use auto, cpu, cuda, cuda:N or mps"),
    (["convert", "a", "b", "--dtype", "int8"], 2, "Error: Invalid value for '--dtype': 'int8' is not one of 'float32', 'float16', 'bfloat16'. (`bit convert -h` lists the options)"),
    (["convert", "a", "b", "--format", "tflite"], 2, "Error: Invalid value for '--format': 'tflite' is not one of 'bitcli', 'hf', 'timm', 'onnx'. (`bit convert -h` lists the options)"),
    (["convert", "a", "b.onnx", "--quantize", "int4"], 2, "Error: Invalid value for '--quantize': 'int4' is not one of 'int8'. (`bit convert -h` lists the options)"),
    (["convert", "a", "b.onnx", "--opset", "17"], 2, "Error: Invalid value for '--opset': Input should be greater than or equal to 18 (`bit convert -h` lists the options)"),
    (["finetune", "d", "-m", "tiny", "-o", "o", "--steps", "many"], 2, "Error: --steps 'many': use auto or a whole number"),
    (["finetune", "d", "-m", "tiny", "-o", "o", "--steps", "0"], 2, "Error: --steps 0: must be at least 1"),
    (["finetune", "d", "-m", "tiny", "-o", "o", "--batch-split", "x"], 2, "Error: --batch-split 'x': use auto or a whole number"),
    (["finetune", "d", "-m", "tiny", "-o", "o", "--eval-every", "-1"], 2, "Error: --eval-every -1: must be at least 0"),
    (["finetune", "d", "-m", "tiny", "-o", "o", "--save-every", "0"], 2, "Error: --save-every 0: must be at least 1"),
    (["finetune", "d", "-m", "tiny", "-o", "o", "--mixup", "nan"], 2, "Error: --mixup nan: must be a number >= 0"),
    (["finetune", "d", "-m", "tiny", "-o", "o", "--resolution", "8:16"], 2,
     "Error: --resolution '8:16': use auto, CROP (e.g. 128) or RESIZE:CROP with RESIZE >= CROP"),
    (["finetune", "d", "-m", "tiny", "-o", "o", "--device", "gpu"], 2, "Error: --device 'gpu': use auto, cpu, cuda, cuda:N or mps"),
    (["finetune", "d", "-m", "tiny", "-o", "o", "--val-split", "1.5"], 2, "Error: --val-split 1.5: use a fraction between 0 and 1 (both excluded), e.g. 0.1"),
    (["finetune", "d", "-m", "tiny", "-o", "o", "--val-split", "0"], 2, "Error: --val-split 0: use a fraction between 0 and 1 (both excluded), e.g. 0.1"),
    (["finetune", "d", "-m", "tiny", "-o", "o", "--val-split", "-0.2"], 2, "Error: --val-split -0.2: use a fraction between 0 and 1 (both excluded), e.g. 0.1"),
    (["finetune", "d", "-m", "tiny", "-o", "o", "--val-split", "nan"], 2, "Error: --val-split nan: use a fraction between 0 and 1 (both excluded), e.g. 0.1"),
    (["finetune", "d", "-m", "tiny", "-o", "o", "--val-split", "tenth"], 2, "Error: --val-split 'tenth': use a fraction between 0 and 1, e.g. 0.1"),
    # output paths that cannot be written (tests/test_safe_writes.py has the rest)
    (["predict", "x.jpg", "-o", "/"], 2, "Error: --output /: is a folder; give a file name"),
    (["eval", "d", "--plot", "/dev/null/c.png"], 2, "Error: --plot /dev/null/c.png: /dev/null is not a folder; choose another path"),
    (["finetune", "d", "-m", "tiny", "-o", "/dev/null/run"], 2, "Error: --output /dev/null/run: /dev/null is not a folder; choose another path"),
]  # fmt: skip


def test_version_and_bad_flag_values_answer_before_torch_is_imported(tmp_path):
    script = """
import contextlib, io, json, sys
from bitcli.cli import main
for args in json.loads(sys.argv[1]):
    sys.argv, err = ["bit", *args], io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            main()
        except SystemExit as exc:
            code = exc.code
    print(json.dumps([code, err.getvalue(), "torch" in sys.modules]))
"""
    args = json.dumps([a for a, _, _ in EARLY_ANSWERS])
    result = subprocess.run([sys.executable, "-c", script, args], capture_output=True, text=True, cwd=tmp_path)
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(answers) == len(EARLY_ANSWERS), result.stderr
    for (args, code, line), (got_code, err, torch_loaded) in zip(EARLY_ANSWERS, answers):
        assert (got_code, torch_loaded) == (code, False), (args, err)
        assert err == (line + "\n" if line else ""), (args, err)  # one line, the whole of stderr
    assert list(tmp_path.iterdir()) == []  # and nothing was written


def test_help_lists_the_allowed_values():
    auto = ["<auto|fp32|bf16|fp16>", "<auto|cpu|cuda|cuda:N|mps>"]
    expected = {
        "predict": ["<table|json|jsonl|csv>", *auto],
        "embed": ["<safetensors|npy|jsonl>", *auto],
        "eval": ["<table|json>", *auto],
        "finetune": [*auto, "--steps <auto|N>", "--batch-split <auto|N>", "--resolution <auto|CROP|RESIZE:CROP>",
                     "--mixup <auto|ALPHA>", "--eval-every <auto|N>", "--save-every <auto|N>"],
        "convert": ["<bitcli|hf|timm|onnx>", "<float32|float16|bfloat16>", "--quantize <int8>"],
    }  # fmt: skip
    for command, choices in expected.items():
        code, out, _ = run_main(command, "--help")
        assert code == 0 and all(c in out for c in choices), (command, out)


def test_workers_has_one_bound_and_one_default_everywhere():
    for command in ("predict", "embed", "eval", "finetune"):
        out = " ".join(run_main(command, "--help")[1].split())
        assert (
            f"--workers <int range> Image-decoding threads (0: decode in the main thread); results do not depend on it. [default: {DEFAULT_WORKERS}; x>=0]"
            in out
        ), command


def test_predict_gets_typed_options_by_keyword(monkeypatch):
    from bitcli.commands import predict

    seen = []
    monkeypatch.setattr(predict, "run", lambda opts: seen.append(opts) or 0)
    args = ["a.jpg", "b", "-m", "m", "--revision", "v1", "-k", "3", "-b", "8", "--device", "CUDA:1", "--precision", "BF16",
            "-f", "JSON", "-o", "out.json", "-r", "--workers", "0"]  # fmt: skip
    assert run_main("predict", *args) == (0, "", "")
    assert seen == [
        PredictOptions(
            images=["a.jpg", "b"],
            model="m",
            revision="v1",
            top_k=3,
            batch_size=8,
            device="cuda:1",
            precision=Precision.bf16,
            format=PredictFormat.json,
            output=Path("out.json"),
            recursive=True,
            workers=0,
        )
    ]
    assert run_main("predict", "x.jpg") == (0, "", "")
    assert seen[-1] == PredictOptions(images=["x.jpg"])  # the defaults


def test_predict_format_comes_from_the_output_suffix(monkeypatch):
    from bitcli.commands import predict

    seen = []
    monkeypatch.setattr(predict, "run", lambda opts: seen.append(opts.format) or 0)
    for name in ("p.csv", "p.NDJSON", "p.Json", "p.txt"):
        assert run_main("predict", "x.jpg", "-o", name)[0] == 0
    assert run_main("predict", "x.jpg")[0] == 0
    assert seen == [
        PredictFormat.csv,
        PredictFormat.jsonl,
        PredictFormat.json,
        PredictFormat.table,
        PredictFormat.table,
    ]


def test_output_formats_from_suffixes_have_one_table():
    """predict's and embed's --output and convert's DST: the suffix names the format in any case (options)."""
    from bitcli.options import ConvertFormat, ConvertOptions, EmbedFormat, convert_format, embed_format, predict_format

    assert [predict_format(None, Path(n)) for n in ("a.JSONL", "a.ndjson", "a.csv", "a.json", "a.png")] == [
        "jsonl", "jsonl", "csv", "json", "table",
    ]  # fmt: skip
    assert [embed_format(None, Path(n)) for n in ("a.NPY", "a.Safetensors", "a.ndjson")] == [
        EmbedFormat.npy, EmbedFormat.safetensors, EmbedFormat.jsonl,
    ]  # fmt: skip
    dsts = {"m.safetensors": "bitcli", "m.ONNX": "onnx", "m.Onnx": "onnx", "folder": "hf", "m.npz": "hf"}
    assert {name: convert_format(None, Path(name)) for name in dsts} == dsts
    assert convert_format(ConvertFormat.timm, Path("m.onnx")) == "timm"
    # the ONNX flags are checked against the same answer
    assert ConvertOptions(src="a", dst=Path("m.ONNX"), opset=18).opset == 18
    for name in ("m.safetensors", "folder"):
        with pytest.raises(UsageError, match=r"^--opset applies only to an ONNX export; name DST \*\.onnx$"):
            ConvertOptions(src="a", dst=Path(name), opset=18)


def test_choices_are_case_insensitive_and_reach_commands_in_lower_case(monkeypatch, tmp_path):
    """`-f JSON`, `--precision FP32`, `--dtype Float16`, `--format HF`: the commands get the lower-case values."""
    from bitcli.commands import convert, finetune, predict
    from bitcli.commands import eval as evaluate

    seen = {}
    monkeypatch.setattr(predict, "run", lambda opts: seen.setdefault("predict", (opts.precision, opts.format)) and 0)
    monkeypatch.setattr(evaluate, "run", lambda opts: seen.setdefault("eval", (opts.precision, opts.format)) and 0)
    monkeypatch.setattr(convert, "run", lambda *a, **kw: seen.setdefault("convert", _convert_choices(a, kw)))
    monkeypatch.setattr(finetune, "run", lambda opts: seen.setdefault("finetune", opts.precision))
    assert run_main("predict", "x.jpg", "-f", "JSON", "--precision", "FP32")[0] == 0
    assert run_main("eval", tmp_path, "-f", "Json", "--precision", "Bf16")[0] == 0
    assert run_main("convert", "a", tmp_path / "b", "--format", "HF", "--dtype", "Float16")[0] == 0
    assert run_main("finetune", tmp_path, "-m", "tiny", "-o", tmp_path / "run", "--precision", "FP16")[0] == 0
    assert seen == {
        "predict": ("fp32", "json"),
        "eval": ("bf16", "json"),
        "convert": ("hf", "float16"),
        "finetune": "fp16",
    }


def _convert_choices(args: tuple, kwargs: dict) -> tuple[str, str]:
    """(format, dtype) from convert.run's arguments: the old positional call or run(opts)."""
    if args and not kwargs and len(args) == 7:
        return args[2], args[4]
    opts = kwargs.get("opts", args[0] if args else None)
    return opts.format, opts.dtype


def test_finetune_gets_typed_options_by_keyword(monkeypatch, tmp_path):
    """`auto|N` flags arrive parsed (None: auto), choices as Enums: finetune.run(FinetuneOptions)."""
    from bitcli.commands import finetune

    seen = []
    monkeypatch.setattr(finetune, "run", seen.append)
    base = ["finetune", tmp_path, "-m", "tiny", "-o", tmp_path / "run"]
    assert run_main(*base, "--steps", "7", "--batch-split", "2", "--resolution", "16", "--mixup", "0.4",
                    "--eval-every", "0", "--save-every", "3", "--device", "CPU", "--workers", "0", "--precision", "BF16",
                    "--shots", "5", "--val-split", "0.25", "--lr", "0.01", "-b", "64", "--seed", "3", "--random-init",
                    "--resume", "--revision", "v2", "--head-only") == (0, "", "")  # fmt: skip
    assert run_main(*base) == (0, "", "")
    assert seen == [
        FinetuneOptions(
            data=tmp_path,
            model="tiny",
            output=tmp_path / "run",
            shots=5,
            val_split=0.25,
            steps=7,
            lr=0.01,
            batch_size=64,
            batch_split=2,
            resolution=Resolution(20, 16),
            mixup=0.4,
            seed=3,
            device="cpu",
            precision=Precision.bf16,
            workers=0,
            eval_every=0,
            save_every=3,
            resume=True,
            random_init=True,
            revision="v2",
            head_only=True,
        ),
        FinetuneOptions(data=tmp_path, model="tiny", output=tmp_path / "run"),  # the defaults: every auto flag None
    ]
    assert seen[1].resolution is None and parse_resolution("16") == seen[0].resolution
