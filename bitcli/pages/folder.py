"""The folder a page is written into (`bit eval --report DIR`, `bit explain -o DIR`, `bit finetune --report`'s
RUN/report): bitcli writes one only into a new or empty folder, or into the folder of an earlier page, which it
recognises by its marker file (MARKER, listing every file bitcli wrote there). A rerun replaces those files and
removes the ones the new page no longer has; it never deletes or replaces a file the marker does not list, so
what the user added to the folder stays. Every file goes through bitcli.writes (temporary name, then rename).

The marker also names the command that wrote the folder (`written_by`): another command's folder is refused
like a foreign one, so that `bit explain -o DIR` never replaces `bit eval --report DIR`'s page, nor the reverse.

Nothing is written or removed through a link inside the folder (a subfolder such as images/ replaced by a link
to a folder of the user's is refused, and its files are never touched): only the folder itself may be a link.

The marker is written first with the old and new names together, so a kill at any point leaves a folder that
the next run recognises, and whose every bitcli file is listed; the earlier page's files that this one lacks are
removed next, and the marker is rewritten last with the new names (and any old one that could not be removed).
A page written at once (write_page_folder) replaces the earlier page's files together, once all of the new ones
are complete on disk.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from bitcli.errors import BitError
from bitcli.ui import display, visible
from bitcli.writes import atomic_write, sync_folders, unwritable, write_together

MARKER = ".bitcli-page.json"
FORMAT = "bitcli-page/1"
# The commands that write page folders (the marker's `written_by`); finetune --report writes an eval report
EVAL_REPORT, EXPLAIN = "bit eval --report", "bit explain"
# A temporary file of a write that a kill interrupted (writes.atomic_write's .NAME.XXXXXXXX.tmp)
_LEFTOVER = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp")


def refusal(folder: Path, kind: str | None = None, *, removed_first: bool = False) -> str | None:
    """Why a page cannot be written into `folder`, or None: a new folder (whose parent takes it), an empty one,
    or an earlier page's (of command `kind`, when given). Checked while the command line is read, and again
    before writing. With `removed_first` the earlier page is removed before the new one is written (`bit
    finetune --overwrite`), which leaves no marker: then the folder must hold nothing but the earlier page."""
    reason = unwritable(folder, folder=True)
    if reason is not None or not folder.is_dir():
        return reason
    entries = sorted(p.name for p in folder.iterdir())
    if not entries:
        return None
    marker = _marker(folder)
    if marker is None:
        return (
            f"holds {display(entries[0])!r}, which bitcli did not write; give a new or empty folder, "
            "or the folder of an earlier report"
        )
    written_by, files = marker
    if kind is not None and written_by is not None and written_by != kind:
        return f"was written by {visible(written_by)}; give a new or empty folder, or one that {kind} wrote"
    linked = next(filter(None, (_link_on_the_way(folder, name) for name in files)), None)
    if linked is not None:
        return _linked_refusal(folder, linked)
    others = _unlisted(folder, files) if removed_first else []
    if others:
        return (
            f"holds {display(others[0])!r}, which bitcli did not write and --overwrite would leave in the new "
            "report's folder; move it out first"
        )
    return None


def _unlisted(folder: Path, files: list[str]) -> list[str]:
    """What `folder` holds besides the files its marker lists, the marker, their folders and the temporary
    files of killed writes (relative POSIX paths, sorted)."""
    ours = {*files, MARKER} | {p.as_posix() for f in files for p in PurePosixPath(f).parents} - {"."}
    found = []
    for top, dirs, names in os.walk(folder):  # links are listed, never followed
        here = PurePosixPath(Path(top).relative_to(folder).as_posix())
        for name in [*dirs, *names]:
            relative = (here / name).as_posix()
            m = _LEFTOVER.fullmatch(name)
            if relative not in ours and not (m and (here / m["name"]).as_posix() in ours):
                found.append(relative)
    return sorted(found)


def listed(folder: Path) -> list[str] | None:
    """The files an earlier page's marker lists (relative POSIX paths inside the folder), or None when the
    folder holds no marker of bitcli's (none, a link, unreadable, another format)."""
    marker = _marker(folder)
    return marker[1] if marker is not None else None


def _marker(folder: Path) -> tuple[str | None, list[str]] | None:
    """The command that wrote an earlier page (its marker's `written_by`, None when it names none) and the
    files it lists, or None."""
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
    written_by = data.get("written_by")
    return (written_by if isinstance(written_by, str) else None, [f for f in files if _inside(f)])


def _link_on_the_way(folder: Path, name: str) -> Path | None:
    """The first subfolder on the way from `folder` to its file `name` that is a link, or None."""
    here = folder
    for part in PurePosixPath(name).parent.parts:
        here = here / part
        if here.is_symlink():
            return here
    return None


def _linked_refusal(folder: Path, link: Path) -> str:
    return (
        f"its subfolder {display(link.relative_to(folder))!r} is a link, which bitcli neither writes nor removes "
        "through; replace the link by a folder or give another folder"
    )


def _linked_file(folder: Path, names: Iterable[str]) -> str | None:
    """The first of the page's file `names` that is a link in `folder` (written, the page would be written
    through it into whatever it points at), or None."""
    return next((name for name in names if (folder / name).is_symlink()), None)


def _linked_file_refusal(name: str) -> str:
    return (
        f"its file {display(name)!r} is a link, which bitcli did not make and would write through; remove the "
        "link or give another folder"
    )


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
        reason = refusal(folder, kind)
        planned = list(dict.fromkeys(names))
        bad = [name for name in planned if not _inside(name)]
        if bad:
            raise ValueError(f"page file names must be relative paths inside the folder: {bad}")
        linked = next(filter(None, (_link_on_the_way(folder, name) for name in planned)), None)
        if reason is None and linked is not None:
            reason = _linked_refusal(folder, linked)
        linked_file = _linked_file(folder, planned) if reason is None else None
        if linked_file is not None:
            reason = _linked_file_refusal(linked_file)
        if reason is not None:
            raise BitError(f"{display(folder)}: {reason}")
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
        """The earlier page's files that this one lacks removed, then the marker rewritten: it lists what was
        written, and any old file that could not be removed (an error line names it; a rerun tries again)."""
        written = list(dict.fromkeys(self.written))
        stale = [name for name in self.old if name not in set(written)]
        failed: list[tuple[str, OSError]] = []
        for name in stale:
            try:
                _remove(self.folder, name)
            except OSError as exc:
                failed.append((name, exc))
        _write_marker(self.folder, self.kind, [*written, *(name for name, _ in failed)])
        _remove_leftovers(self.folder, {*self.old, *self.planned})
        for sub in {PurePosixPath(n).parent for n in stale} - {PurePosixPath(".")}:
            _remove_empty(self.folder, sub)
        if failed:
            name, error = failed[0]
            more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
            raise BitError(
                f"{display(self.folder / name)}: cannot remove this file of the earlier page{more} "
                f"({error.strerror or error}); the new page is written; make it removable and run again"
            )


def write_page_folder(folder: Path, files: Mapping[str, bytes], kind: str) -> None:
    """`files` (relative POSIX path -> content) written into `folder` as a PageFolder, together
    (writes.write_together): each under a temporary name, all of them synced to disk, and only then renamed
    into place in one burst of renames, so that until the new page is complete on disk the earlier one stays
    whole, and a crash never leaves half of each. The folders are synced after the renames."""
    page = PageFolder(folder, kind, files)
    write_together([(page.path(name), _bytes_writer(data)) for name, data in files.items()])
    sync_folders(folder.joinpath(*PurePosixPath(name).parent.parts) for name in files)
    page.finish()


def _bytes_writer(data: bytes) -> Callable[[BinaryIO], None]:
    """A writer of `data` (a lambda in write_page_folder's loop would see the last file's data)."""

    def write(f: BinaryIO) -> None:
        f.write(data)

    return write


def _write_marker(folder: Path, kind: str, names: Iterable[str]) -> None:
    text = json.dumps({"format": FORMAT, "written_by": kind, "files": list(names)}, indent=1) + "\n"
    atomic_write(folder / MARKER, lambda f: f.write(text.encode("utf-8")))


def remove_page_folder(folder: Path) -> None:
    """The files an earlier page wrote into `folder` (its marker lists them), the marker, and the folder
    itself when nothing else is left in it; a folder without a marker is left alone. A file that cannot be
    removed (immutable, a read-only folder) stops it there with one line naming it: the marker stays, so a
    rerun takes up what is left."""
    marker = _marker(folder)
    if marker is None:
        return
    names = marker[1]
    try:
        for name in names:
            _remove(folder, name)
        _remove_leftovers(folder, set(names))
        for sub in sorted({PurePosixPath(n).parent for n in names}, key=lambda p: -len(p.parts)):
            if sub != PurePosixPath("."):
                _remove_empty(folder, sub)
        _remove(folder, MARKER)
        if folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()):
            folder.rmdir()
    except OSError as exc:
        where = display(exc.filename) if exc.filename else display(folder)
        raise BitError(
            f"{where}: cannot remove this file of the earlier page ({exc.strerror or exc}); make it removable "
            "(or move the folder away) and run again"
        ) from None


def _remove(folder: Path, name: str) -> None:
    """File `name` of `folder`, if it is a regular file that bitcli wrote: a link or a folder put in its place
    is the user's, and so is anything reached through a linked subfolder (kept)."""
    path = folder / name
    if _link_on_the_way(folder, name) is not None or path.is_symlink() or not path.is_file():
        return
    if os.path.realpath(path) != os.path.join(os.path.realpath(folder), *PurePosixPath(name).parts):
        return  # moved or linked while we looked: not provably ours
    path.unlink()


def _remove_empty(folder: Path, sub: PurePosixPath) -> None:
    """Subfolder `sub` of `folder` when it is empty (and a real folder reached through no link)."""
    path = folder.joinpath(*sub.parts)
    if _link_on_the_way(folder, (sub / "x").as_posix()) is not None:
        return
    try:
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    except OSError:  # cannot be removed (e.g. immutable): an empty folder is harmless
        pass


def _remove_leftovers(folder: Path, names: set[str]) -> None:
    """Temporary files of bitcli's own writes of `names` that a kill left behind."""
    for sub in {PurePosixPath(n).parent for n in names} | {PurePosixPath(".")}:
        where = folder.joinpath(*sub.parts)
        if not where.is_dir() or _link_on_the_way(folder, (sub / "x").as_posix()) is not None:
            continue
        for entry in where.iterdir():
            m = _LEFTOVER.fullmatch(entry.name)
            own = m and (sub / m["name"]).as_posix() in names | {MARKER}
            if own:
                _remove(folder, (sub / entry.name).as_posix())
