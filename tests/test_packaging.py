"""How a checkout is installed: the editable install that .ci/venv makes is warning-free, and the demo's venv
gets what the demo runs and not the test stack (.ci/run adds that)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

BUILD_EDITABLE = """
import json, sys, warnings
from setuptools import build_meta

out, report = sys.argv[1:]  # (the hook sets sys.argv for setup())
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    wheel = build_meta.build_editable(out)
with open(report, "w") as f:
    json.dump({"wheel": wheel, "warnings": [f"{w.category.__name__}: {w.message}" for w in caught]}, f)
"""


def test_editable_install_is_warning_free_and_names_the_checkout(tmp_path: Path) -> None:
    """setuptools' PEP 660 hook (what `pip install -e .` calls) on a copy of the checkout, with the build/ and
    runs/ folders a used checkout has: no warning (a flat layout got an import hook and a "Please be careful
    with folders in your working directory" block on every install), and the .pth names the checkout."""
    checkout = tmp_path / "checkout"
    shutil.copytree(ROOT / "bitcli", checkout / "bitcli", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, checkout / name)
    (checkout / "runs" / "bitcli").mkdir(parents=True)
    (checkout / "build" / "lib").mkdir(parents=True)
    (tmp_path / "dist").mkdir()
    result = subprocess.run(
        [sys.executable, "-c", BUILD_EDITABLE, str(tmp_path / "dist"), str(tmp_path / "result.json")],
        cwd=checkout,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    built = json.loads((tmp_path / "result.json").read_text())
    assert built["warnings"] == []
    with zipfile.ZipFile(tmp_path / "dist" / built["wheel"]) as wheel:
        pth = [name for name in wheel.namelist() if name.endswith(".pth")]
        assert pth == ["__editable__.bitcli-0.1.0.pth"]
        assert wheel.read(pth[0]).decode().splitlines() == [str(checkout)]


FAKE_PYTHON3 = """#!/usr/bin/env bash
# `python3 -m venv DIR` makes DIR/bin/python, which records its arguments instead of running pip.
set -eu
mkdir -p "$3/bin"
printf '#!/usr/bin/env bash\\necho "$*" >> %s\\n' "$CALLS" > "$3/bin/python"
chmod +x "$3/bin/python"
"""


def venv_installs(tmp_path: Path, *mode: str) -> tuple[int, list[str], str]:
    """`bash .ci/venv MODE` with a python3 whose venvs record what pip is asked to do: (exit code, pip's
    arguments one call a line, stderr)."""
    fake = tmp_path / "fake"
    fake.mkdir(exist_ok=True)
    (fake / "python3").write_text(FAKE_PYTHON3)
    (fake / "python3").chmod(0o755)
    calls = tmp_path / f"calls-{'-'.join(mode)}.txt"
    env = {"PATH": f"{fake}:/usr/bin:/bin", "BITCLI_VENV": str(tmp_path / "venv"), "CALLS": str(calls)}
    result = subprocess.run(["bash", str(ROOT / ".ci" / "venv"), *mode], env=env, capture_output=True, text=True)
    return result.returncode, calls.read_text().splitlines() if calls.exists() else [], result.stderr


def test_demo_venv_installs_what_the_demo_runs_and_run_adds_the_test_extras(tmp_path: Path) -> None:
    pip = "-m pip --quiet --disable-pip-version-check install"
    setup = [f"{pip} --upgrade pip", f"{pip} torch==2.14.1 torchvision==0.29.1"]
    assert venv_installs(tmp_path) == (0, [*setup, f"{pip} -e .[plots] scikit-learn>=1.3"], "")
    assert venv_installs(tmp_path, "test") == (0, [*setup, f"{pip} -e .[test]"], "")
    assert venv_installs(tmp_path, "tests") == (2, [], "usage: bash .ci/venv [demo|test]\n")
    assert "bash .ci/venv test\n" in (ROOT / ".ci" / "run").read_text()


FAKE_VENV_PYTHON3 = """#!/usr/bin/env bash
# `python3 -m venv DIR` makes DIR/bin/python and DIR/bin/bit, which record their arguments instead of running.
set -eu
mkdir -p "$3/bin"
for tool in python bit; do
    printf '#!/usr/bin/env bash\\necho "%s $*" >> "$CALLS"\\n' "$tool" > "$3/bin/$tool"
    chmod +x "$3/bin/$tool"
done
"""


def test_demo_takes_relative_dirs_from_where_it_is_started(tmp_path: Path) -> None:
    """Review of issue 20: the demo changes to the checkout first, so `DEMO_DIR=out bash .../digits_demo.sh`
    wrote into the checkout's out/ (and a relative BITCLI_VENV made the venv there), not where the user
    stood. Run with a python3 whose venvs record each command: every path is the caller's."""
    fake, caller = tmp_path / "fake", tmp_path / "caller"
    fake.mkdir()
    (fake / "python3").write_text(FAKE_VENV_PYTHON3)
    (fake / "python3").chmod(0o755)
    (caller / "out").mkdir(parents=True)  # (the fake export writes nothing; eval's JSON goes to out/eval.json)
    calls = tmp_path / "calls.txt"
    env = {"PATH": f"{fake}:/usr/bin:/bin", "CALLS": str(calls), "DEMO_DIR": "out", "BITCLI_VENV": "venv"}
    result = subprocess.run(
        ["bash", str(ROOT / "examples" / "digits_demo.sh")], cwd=caller, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert (caller / "venv" / "bin" / "python").is_file() and not (ROOT / "venv").exists()
    ran = calls.read_text().splitlines()
    assert f"python examples/export_digits.py {caller}/out/digits --size 32" in ran
    assert [line.split(" --")[0] for line in ran if line.startswith("bit ")] == [
        f"bit finetune {caller}/out/digits",
        f"bit eval {caller}/out/digits/test",
        f"bit eval {caller}/out/digits/test",
        "bit predict " + " ".join(f"{caller}/out/digits/test/{digit}/*.png" for digit in (3, 5, 8)),
        f"bit report {caller}/out/model",
    ]
