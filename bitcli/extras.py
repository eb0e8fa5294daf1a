"""The optional extras (`pip install 'bitcli[NAME]'`): which modules each one brings, and the one check that says
what to install when any of them is missing. Standard library only: `bit report` and the flag checks use it
without torch.

A use of an extra checks the modules that use imports (`require(..., modules=...)`), by default all of them:
someone who installed onnx and onnxruntime by hand, without the exporter's onnxscript, reads and runs an
exported `.onnx` (which needs no exporter), and an export gets the same one-line hint as someone who installed
none of them, never an internal error halfway through the export.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from bitcli.errors import BitError


@dataclass(frozen=True)
class Extra:
    modules: tuple[str, ...]  # every top-level module the extra installs that bitcli imports
    hint: str  # the error line; {what} is what needs it, {module} the first missing one, {install} the command


EXTRAS = {
    "onnx": Extra(("onnx", "onnxruntime", "onnxscript"), "{what} needs {module}, which is not installed: {install}"),
    "plots": Extra(("matplotlib",), "{what} needs {module}, which is not installed: {install}"),
    "tensorboard": Extra(("tensorboard",), "{what} needs the {module} package, which is not installed: {install}"),
    "datasets": Extra(("pyarrow",), "{what} needs {module}, which is not installed: {install}"),
    "audit": Extra(("cleanlab",), "{what} needs {module} (label issues), which is not installed: {install}"),
    "serve": Extra(
        ("starlette", "uvicorn", "python_multipart"), "{what} needs {module}, which is not installed: {install}"
    ),
}


def install(extra: str) -> str:
    """The command that installs `extra`."""
    return f"pip install 'bitcli[{extra}]'"


def missing(extra: str, modules: tuple[str, ...] | None = None) -> str | None:
    """The first module of `extra` (or of `modules`, some of its modules: what one use imports) that cannot be
    imported (looked up, not imported: milliseconds), or None."""
    if modules is not None and not set(modules) <= set(EXTRAS[extra].modules):
        raise ValueError(f"{modules} are not all modules of the {extra} extra")  # a mistake in bitcli itself
    for module in EXTRAS[extra].modules if modules is None else modules:
        try:
            if importlib.util.find_spec(module) is None:  # (None too when sys.modules holds None for it)
                return module
        except (ImportError, ValueError):  # a module without a spec, or a broken package
            return module
    return None


def available(extra: str) -> bool:
    return missing(extra) is None


def require(extra: str, what: str, modules: tuple[str, ...] | None = None) -> None:
    """Nothing when every module of `extra` (or of `modules`: the ones this use imports) is installed; else one
    line naming what to install (exit 1), to be said before any work is done."""
    module = missing(extra, modules)
    if module is not None:
        raise BitError(EXTRAS[extra].hint.format(what=what, module=module, install=install(extra)))
