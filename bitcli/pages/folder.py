"""The folder a page is written into (`bit eval --report DIR`, `bit explain -o DIR`, `bit finetune --report`'s
RUN/report): bitcli writes one only into a new or empty folder, or into the folder of an earlier page, which it
recognises by its marker file (MARKER, listing every file bitcli wrote there). A rerun replaces those files and
removes the ones the new page no longer has; it never deletes or replaces a file the marker does not list, so
what the user added to the folder stays. Every file goes through bitcli.writes (temporary name, then rename).

The marker is written first with the old and new names together, so a kill at any point leaves a folder that
the next run recognises, and whose every bitcli file is listed; it is rewritten with the new names last.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath

from bitcli.errors import BitError
from bitcli.ui import display
from bitcli.writes import atomic_write, unwritable

MARKER = ".bitcli-page.json"
FORMAT = "bitcli-page/1"
# A temporary file of a write that a kill interrupted (writes.atomic_write's .NAME.XXXXXXXX.tmp)
_LEFTOVER = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp")


def refusal(folder: Path) -> str | None:
    """Why a page cannot be written into `folder`, or None: a new folder (whose parent takes it), an empty one,
    or an earlier page's. Checked while the command line is read, and again before writing."""
    reason = unwritable(folder, folder=True)
    if reason is not None or not folder.is_dir():
        return reason
    entries = sorted(p.name for p in folder.iterdir())
    if not entries or listed(folder) is not None:
        return None
    return (
        f"holds {display(entries[0])!r}, which bitcli did not write; give a new or empty folder, "
        "or the folder of an earlier report"
    )


def listed(folder: Path) -> list[str] | None:
    """The files an earlier page's marker lists (relative POSIX paths inside the folder), or None when the
    folder holds no marker of bitcli's (none, a link, unreadable, another format)."""
    path = folder / MARKER
    if path.is_symlink() or not path.is_file():
        return None
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    files = data.get("files") if isinstance(data, dict) and data.get("format") == FORMAT else None
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return None
    return [f for f in files if _inside(f)]


def _inside(name: str) -> bool:
    """A relative path that stays in the folder (a marker edited to name ../../x names nothing of ours)."""
    p = PurePosixPath(name)
    return bool(name) and not p.is_absolute() and ".." not in p.parts and "\\" not in name and name != MARKER


class PageFolder:
    """A page folder being written: `names` (relative POSIX paths) are what this page may write, listed in the
    marker beside an earlier page's files before any is written; `write` each (or `path` for a writer of its
    own that goes through bitcli.writes), then `finish`: the marker lists what was written, and the earlier
    page's files that were not written again are removed. `refusal` must accept the folder."""

    def __init__(self, folder: Path, kind: str, names: Iterable[str]) -> None:
        reason = refusal(folder)
        if reason is not None:
            raise BitError(f"{display(folder)}: {reason}")
        planned = list(dict.fromkeys(names))
        bad = [name for name in planned if not _inside(name)]
        if bad:
            raise ValueError(f"page file names must be relative paths inside the folder: {bad}")
        self.folder, self.kind, self.planned = folder, kind, set(planned)
        self.old = listed(folder) or []
        self.written: list[str] = []
        _write_marker(folder, kind, list(dict.fromkeys([*self.old, *planned])))

    def path(self, name: str) -> Path:
        """Where file `name` (one of the planned names) goes, counted as written."""
        if name not in self.planned:
            raise ValueError(f"{name}: not a planned file of this page")
        self.written.append(name)
        return self.folder / name

    def write(self, name: str, data: bytes) -> None:
        atomic_write(self.path(name), lambda f: f.write(data))

    def finish(self) -> None:
        written = list(dict.fromkeys(self.written))
        _write_marker(self.folder, self.kind, written)
        stale = set(self.old) - set(written)
        for name in sorted(stale):
            _remove(self.folder / name)
        _remove_leftovers(self.folder, {*self.old, *self.planned})
        for sub in {self.folder / PurePosixPath(n).parent for n in stale} - {self.folder}:
            _remove_empty(sub)


def write_page_folder(folder: Path, files: Mapping[str, bytes], kind: str) -> None:
    """`files` (relative POSIX path -> content) written into `folder` as a PageFolder."""
    page = PageFolder(folder, kind, files)
    for name, data in files.items():
        page.write(name, data)
    page.finish()


def _write_marker(folder: Path, kind: str, names: Iterable[str]) -> None:
    text = json.dumps({"format": FORMAT, "written_by": kind, "files": list(names)}, indent=1) + "\n"
    atomic_write(folder / MARKER, lambda f: f.write(text.encode("utf-8")))


def remove_page_folder(folder: Path) -> None:
    """The files an earlier page wrote into `folder` (its marker lists them), the marker, and the folder
    itself when nothing else is left in it; a folder without a marker is left alone."""
    names = listed(folder)
    if names is None:
        return
    for name in names:
        _remove(folder / name)
    _remove_leftovers(folder, set(names))
    _remove(folder / MARKER)
    for sub in sorted({folder / PurePosixPath(n).parent for n in names}, key=lambda p: -len(p.parts)):
        _remove_empty(sub)
    _remove_empty(folder)


def _remove(path: Path) -> None:
    """A regular file that bitcli wrote (a link or a folder put in its place is the user's: kept)."""
    if path.is_file() and not path.is_symlink():
        path.unlink()


def _remove_empty(folder: Path) -> None:
    if folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()):
        folder.rmdir()


def _remove_leftovers(folder: Path, names: set[str]) -> None:
    """Temporary files of bitcli's own writes of `names` that a kill left behind."""
    for sub in {folder / PurePosixPath(n).parent for n in names} | {folder}:
        if not sub.is_dir() or sub.is_symlink():
            continue
        for entry in sub.iterdir():
            m = _LEFTOVER.fullmatch(entry.name)
            own = m and (entry.relative_to(folder).parent / m["name"]).as_posix() in names | {MARKER}
            if own:
                _remove(entry)
