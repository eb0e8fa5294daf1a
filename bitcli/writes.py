"""Writes that are crash-safe and never destroy what bitcli did not write: output files, model files, model folders.

A file is written to a temporary name beside it and renamed over it when complete, so a kill or a full disk
leaves the old file or the new one, never half of one. Only a regular file (or a new path) is renamed over:
a symlink is written through to the file it points to, and a FIFO, a terminal, /dev/null or /dev/stdout is
opened and written like any other program would (renaming over them would replace the link, leave the FIFO's
reader waiting forever, or replace a device node). Files that belong together (an array and its list of
paths, the files of a page) are all renamed into place only when every one is complete: both or neither. A model folder is
written file by file and only ever replaces model files (config.json, the weights, preprocessor_config.json),
never the user's other files. Whether an output can be written at all (`unwritable`) is checked before a
command's work, so that a folder in the way is found in a second, not after minutes of computing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bitcli.errors import BitError, UsageError, one_line
from bitcli.ui import display


class WriteFailed(BitError):
    """The disk refused a write (full, over quota, read-only, too large): the target was left as it was."""

    def __init__(self, target: Path, existed: bool, reason: str, kept: str | None = None) -> None:
        self.reason = reason
        if kept is None:
            kept = (
                f"the previous {'folder' if target.is_dir() else 'file'} is unchanged"
                if existed
                else "nothing was written"
            )
        super().__init__(f"{target}: cannot write it ({reason}); {kept}")


def atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """`write(f)` fills `path`; a write the disk refuses becomes one WriteFailed naming `path`.

    A regular file or a new path (also when reached through a symlink, which stays) is filled under a
    temporary name beside the file and renamed over it only when complete (removed on error); an existing
    file keeps its permissions. /dev/stdout, /dev/stderr and /dev/fd/N are written through the descriptor
    this process inherited. Anything else (a FIFO, a character device such as /dev/null) is opened and
    written directly, as is an existing writable file in a folder that does not let us create the
    temporary file (then a failed write leaves it incomplete, as a shell's `>` would)."""
    write_together([(path, write)])


@dataclass
class _Staged:
    """A file being written under a temporary name beside `target`, to be renamed over it."""

    path: Path  # as the caller named it (errors name it)
    target: Path  # the regular file, or new path, that the temporary file replaces (a symlink's target)
    existed: bool
    tmp: Path | None = None
    mode: int = 0o600  # the permissions the file gets (an existing file's own)
    renamed: bool = False


def write_together(files: Sequence[tuple[Path, Callable[[Any], None]]]) -> None:
    """Files that belong together (embed's FILE.npy and FILE.paths.txt), each written as atomic_write writes
    one: all of them are replaced, or none.

    Every file to be renamed into place is first filled under its temporary name; only when all are
    complete and on disk (fsync), and no folder has taken one of their names, are they renamed, one after the
    other (the renames take microseconds and cannot run out of space). A failure before that removes bitcli's
    temporary files and leaves every old file as it was. Files written directly (a FIFO, a device,
    /dev/stdout) are written after the others are complete."""
    staged: list[tuple[_Staged, Callable[[Any], None]]] = []
    direct: list[tuple[Path, Callable[[Any], None], int | None]] = []
    for path, write in files:
        path = Path(path)
        fd = _inherited_fd(path)
        target, atomic = (None, False) if fd is not None else _write_target(path)
        if atomic and target is not None:  # (atomic: a target)
            staged.append((_Staged(path, target, target.exists()), write))
        else:
            direct.append((path if target is None else target, write, fd))
    current: _Staged | None = None
    try:
        for current, write in staged:
            _fill_temporary(current, write)
        for current, error in zip([s for s, _ in staged], _synced([s.tmp for s, _ in staged])):
            if error is not None:
                raise error
            assert current.tmp is not None  # filled above
            os.chmod(current.tmp, current.mode)
        for path, write, fd in direct:
            _write_directly(path, write, fd)
        for current, _ in staged:
            if current.target.is_dir():  # a rename over it would fail after the others were renamed
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
        for current, _ in staged:
            assert current.tmp is not None  # filled above
            os.replace(current.tmp, current.target)
            current.renamed = True
    except BaseException as exc:
        for s, _ in staged:
            if s.tmp is not None and not s.renamed:
                s.tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and current is not None:
            kept = _kept([s for s, _ in staged], [p for p, _ in files])
            raise WriteFailed(current.path, current.existed, exc.strerror or one_line(exc), kept) from None
        raise


def _fill_temporary(staged: _Staged, write: Callable[[Any], None]) -> None:
    path, target = staged.path, staged.target
    if not path.is_symlink():  # a link's dangling target folder is not ours to create
        path.parent.mkdir(parents=True, exist_ok=True)
    # Given once the file is synced (mkstemp makes 0600: a read-only mode would keep the sync out)
    staged.mode = stat.S_IMODE(target.stat().st_mode) if staged.existed else 0o666 & ~_umask()
    fd, staged.tmp = _temporary_beside(target)
    with os.fdopen(fd, "wb") as f:
        write(f)


SYNC_THREADS = 8  # fsyncs in flight at once (write_together of many files: a page's pictures)


def _synced(paths: Sequence[Path | None]) -> list[OSError | None]:
    """Each file's data written to the disk (fsync) before a rename makes it visible, so that a crash leaves the
    old file or the whole new one, never an empty one; the error of each (None: synced). Many files are synced
    from a few threads at once: the file system commits concurrent fsyncs in one journal commit, so a page's
    1,200 small files cost a few commits instead of 1,200 one after the other (4 s of waiting on a busy disk)."""

    def sync(path: Path | None) -> OSError | None:
        assert path is not None  # filled
        try:
            fd = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))  # (Windows syncs only what it may write)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            return exc
        return None

    if len(paths) <= 1:
        return [sync(path) for path in paths]
    with ThreadPoolExecutor(min(SYNC_THREADS, len(paths)), thread_name_prefix="bitcli-fsync") as pool:
        return list(pool.map(sync, paths))


def sync_folders(folders: Iterable[Path]) -> None:
    """The folders' entries on disk (fsync of each folder): the renames into them survive a crash. (Windows
    opens no folder: there the file system's journal keeps the renames.)"""
    if not hasattr(os, "O_DIRECTORY"):
        return
    for folder in dict.fromkeys(folders):
        try:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            reason = exc.strerror or one_line(exc)
            raise WriteFailed(
                folder, True, reason, kept="its files are written, but a crash could still lose some"
            ) from None


def _temporary_beside(target: Path) -> tuple[int, Path]:
    """A new, empty file .NAME.XXXXXXXX.tmp in `target`'s folder (the same file system: a rename moves it)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    return fd, Path(tmp)


@contextlib.contextmanager
def replaced_when_complete(target: Path) -> Iterator[Path]:
    """A temporary file beside `target` for the block to fill by its name (a download) and check; when the
    block ends without an error the file is synced to disk and renamed over `target`, else removed. `target`
    (a new path or a regular file: a cache entry, never a user's output) is never seen half-written.
    For outputs, with their symlinks, FIFOs and devices, use atomic_write."""
    fd, tmp = _temporary_beside(target)
    os.close(fd)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a new file gets the usual permissions
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


NAMED_TOGETHER = 3  # files of a failed write_together named one by one in its error; beyond, counted


def _kept(staged: list[_Staged], paths: list[Path]) -> str | None:
    """What a failed write_together of several files left (None: WriteFailed's own words for one file)."""
    if len(paths) == 1:
        return None
    renamed = [str(s.path) for s in staged if s.renamed]
    if renamed and len(paths) > NAMED_TOGETHER:
        return f"only {len(renamed)} of the {len(paths)} files were replaced"
    if renamed:  # a rename refused after others succeeded (a race with another program): say which
        return f"only {' and '.join(renamed)} {'was' if len(renamed) == 1 else 'were'} replaced"
    if len(paths) > NAMED_TOGETHER:  # a page's files
        return f"nothing was written: the {len(paths)} files are as they were"
    return f"nothing was written: {' and '.join(map(str, paths))} are as they were"


def _write_target(path: Path) -> tuple[Path | None, bool]:
    """(the file to write, whether to write it through a temporary file and a rename)."""
    try:
        st = os.stat(path)  # follows symlinks
    except OSError:  # a new path (or a link to one): created atomically; other errors show when writing
        return Path(os.path.realpath(path)), True
    if not stat.S_ISREG(st.st_mode) and not stat.S_ISDIR(st.st_mode):  # FIFO, device, socket: never renamed over
        return None, False
    real = Path(os.path.realpath(path))
    if stat.S_ISREG(st.st_mode) and not os.access(real.parent, os.W_OK | os.X_OK) and os.access(real, os.W_OK):
        return real, False
    return real, True


_FD_LINK = re.compile(r"/dev/(stdout|stderr)|/dev/fd/(\d+)|/proc/(?:self|thread-self|\d+)/fd/(\d+)")


def _inherited_fd(path: Path) -> int | None:
    """The descriptor behind `path` when it is, or links to, /dev/stdout, /dev/stderr, /dev/fd/N or
    /proc/self/fd/N: whatever the shell opened there (a pipe, a terminal, `>> file`) is written through that
    descriptor, at its offset and in its mode. (os.path.realpath('/dev/stdout') names the file of `> file`:
    renaming over it, or reopening it with O_TRUNC, would lose what `>>` appends to.)"""
    p = os.path.abspath(path)
    for _ in range(40):  # the kernel's own limit on links followed
        m = _FD_LINK.fullmatch(p)
        if m and (not p.startswith("/proc/") or p.split("/")[2] in ("self", "thread-self", str(os.getpid()))):
            return {"stdout": 1, "stderr": 2}.get(m.group(1)) or int(m.group(2) or m.group(3))
        if not os.path.islink(p):
            return None
        p = os.path.normpath(os.path.join(os.path.dirname(p), os.readlink(p)))
    return None


def _write_directly(path: Path, write: Callable[[Any], None], fd: int | None = None) -> None:
    try:
        if fd is not None:
            if fd in (1, 2):  # what Python buffered for the same descriptor goes first
                (sys.stdout if fd == 1 else sys.stderr).flush()
            f = os.fdopen(os.dup(fd), "wb")
        else:
            f = open(path, "wb")  # a FIFO's open waits for its reader, as with any writer
        with f:
            write(f)
            f.flush()
    except OSError as exc:
        raise WriteFailed(path, True, exc.strerror or one_line(exc), kept="the output may be incomplete") from None


# ----------------------------------------------------------------------------------------------------------
# Before the work: can the output be written at the end?


def names_a_folder(text: str) -> str | None:
    """Why `text`, typed where a file is to be written, cannot name that file: a trailing separator names a
    folder (`out/`), and a Path drops it, so the file would be written as `out`. Checked on the text as typed,
    while the command line is read (bitcli.options' path parsers), before unwritable checks the path."""
    separators = (os.sep, os.altsep) if os.altsep else (os.sep,)
    if len(text) > 1 and text.endswith(separators):
        return f"ends in {text[-1]}, which names a folder; give a file name (without the trailing {text[-1]})"
    return None


def unwritable(path: Path, folder: bool = False) -> str | None:
    """Why the write of `path` (a file; with `folder`, a folder) at the end of a command would fail, or None.

    Checked before the work, so that a typo costs no minutes of computing: a folder where a file goes (or a
    file where a folder goes), a parent that is a file or a symlink to nothing, a folder this user cannot
    create files in (os.access: nothing is created or probed on disk; root passes it except on a read-only
    file system). Missing parent folders are fine: the write creates them. The write itself still goes
    through atomic_write at the end."""
    path = Path(path)
    if not folder and _inherited_fd(path) is not None:
        return None
    try:
        st = os.stat(path)  # follows symlinks: a link is written through
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
            return f"cannot be written ({exc.strerror})"
        if os.path.islink(path):
            return _dangling_link(path, folder)
        return _new_path(path)
    if stat.S_ISDIR(st.st_mode):
        if not folder:
            return "is a folder; give a file name"
        return None if os.access(path, os.W_OK | os.X_OK) else "is a folder that cannot be written in; choose another"
    if folder:
        return "is not a folder; give a folder name"
    real = os.path.realpath(path)
    if stat.S_ISREG(st.st_mode) and os.access(os.path.dirname(real), os.W_OK | os.X_OK):
        return None  # replaced by a rename
    return None if os.access(real, os.W_OK) else "cannot be written (no permission); choose another path"


def within(path: Path, folder: Path) -> bool:
    """Whether `path` is `folder` or lies inside it, symlinks resolved: the one rule for an output that must stay
    out of a data set's folder (finetune's run folder, eval's --plot)."""
    out, root = Path(path).resolve(), Path(folder).resolve()
    return out == root or root in out.parents


def replaced_input(output: Path | None, inputs: Iterable[str | Path]) -> str | None:
    """The first of `inputs` that writing `output` would replace (the same file, through symlinks and hard
    links: os.path.samefile's test), or None. Only an output that exists can be an input."""
    if output is None:
        return None
    try:
        out = os.stat(output)
    except OSError:
        return None
    for path in inputs:
        try:
            st = os.stat(path)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (out.st_dev, out.st_ino):
            return str(path)
    return None


def refuse_replacing_input(flag: str, output: Path | None, inputs: Iterable[str | Path]) -> None:
    """UsageError (exit 2, before any work) when writing `output` would replace one of the command's inputs."""
    found = replaced_input(output, inputs)
    if output is not None and found is not None:
        raise UsageError(
            f"{flag} {display(output)}: is the input {display(found)}; writing there would replace it, "
            "so choose another file"
        )


def _dangling_link(path: Path, folder: bool) -> str | None:
    """A symlink to a path that does not exist: atomic_write creates the target file, never its folder."""
    target = os.readlink(path)
    parent = Path(os.path.realpath(path)).parent
    if folder or not parent.is_dir():
        missing = "which does not exist; create it" if folder else "whose folder does not exist; create that folder"
        return f"is a symlink to {display(target)}, {missing} or choose another path"
    return _writable_folder(parent)


def _new_path(path: Path) -> str | None:
    """A path that does not exist yet: its nearest existing ancestor must be a folder that takes new files."""
    parent = next((p for p in path.parents if os.path.lexists(p)), Path("."))
    if os.path.islink(parent) and not os.path.exists(parent):
        return f"{display(parent)} is a symlink to {display(os.readlink(parent))}, which does not exist; choose another path"
    if not os.path.isdir(parent):
        return f"{display(parent)} is not a folder; choose another path"
    return _writable_folder(parent)


def _writable_folder(folder: Path) -> str | None:
    if os.access(folder, os.W_OK | os.X_OK):
        return None
    return f"the folder {display(folder)} cannot be written in; choose another path"


# ----------------------------------------------------------------------------------------------------------
# Model folders

# The files of a model folder: what bitcli's hf and timm writers, transformers' save_pretrained (weights as
# .bin, or sharded with an index) and timm's save_for_hf write. Writing a model folder replaces these, and
# only these: a folder holding anything else is refused.
MODEL_FOLDER_FILE = re.compile(
    r"config\.json|preprocessor_config\.json|model\.safetensors|pytorch_model\.bin"
    r"|(model\.safetensors|pytorch_model\.bin)\.index\.json"
    r"|model-\d{5}-of-\d{5}\.safetensors|pytorch_model-\d{5}-of-\d{5}\.bin"
)
MODEL_FILES_SHOWN = "config.json, model.safetensors, preprocessor_config.json, pytorch_model.bin"
_STAGING = ".bitcli-staging."  # a temporary folder inside an existing model folder (a killed write leaves it)


def _is_staging(entry: Path) -> bool:
    return entry.name.startswith(_STAGING) and entry.name.endswith(".tmp") and entry.is_dir() and not entry.is_symlink()


def model_files_in(folder: Path) -> list[str]:
    """The model files in an existing folder (names); BitError naming the first entry that is not one.

    A symlink to a folder counts as that folder; a symlink or a folder named like a model file is refused:
    bitcli never wrote it, so it never replaces it."""
    if folder.is_symlink() and not folder.exists():
        raise BitError(
            f"{folder}: is a symlink to {os.readlink(folder)}, which does not exist; create that folder or pass another"
        )
    if not folder.is_dir():
        raise BitError(
            f"{folder}: is a file, not a folder; a model folder is written only into a new folder or one holding a model"
        )
    found = []
    for entry in sorted(folder.iterdir()):
        if _is_staging(entry):
            continue
        if not MODEL_FOLDER_FILE.fullmatch(entry.name) or entry.is_symlink() or not entry.is_file():
            raise BitError(
                f"{folder}: holds {_not_a_model_file(entry)}; bitcli writes a model folder only into a new folder or "
                f"one holding nothing but model files ({MODEL_FILES_SHOWN}), so choose another folder"
            )
        found.append(entry.name)
    return found


def _not_a_model_file(entry: Path) -> str:
    """What an entry of a model folder is, when bitcli may not replace it: another file or folder, or one named
    like a model file that bitcli cannot have written (a symlink, a folder, a FIFO...)."""
    if MODEL_FOLDER_FILE.fullmatch(entry.name):
        what = "a symlink" if entry.is_symlink() else "a folder" if entry.is_dir() else "not a regular file"
        return f"{entry.name!r}, named like a model file but {what}, which bitcli did not write"
    return f"the {'folder' if entry.is_dir() else 'file'} {entry.name!r}, which is not a model file"


def atomic_folder(folder: Path, fill: Callable[[Path], None]) -> None:
    """`fill(tmp)` fills a temporary folder; its files then become `folder`'s.

    A new folder is the temporary one renamed: it appears complete or not at all. An existing folder ('.', or
    the folder a symlink points to) must hold only model files (model_files_in); it is kept (it may be a
    shell's current folder, or have permissions of its own) and the new files are renamed into it one by one,
    config.json last, and model files the new layout lacks (say pytorch_model.bin) are removed afterwards. A
    kill leaves each file whole, old or new; only a kill between two renames (microseconds, against the
    seconds to minutes of writing) could leave new weights beside the old config.json."""
    folder = Path(folder)
    existed = folder.exists() or folder.is_symlink()
    if existed:
        model_files_in(folder)
    real = Path(os.path.realpath(folder))
    tmp = None
    try:
        if existed:
            tmp = Path(tempfile.mkdtemp(prefix=_STAGING, suffix=".tmp", dir=real))  # same file system: renames
        else:
            real.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{real.name}.", suffix=".tmp", dir=real.parent))
        fill(tmp)
        if existed:
            _move_files_into(tmp, real)
        else:
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
            tmp.rename(real)
    except BaseException as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, WriteFailed):  # a file inside failed: name the folder the user asked for
            raise WriteFailed(folder, existed, exc.reason) from None
        if isinstance(exc, OSError):
            raise WriteFailed(folder, existed, exc.strerror or one_line(exc)) from None
        raise


def move_files_into(staging: Path, folder: Path, names: Iterable[str]) -> None:
    """The named files of `staging` (a folder on `folder`'s file system) renamed over the same names in
    `folder`, config.json last: it names the layout, so a kill between two renames (microseconds) leaves at
    worst new weights beside the old config.json, and every file is whole, old or new."""
    for name in sorted(names, key=lambda name: name == "config.json"):
        os.replace(staging / name, folder / name)


def _move_files_into(tmp: Path, folder: Path) -> None:
    new = [p.name for p in tmp.iterdir()]
    move_files_into(tmp, folder, new)
    tmp.rmdir()
    for entry in folder.iterdir():
        if _is_staging(entry):  # the temporary folder of an earlier, killed write
            shutil.rmtree(entry, ignore_errors=True)
        elif (
            entry.name not in new
            and MODEL_FOLDER_FILE.fullmatch(entry.name)
            and entry.is_file()
            and not entry.is_symlink()
        ):
            entry.unlink()  # the previous layout's file, which would contradict the new ones


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
