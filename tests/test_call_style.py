"""Calls say what they pass (issue 21): no call of bitcli's own functions, methods or classes with more than
four positional arguments (pass the rest by keyword, or make them keyword-only with `*`), and no `**kwargs`
sink in bitcli's own definitions. Read from the source with ast: a call is matched to bitcli by the name it
calls (`f(...)`, `obj.f(...)`), so a call of another library's function that shares a name with one of
bitcli's counts too (none does today)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "bitcli"
MAX_POSITIONAL = 4

# "FILE:NAME" allows the calls of NAME in FILE (none since issue 21's pipeline restructuring was merged). An entry
# that no longer matches a call fails the test, so that the list only ever shrinks.
ALLOWED_CALLS: set[str] = set()
# "FILE:NAME" definitions allowed more than four positional parameters: the Typer commands, whose parameters
# are the command line's options and which only Typer calls (by keyword).
ALLOWED_SIGNATURES = (
    {f"bitcli/cli.py:{name}" for name in ("predict", "embed", "convert", "finetune", "eval_", "explain")}
    | {f"bitcli/cli_tools.py:{name}" for name in ("push", "serve", "audit")}
    | {"bitcli/urls.py:redirect_request"}
)  # an override: urllib.request.HTTPRedirectHandler calls it positionally
# `def f(..., **kwargs)` in these files is allowed for the same reason (none today).
ALLOWED_KWARGS: set[str] = set()

FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)


def parse(files: list[Path], root: Path) -> dict[str, ast.Module]:
    return {f.relative_to(root).as_posix(): ast.parse(f.read_text(encoding="utf-8"), str(f)) for f in files}


def defined_names(trees: dict[str, ast.Module]) -> set[str]:
    """Every function, method and class that the package defines, at any depth."""
    return {n.name for tree in trees.values() for n in ast.walk(tree) if isinstance(n, (*FUNCTIONS, ast.ClassDef))}


def called_name(call: ast.Call) -> str | None:
    if isinstance(call.func, ast.Name):
        return call.func.id
    if isinstance(call.func, ast.Attribute):
        return call.func.attr
    return None


def called(call: ast.Call) -> tuple[str | None, int]:
    """(name called, positional count); `partial(f, a, b)` is a call of f with a and b (the rest come later,
    but the ones bound here are already in order)."""
    if called_name(call) == "partial" and call.args:
        inner = ast.Call(func=call.args[0], args=call.args[1:], keywords=[])
        return called_name(inner), len(call.args) - 1
    return called_name(call), len(call.args)


def long_calls(trees: dict[str, ast.Module]) -> list[tuple[str, str, int, int]]:
    """(file, called name, line, positional count) of each call of a defined name with too many positionals."""
    names = defined_names(trees)
    found = []
    for path, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name, n = called(node)
                if name in names and n > MAX_POSITIONAL:
                    found.append((path, name, node.lineno, n))
    return sorted(found)


def long_signatures(trees: dict[str, ast.Module]) -> list[tuple[str, str, int, int]]:
    """(file, function, line, count) of each definition taking more than four parameters positionally (self
    and cls not counted): the ones after the fourth should be keyword-only (`*`), so no call can pass them
    in an order that silently swaps two of them."""
    found = []
    for path, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, FUNCTIONS):
                params = [a for a in node.args.posonlyargs + node.args.args if a.arg not in ("self", "cls")]
                if len(params) > MAX_POSITIONAL:
                    found.append((path, node.name, node.lineno, len(params)))
    return sorted(found)


def kwargs_sinks(trees: dict[str, ast.Module]) -> list[tuple[str, str, int]]:
    """(file, function, line) of each definition (lambdas too) that takes **kwargs."""
    found = []
    for path, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, (*FUNCTIONS, ast.Lambda)) and node.args.kwarg is not None:
                found.append((path, getattr(node, "name", "<lambda>"), node.lineno))
    return sorted(found)


@pytest.fixture(scope="module")
def trees() -> dict[str, ast.Module]:
    return parse(sorted(PACKAGE.rglob("*.py")), ROOT)


def test_no_call_of_bitcli_passes_more_than_four_positional_arguments(trees) -> None:
    calls = long_calls(trees)
    bad = [f"{path}:{line}: {name}() with {n} positional arguments" for path, name, line, n in calls
           if f"{path}:{name}" not in ALLOWED_CALLS]  # fmt: skip
    assert not bad, "pass the arguments after the fourth by keyword:\n" + "\n".join(bad)
    stale = ALLOWED_CALLS - {f"{path}:{name}" for path, name, _, _ in calls}
    assert not stale, f"no longer needed: remove from ALLOWED_CALLS: {sorted(stale)}"


def test_no_definition_takes_more_than_four_positional_parameters(trees) -> None:
    defs = long_signatures(trees)
    bad = [f"{path}:{line}: {name}() takes {n} parameters positionally" for path, name, line, n in defs
           if f"{path}:{name}" not in ALLOWED_SIGNATURES]  # fmt: skip
    assert not bad, "make the parameters after the fourth keyword-only (`*`):\n" + "\n".join(bad)
    stale = ALLOWED_SIGNATURES - {f"{path}:{name}" for path, name, _, _ in defs}
    assert not stale, f"no longer needed: remove from ALLOWED_SIGNATURES: {sorted(stale)}"


def test_partial_counts_as_a_call() -> None:
    """functools.partial(f, ...) binds positional arguments as a call does: it is counted as one."""
    tree = ast.parse(
        "def f(a, b, c, d, e, g): ...\nimport functools\nfunctools.partial(f, 1, 2, 3, 4, 5)\npartial(f, 1)\n"
    )
    assert long_calls({"x.py": tree}) == [("x.py", "f", 3, 5)]


def test_no_kwargs_sinks_in_bitcli(trees) -> None:
    sinks = kwargs_sinks(trees)
    bad = [f"{path}:{line}: def {name}(..., **...)" for path, name, line in sinks if path not in ALLOWED_KWARGS]
    assert not bad, "name the parameters instead of taking **kwargs:\n" + "\n".join(bad)
    assert not ALLOWED_KWARGS - {path for path, _, _ in sinks}, "remove stale entries from ALLOWED_KWARGS"


def test_the_checks_find_what_they_look_for(tmp_path: Path) -> None:
    """The checks themselves, on a small package: a long call of its own function, a method, a class, and a
    **kwargs sink are found; a long call of a function it does not define, and a keyword call, are not."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text(
        "import os\n"
        "def f(a, b, c, d, e): ...\n"
        "class K:\n"
        "    def m(self, *args, **options): ...\n"
        "def g(x):\n"
        "    f(1, 2, 3, 4, 5)\n"
        "    f(1, 2, 3, 4, e=5)\n"
        "    x.m(1, 2, 3, 4, 5, 6)\n"
        "    os.path.join(1, 2, 3, 4, 5)\n"
        "    return K(1, 2, 3, 4, *x)\n"
        "h = lambda **kw: kw\n"
    )
    trees = parse([tmp_path / "pkg" / "a.py"], tmp_path)
    assert long_calls(trees) == [("pkg/a.py", "K", 10, 5), ("pkg/a.py", "f", 6, 5), ("pkg/a.py", "m", 8, 6)]
    assert kwargs_sinks(trees) == [("pkg/a.py", "<lambda>", 11), ("pkg/a.py", "m", 4)]
