"""The output-path checks every command runs while its command line is read (exit 2, before any work): an
output that cannot be written, a page folder holding the user's files, an output that is one of the inputs
or lies inside an image folder being read.

Like bitcli.options, this module imports neither torch nor any command module.
"""

from __future__ import annotations

import os
from pathlib import Path

from bitcli.errors import BitError, UsageError
from bitcli.options import DataSpec, EmbedFormat, paths_file
from bitcli.pages.folder import refusal as page_folder_refusal
from bitcli.ui import display
from bitcli.writes import model_files_in, refuse_replacing_input, unwritable


def check_output(flag: str, path: Path | None, folder: bool = False) -> None:
    """Refuse (exit 2, before any work) an output path that the write at the end could not make:
    a folder where the file goes, a parent that is a file, a folder that cannot be written in."""
    if path is None:
        return
    reason = unwritable(path, folder)
    if reason is not None:
        raise UsageError(f"{flag} {display(path)}: {reason}")


def check_page_folder(flag: str, path: Path | None, data: DataSpec | None = None, *, kind: str | None = None,
                      removed_first: bool = False) -> None:  # fmt: skip
    """Refuse (exit 2, before any work) a folder a page cannot be written into (bitcli.pages.folder): a file,
    a folder that cannot be written in, a folder holding files bitcli did not write or another command's page
    (`kind`: the command writing it); and one inside the image folder `data`, where its pictures would be taken
    for images by the next run."""
    if path is None:
        return
    reason = page_folder_refusal(path, kind, removed_first=removed_first)
    if reason is None and isinstance(data, Path) and data.is_dir():
        inside = _within(path, data)
        reason = f"is inside the image folder {display(data)}; choose a folder outside it" if inside else None
    if reason is not None:
        raise UsageError(f"{flag} {display(path)}: {reason}")


def check_model_folder(flag: str, path: Path) -> None:
    """Refuse (exit 2, before any work) an existing folder that a model folder is later written into (bit
    finetune --keep-best's RUN/best) when it holds anything but model files (bitcli.writes.model_files_in): the
    write would refuse it after the run had removed or replaced its other files."""
    if not (path.exists() or path.is_symlink()):
        return
    try:
        model_files_in(path)
    except BitError as exc:
        raise UsageError(f"{flag}: {exc} (or move it out of {display(path)})") from None


def check_label_output(flag: str, path: Path | None) -> None:
    """check_output for a label file bitcli writes (--write-clean): a .csv or a .jsonl."""
    if path is not None and path.suffix.lower() not in (".csv", ".jsonl"):
        raise UsageError(f"{flag} {display(path)}: name a .csv file (a label file: path,label[,split]) or a .jsonl "
                         "file (a JSON object a row; multi-label data needs it)")  # fmt: skip
    check_output(flag, path)


def check_outside_data(flag: str, path: Path | None, sources: tuple[DataSpec | None, ...]) -> None:
    """Refuse (exit 2, before any work) an output file that is one of the data sources being read (however
    spelt: ../, a symlink) or lies inside an image folder among them, where it would change the data."""
    if path is None:
        return
    local = [Path(s) for s in sources if isinstance(s, Path)]
    # a FILE:SPLIT source reads FILE
    refuse_replacing_input(flag, path, local + [Path(str(s).rpartition(":")[0]) for s in local if ":" in s.name])
    for folder in (s for s in local if s.is_dir()):
        if _within(path, folder):
            raise UsageError(f"{flag} {display(path)}: is inside the image folder {display(folder)}, which it would "
                             "change; choose a file outside it")  # fmt: skip


def check_plot_outside_report(plot: Path | None, report: Path | None) -> None:
    """Refuse (exit 2) eval's --plot inside its --report folder, which takes no file the report does not write."""
    if plot is not None and report is not None and _within(plot, report):
        raise UsageError(
            f"--plot {display(plot)}: is inside the --report folder {display(report)}, which holds only the "
            "report's files (its confusion matrix included); write the picture elsewhere"
        )


def check_explain_output_outside_inputs(output: Path, folders: list[str]) -> None:
    """Refuse (exit 2) explain's --output inside a folder it reads recursively: the next run would explain
    its own overlays."""
    for arg in folders:
        if arg != "-" and Path(arg).is_dir() and _within(output, Path(arg)):
            raise UsageError(f"--output {display(output)}: is inside the image folder {display(arg)}; "
                             "choose a folder outside it")  # fmt: skip


def _within(path: Path, folder: Path) -> bool:
    """`path` lies inside `folder` (links resolved)."""
    return Path(os.path.realpath(folder)) in Path(os.path.realpath(path)).parents


def check_embed_output(fmt: EmbedFormat, output: Path | None) -> None:
    """check_output for embed: FILE.npy, and FILE.paths.txt beside it (both are written, or neither)."""
    check_output("--output", output)
    if fmt == EmbedFormat.npy and output is not None:
        listing = paths_file(output)
        reason = unwritable(listing)
        if reason is not None:
            raise UsageError(f"--output {display(output)}: its paths go to {display(listing)}, which {reason}")
