"""The import structure of bitcli/, read from the source with ast: no import circle (lazy imports inside functions
count; `if TYPE_CHECKING:` blocks do not), no command module imported from below the CLI, and every import going
down the layers (or staying in its layer):

    commands (and the CLI) -> pipeline / engines / evaluation / export / training -> formats / sources / hub / data
    -> model / preprocess / options and the other libraries -> errors / ui / writes / reads / extras

A module that is in no layer yet fails the test too: a new module is placed on purpose.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import bitcli

ROOT = Path(bitcli.__file__).parent
TOP = 4
# The layer of every module; a package's name covers its submodules unless they are named themselves.
LAYERS = {
    "bitcli": 0, "bitcli.errors": 0, "bitcli.ui": 0, "bitcli.writes": 0, "bitcli.reads": 0, "bitcli.extras": 0,
    "bitcli.fonts": 0,
    "bitcli.config": 1, "bitcli.architectures": 1, "bitcli.hyperrule": 1, "bitcli.labels": 1, "bitcli.model": 1,
    "bitcli.preprocess": 1, "bitcli.options": 1, "bitcli.tool_options": 1, "bitcli.output_checks": 1, "bitcli.cli_options": 1, "bitcli.images": 1, "bitcli.runtime": 1,
    "bitcli.distributed": 1, "bitcli.render": 1, "bitcli.metrics": 1, "bitcli.plots": 1, "bitcli.pages": 1, "bitcli.urls": 1,
    "bitcli.hubnames": 1, "bitcli.scores": 1, "bitcli.multilabel": 1,
    "bitcli.formats": 2, "bitcli.sources": 2, "bitcli.hub": 2, "bitcli.data": 2, "bitcli.hub_upload": 2,
    "bitcli.inputs": 3, "bitcli.gpu_decode": 3, "bitcli.pipeline": 3, "bitcli.engine": 3, "bitcli.torch_engine": 3,
    "bitcli.onnx_engine": 3, "bitcli.evaluation": 3, "bitcli.export": 3, "bitcli.quantize": 3, "bitcli.finetune": 3,
    "bitcli.modelcard": 3, "bitcli.gallery": 3, "bitcli.server": 3,
    "bitcli.audit": 3,
    "bitcli.commands": TOP, "bitcli.cli": TOP, "bitcli.cli_tools": TOP, "bitcli.__main__": TOP,
}  # fmt: skip
COMMANDS = "bitcli.commands"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """The nodes inside `if TYPE_CHECKING:` blocks: annotations only, never run."""
    return {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for stmt in block.body
        for node in ast.walk(stmt)
    }


def _known(name: str) -> str | None:
    """`name`, or the closest package above it that is a module of bitcli (None: not bitcli's)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    """The bitcli modules an import statement runs: the module named, each package above it that is not the
    importing module's own (importing a.b.c runs a/b/__init__.py), and for `from X import name` the submodule
    X.name where there is one."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{base}" if base else package
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
    found = set()
    for name in names:
        target = _known(name)
        while target is not None:
            if target != module and not module.startswith(target + "."):
                found.add(target)
            target = _known(target.rpartition(".")[0]) if "." in target else None
    return found


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        skip = _type_checking_nodes(tree)
        graph[module] = {
            target
            for node in ast.walk(tree)
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in skip
            for target in _targets(module, node)
        }
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def layer(module: str) -> int | None:
    while module:
        if module in LAYERS:
            return LAYERS[module]
        module = module.rpartition(".")[0]
    return None


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_the_graph_sees_lazy_imports_and_packages(graph):
    """The reader itself: a function-level import is an edge, a TYPE_CHECKING one is not, and importing a
    module runs the packages above it (but not the importer's own)."""
    assert "bitcli.commands.predict" in graph["bitcli.cli"]  # imported inside the Typer function
    assert "bitcli.formats" in graph["bitcli.onnx_engine"]  # from bitcli.formats.onnx import ...: runs formats/__init__
    assert "bitcli.formats.onnx" in graph["bitcli.formats"] and "bitcli.formats" not in graph["bitcli.formats.onnx"]
    assert "bitcli.finetune.plan" not in graph["bitcli.finetune.rundir"]  # only under TYPE_CHECKING
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circles(graph):
    assert cycles(graph) == []


def test_no_module_below_the_cli_imports_a_command(graph):
    offenders = sorted(
        f"{module} -> {target}"
        for module, targets in graph.items()
        if module not in ("bitcli.cli", "bitcli.cli_tools")
        and module != COMMANDS
        and not module.startswith(COMMANDS + ".")
        for target in targets
        if target == COMMANDS or target.startswith(COMMANDS + ".")
    )
    assert offenders == []


def test_every_module_has_a_layer_and_imports_only_downwards(graph):
    assert sorted(m for m in graph if layer(m) is None) == []
    upward = sorted(
        f"{module} (layer {layer(module)}) -> {target} (layer {layer(target)})"
        for module, targets in graph.items()
        for target in targets
        if layer(target) > layer(module)
    )
    assert upward == []
