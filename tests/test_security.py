"""Static guarantees over the package source: nothing is unpickled, no remote code is trusted."""

from __future__ import annotations

import ast
from pathlib import Path

import bitcli

SOURCES = sorted(Path(bitcli.__file__).parent.rglob("*.py"))  # sub-packages too (bitcli/finetune/)


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
            yield owner, name, {kw.arg: kw.value for kw in node.keywords}, node


def test_sources_were_found():
    found = {p.relative_to(Path(bitcli.__file__).parent).as_posix() for p in SOURCES}
    assert found >= {"cli.py", "formats/raw.py", "formats/npz.py", "hub.py", "model.py", "commands/predict.py"}


def test_no_unpickling_anywhere():
    offenders = []
    for path in SOURCES:
        for owner, name, kwargs, node in _calls(ast.parse(path.read_text())):
            where = f"{path.name}:{node.lineno}"
            if owner in ("pickle", "cPickle", "dill", "joblib") and name in ("load", "loads"):
                offenders.append(f"{where} {owner}.{name}")
            if owner == "torch" and name == "load":
                flag = kwargs.get("weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    offenders.append(f"{where} torch.load without weights_only=True")
            if owner == "np" and name == "load":
                flag = kwargs.get("allow_pickle")
                if not (isinstance(flag, ast.Constant) and flag.value is False):
                    offenders.append(f"{where} np.load without allow_pickle=False")
    assert offenders == []


def test_no_remote_code():
    for path in SOURCES:
        assert "trust_remote_code" not in path.read_text(), path.name
        builtins_called = {
            name for owner, name, _, node in _calls(ast.parse(path.read_text())) if isinstance(node.func, ast.Name)
        }
        assert not builtins_called & {"eval", "exec", "compile", "__import__"}, path.name
