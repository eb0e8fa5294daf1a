"""Nothing a user owns is destroyed: `bit convert --overwrite` replaces only model files, and `--output` writes
through symlinks, FIFOs and devices instead of renaming over them (bitcli/writes.py)."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_bit, run_main, save_hf_model
from safetensors.torch import load_file

from bitcli.hub import load_checkpoint

MODEL_FILES = ["config.json", "model.safetensors", "preprocessor_config.json"]
SHOWN = "config.json, model.safetensors, preprocessor_config.json, pytorch_model.bin"


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under root (links and folders included) with its content digest or link target."""
    out = {}
    for p in sorted(root.rglob("*")):
        key = str(p.relative_to(root))
        if p.is_symlink():
            out[key] = "-> " + os.readlink(p)
        elif p.is_dir():
            out[key] = "dir"
        else:
            out[key] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def convert(*args: object) -> tuple[int, str, str]:
    return run_main("convert", *args)


def one_error_line(code: int, err: str) -> str:
    assert code == 1 and err.startswith("Error: ") and err.count("\n") == 1, (code, err)
    return err.removeprefix("Error: ").rstrip("\n")


@pytest.fixture
def model_dir(tiny_dir: Path, tmp_path: Path) -> Path:
    """A model folder an earlier `bit convert` wrote."""
    out = tmp_path / "model"
    code, _, err = convert(tiny_dir, out, "--format", "hf")
    assert code == 0, err
    return out


# ----------------------------------------------------------------------------------------------------------
# bit convert into an existing folder


@pytest.mark.parametrize("entry", ["notes.txt", "src/train.py"])
def test_overwrite_refuses_a_folder_holding_other_files_and_touches_nothing(tiny_dir, model_dir, tmp_path, entry):
    (model_dir / entry).parent.mkdir(exist_ok=True)
    (model_dir / entry).write_text("mine")
    before = snapshot(tmp_path)
    message = one_error_line(*convert(tiny_dir, model_dir, "--format", "hf", "--overwrite")[::2])
    first = entry.split("/")[0]
    kind = "file" if first == entry else "folder"
    assert message == (
        f"{model_dir}: holds the {kind} {first!r}, which is not a model file; bitcli writes a model folder only into "
        f"a new folder or one holding nothing but model files ({SHOWN}), so choose another folder"
    )
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("what", ["a symlink", "a folder"])
def test_overwrite_refuses_an_entry_named_like_a_model_file_that_bitcli_did_not_write(tiny_dir, model_dir, tmp_path,
                                                                                     what):  # fmt: skip
    """A model.safetensors that is a link (to the user's own weights) or a folder is not bitcli's to replace."""
    weights = model_dir / "model.safetensors"
    mine = tmp_path / "mine.safetensors"
    weights.rename(mine)
    if what == "a symlink":
        weights.symlink_to(mine)
    else:
        weights.mkdir()
    before = snapshot(tmp_path)
    message = one_error_line(*convert(tiny_dir, model_dir, "--format", "hf", "--overwrite")[::2])
    assert message == (
        f"{model_dir}: holds 'model.safetensors', named like a model file but {what}, which bitcli did not write; "
        f"bitcli writes a model folder only into a new folder or one holding nothing but model files ({SHOWN}), so "
        "choose another folder"
    )
    assert snapshot(tmp_path) == before


def test_without_overwrite_the_message_says_what_overwrite_replaces(tiny_dir, model_dir, tmp_path):
    before = snapshot(tmp_path)
    message = one_error_line(*convert(tiny_dir, model_dir, "--format", "hf")[::2])
    assert message == f"{model_dir}: already holds a model; pass --overwrite to replace its model files ({SHOWN})"
    assert snapshot(tmp_path) == before


def test_overwrite_replaces_model_files_in_the_same_folder(tiny_dir, tmp_path):
    """A save_pretrained folder with .bin weights: the folder (its inode, its mode) stays; the .bin, which the
    new layout does not have, goes; a killed conversion's staging folder is cleaned up."""
    out = save_hf_model(tmp_path / "model", embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1], num_groups=8,
                        num_labels=4)  # fmt: skip
    weights = out / "model.safetensors"  # as save_pretrained(safe_serialization=False) writes it
    torch.save(load_file(str(weights)), out / "pytorch_model.bin")
    weights.unlink()
    (out / ".bitcli-staging.x1y2.tmp").mkdir()
    (out / ".bitcli-staging.x1y2.tmp" / "model.safetensors").write_bytes(b"half")
    os.chmod(out, 0o750)
    inode = out.stat().st_ino
    code, _, err = convert(tiny_dir, out, "--format", "hf", "--overwrite")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == MODEL_FILES
    assert out.stat().st_ino == inode and stat.S_IMODE(out.stat().st_mode) == 0o750
    assert load_checkpoint(str(out)).labels == load_checkpoint(str(tiny_dir)).labels
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary sibling either


def test_empty_folder_is_filled_without_overwrite(tiny_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, err = convert(tiny_dir, tmp_path / "empty", "--format", "hf")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == MODEL_FILES


def test_current_folder_as_dst(tiny_dir, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for flags in ([], ["--overwrite"]):
        code, _, err = convert(tiny_dir, ".", "--format", "hf", *flags)
        assert code == 0, err
        assert sorted(p.name for p in work.iterdir()) == MODEL_FILES
    (work / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    message = one_error_line(*convert(tiny_dir, ".", "--format", "hf", "--overwrite")[::2])
    assert message.startswith(".: holds the file 'notes.txt', which is not a model file;")
    assert snapshot(tmp_path) == before


def test_symlink_to_a_folder_is_written_through(tiny_dir, model_dir, tmp_path):
    link = tmp_path / "latest"
    link.symlink_to(model_dir.name)
    code, _, err = convert(tiny_dir, link, "--format", "hf", "--overwrite")
    assert code == 0, err
    assert link.is_symlink() and os.readlink(link) == model_dir.name
    assert sorted(p.name for p in model_dir.iterdir()) == MODEL_FILES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "model"]


def test_a_file_is_never_replaced_by_a_folder(tiny_dir, tmp_path):
    (tmp_path / "out").write_text("mine")
    before = snapshot(tmp_path)
    message = one_error_line(*convert(tiny_dir, tmp_path / "out", "--format", "hf", "--overwrite")[::2])
    assert message == (
        f"{tmp_path / 'out'}: is a file, not a folder; a model folder is written only into a new folder or one holding a model"
    )
    assert snapshot(tmp_path) == before


def test_bitcli_file_through_a_symlink_keeps_the_link(tiny_dir, tmp_path):
    (tmp_path / "store").mkdir()
    link = tmp_path / "model.safetensors"
    link.symlink_to("store/tiny.safetensors")  # dangling: the target is created, like a shell's `>` does
    for flags in ([], ["--overwrite"]):
        code, _, err = convert(tiny_dir, link, *flags)
        assert code == 0, err
        assert link.is_symlink() and load_checkpoint(str(tmp_path / "store" / "tiny.safetensors")).config.depths == (
            1,
            1,
        )
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["tiny.safetensors"]


# ----------------------------------------------------------------------------------------------------------
# bit predict --output: through what is not a regular file


def predict_json(tiny_dir: Path, photo: Path, output: Path | str) -> None:
    code, out, err = run_main("predict", photo, "--model", tiny_dir, "--format", "json", "--output", output)
    assert code == 0 and out == "", err


def expected_json(tiny_dir: Path, photo: Path) -> str:
    code, out, err = run_main("predict", photo, "--model", tiny_dir, "--format", "json")
    assert code == 0, err
    return out


def test_output_symlink_writes_its_target_and_keeps_the_link(tiny_dir, photos, tmp_path):
    (tmp_path / "results").mkdir()
    link = tmp_path / "latest.json"
    link.symlink_to("results/run1.json")  # not there yet
    predict_json(tiny_dir, photos["chelsea.png"], link)
    assert link.is_symlink() and os.readlink(link) == "results/run1.json"
    assert (tmp_path / "results" / "run1.json").read_text() == expected_json(tiny_dir, photos["chelsea.png"])

    predict_json(tiny_dir, photos["coffee.png"], link)  # an existing target is replaced, the link still kept
    assert link.is_symlink()
    assert (tmp_path / "results" / "run1.json").read_text() == expected_json(tiny_dir, photos["coffee.png"])
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["run1.json"]


def test_output_fifo_is_written_into_and_stays_a_fifo(tiny_dir, photos, tmp_path):
    fifo = tmp_path / "results.fifo"
    os.mkfifo(fifo)
    reader = subprocess.Popen(["cat", str(fifo)], stdout=subprocess.PIPE)
    try:
        predict_json(tiny_dir, photos["chelsea.png"], fifo)
        received, _ = reader.communicate(timeout=60)
    finally:
        reader.kill()
        reader.wait()
    assert received.decode() == expected_json(tiny_dir, photos["chelsea.png"])
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.fifo"]


def test_output_dev_null_stays_a_device(tiny_dir, photos):
    before = os.stat("/dev/null")
    predict_json(tiny_dir, photos["chelsea.png"], "/dev/null")
    after = os.stat("/dev/null")
    assert stat.S_ISCHR(after.st_mode) and (after.st_ino, after.st_rdev) == (before.st_ino, before.st_rdev)


def test_output_character_device_node_stays_a_device(tiny_dir, photos, tmp_path):
    """The same as /dev/null, on a node of our own (so that a regression cannot replace the machine's)."""
    node = tmp_path / "null"
    try:
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        node.open("wb").close()
    except OSError as exc:
        pytest.skip(f"cannot make or open a device node here ({exc.strerror})")
    predict_json(tiny_dir, photos["chelsea.png"], node)
    assert stat.S_ISCHR(node.lstat().st_mode) and node.lstat().st_rdev == os.makedev(1, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["null"]


@pytest.mark.parametrize("stdout", ["pipe", "file opened with >>"])
def test_output_link_to_dev_stdout_writes_to_stdout(tiny_dir, photos, tmp_path, stdout):
    """/dev/stdout resolves to whatever the shell opened; bit writes through the inherited descriptor (at its
    offset, in its mode), never renames over the file behind it or truncates it."""
    (tmp_path / "links").mkdir()
    link = tmp_path / "links" / "out.json"
    link.symlink_to("/dev/stdout")
    args = ["predict", photos["chelsea.png"], "--model", tiny_dir, "--format", "json", "--output", link]
    if stdout == "pipe":
        result = run_bit(*args)
        assert result.returncode == 0, result.stderr
        received = result.stdout
    else:
        log = tmp_path / "log.txt"
        log.write_text("earlier output\n")
        with open(log, "a") as f:
            result = subprocess.run([sys.executable, "-m", "bitcli", *map(str, args)], stdout=f, stderr=subprocess.PIPE,
                                    text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
        assert result.returncode == 0, result.stderr
        received = log.read_text().removeprefix("earlier output\n")
        assert log.read_text().startswith("earlier output\n")
    assert received == expected_json(tiny_dir, photos["chelsea.png"])
    assert link.is_symlink() and sorted(p.name for p in (tmp_path / "links").iterdir()) == ["out.json"]


def test_output_regular_file_is_replaced_atomically_and_keeps_its_mode(tiny_dir, photos, tmp_path):
    out = tmp_path / "results.json"
    out.write_text("old")
    os.chmod(out, 0o600)
    inode = out.stat().st_ino
    predict_json(tiny_dir, photos["chelsea.png"], out)
    assert json.loads(out.read_text())[0]["path"] == str(photos["chelsea.png"])
    assert out.stat().st_ino != inode  # a new file renamed over the old one, never the old one half-rewritten
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_output_file_in_a_folder_that_refuses_new_files_is_written_in_place(tiny_dir, photos, tmp_path, monkeypatch):
    """A writable file in a read-only folder (no temporary file can be made beside it) is rewritten in place,
    as a shell's `>` would, instead of failing. Root ignores permission bits, so the folder's are simulated."""
    locked = tmp_path / "locked"
    locked.mkdir()
    out = locked / "results.json"
    out.write_text("old")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == locked else real_access(p, mode, **kw))
    inode = out.stat().st_ino
    predict_json(tiny_dir, photos["chelsea.png"], out)
    assert out.stat().st_ino == inode
    assert out.read_text() == expected_json(tiny_dir, photos["chelsea.png"])
    assert sorted(p.name for p in locked.iterdir()) == ["results.json"]


# ----------------------------------------------------------------------------------------------------------
# bit convert --overwrite onto a file: only what bitcli wrote is replaced


@pytest.fixture
def no_conversion(monkeypatch):
    """Reading the source fails the test: a refusal must come before any conversion or export work."""
    import bitcli.commands.convert

    def read_source(*args: object) -> None:
        raise AssertionError("the source was read")

    monkeypatch.setattr(bitcli.commands.convert, "load_checkpoint", read_source)


REPLACES_ONLY_OURS = (
    "--overwrite replaces only a file that bitcli wrote, so choose another DST or remove this one yourself"
)


@pytest.mark.parametrize(
    "name, content, what",
    [
        ("notes.onnx", b"my notes\n", "is not an ONNX file"),
        ("notes.safetensors", b"my notes\n", "is not a safetensors file"),
        ("weights.safetensors", None, "is a safetensors file without bitcli's metadata"),
    ],
)
def test_overwrite_refuses_a_file_bitcli_did_not_write(tiny_dir, tmp_path, no_conversion, name, content, what):
    dst = tmp_path / name
    if content is None:  # another tool's safetensors (timm's, transformers'): no bitcli metadata
        from safetensors.torch import save_file

        save_file({"w": torch.zeros(2)}, str(dst))
    else:
        dst.write_bytes(content)
    before = snapshot(tmp_path)
    message = one_error_line(*convert(tiny_dir, dst, "--overwrite")[::2])
    assert message == f"{dst}: {what}; {REPLACES_ONLY_OURS}"
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("onnx_extra", ["installed", "missing"])
def test_overwrite_through_a_symlink_judges_and_keeps_its_target(tiny_dir, tmp_path, no_conversion, monkeypatch,
                                                                 onnx_extra):  # fmt: skip
    """The link's target is what would be overwritten; it is read without onnx, so the refusal is the same
    whether the extra is installed or not."""
    if onnx_extra == "missing":
        monkeypatch.setitem(sys.modules, "onnx", None)
    (tmp_path / "target.txt").write_text("mine")
    link = tmp_path / "link.onnx"
    link.symlink_to("target.txt")
    before = snapshot(tmp_path)
    message = one_error_line(*convert(tiny_dir, link, "--overwrite")[::2])
    assert message == f"{link}: links to {tmp_path / 'target.txt'}, which is not an ONNX file; {REPLACES_ONLY_OURS}"
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------------------------------------
# Output paths are checked before the work: a typo costs no minutes


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A folder with a file and folders in the way of outputs; the current folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    for folder in ("results", "dir.npy", "plot.png", "p.paths.txt"):
        (tmp_path / folder).mkdir()
    (tmp_path / "link.json").symlink_to("missing/x.json")
    return tmp_path


TRAILING = "ends in /, which names a folder; give a file name (without the trailing /)"


@pytest.mark.parametrize(
    "args, message",
    [
        (["predict", "x.jpg", "-o", "results"], "--output results: is a folder; give a file name"),
        (["predict", "x.jpg", "-o", "notes.txt/p.json"], "--output notes.txt/p.json: notes.txt is not a folder; choose another path"),
        (["predict", "x.jpg", "-o", "notes.txt/a/b/p.csv"], "--output notes.txt/a/b/p.csv: notes.txt is not a folder; choose another path"),
        (["predict", "x.jpg", "-o", "link.json"],
         "--output link.json: is a symlink to missing/x.json, whose folder does not exist; create that folder or choose another path"),
        (["embed", "x.jpg", "-o", "dir.npy"], "--output dir.npy: is a folder; give a file name"),
        (["embed", "x.jpg", "-o", "p.npy"], "--output p.npy: its paths go to p.paths.txt, which is a folder; give a file name"),
        (["embed", "x.jpg", "-o", "notes.txt/e.safetensors"],
         "--output notes.txt/e.safetensors: notes.txt is not a folder; choose another path"),
        (["eval", "data", "--plot", "plot.png"], "--plot plot.png: is a folder; give a file name"),
        (["eval", "data", "--plot", "notes.txt/c.png"], "--plot notes.txt/c.png: notes.txt is not a folder; choose another path"),
        (["finetune", "data", "-m", "tiny", "-o", "notes.txt/run"], "--output notes.txt/run: notes.txt is not a folder; choose another path"),
        (["finetune", "data", "-m", "tiny", "-o", "notes.txt"], "--output notes.txt: is not a folder; give a folder name"),
        # a trailing / names a folder where a file is written (review of issue 20: `newout` was written)
        (["predict", "x.jpg", "-o", "newout/"], f"--output newout/: {TRAILING}"),
        (["embed", "x.jpg", "-o", "new.npy/"], f"--output new.npy/: {TRAILING}"),
        (["eval", "data", "--plot", "newplot.png/"], f"--plot newplot.png/: {TRAILING}"),
        (["convert", "x.npz", "newconv.onnx/"], f"DST newconv.onnx/: {TRAILING}"),
        (["convert", "x.npz", "newconv.safetensors/"], f"DST newconv.safetensors/: {TRAILING}"),
    ],
)  # fmt: skip
def test_an_output_that_cannot_be_written_is_refused_before_any_work(workdir, args, message):
    """Exit 2 while the command line is read: the model ('no/such-model') and the data are never looked at."""
    before = snapshot(workdir)
    model = [] if "-m" in args or args[0] == "convert" else ["--model", "no/such-model"]
    assert run_main(*args, *model) == (2, "", f"Error: {message}\n")
    assert snapshot(workdir) == before


def test_an_output_folder_that_refuses_new_files_is_refused_before_any_work(workdir, monkeypatch):
    """Root ignores permission bits, so the folder's are simulated (as os.access would answer a user)."""
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode, **kw: False if Path(p) == Path("results") else real_access(p, mode, **kw)
    )
    before = snapshot(workdir)
    assert run_main("predict", "x.jpg", "--model", "no/such-model", "-o", "results/p.json") == (
        2, "", "Error: --output results/p.json: the folder results cannot be written in; choose another path\n",
    )  # fmt: skip
    assert snapshot(workdir) == before


def test_a_folder_dst_may_end_in_a_separator(tiny_dir, workdir):
    """convert's hf and timm layouts are folders: `out/` is one (only a DST that names a file is refused)."""
    assert run_main("convert", tiny_dir, "hf/")[0] == 0
    assert sorted(p.name for p in (workdir / "hf").iterdir()) == [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]


def test_missing_output_folders_are_still_created(tiny_dir, photos, workdir):
    predict_json(tiny_dir, photos["chelsea.png"], "new/deeper/p.json")
    assert (workdir / "new" / "deeper" / "p.json").read_text() == expected_json(tiny_dir, photos["chelsea.png"])


@pytest.mark.parametrize(
    "dst, flags, problem",
    [
        ("notes.txt/m.onnx", [], "{notes} is not a folder; choose another path"),
        ("notes.txt/m.safetensors", ["--overwrite"], "{notes} is not a folder; choose another path"),
        ("notes.txt/hf", ["--format", "hf"], "{notes} is not a folder; choose another path"),
        ("locked/m.safetensors", [], "the folder {locked} cannot be written in; choose another path"),
        ("locked/hf", ["--format", "hf"], "the folder {locked} cannot be written in; choose another path"),
    ],
)
def test_convert_refuses_a_dst_it_could_not_write_before_reading_the_source(tiny_dir, workdir, no_conversion,
                                                                             monkeypatch, dst, flags, problem):  # fmt: skip
    """Not after an export of many seconds; exit 1, as convert's other DST checks (made after torch loads)."""
    locked = workdir / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == locked else real_access(p, mode, **kw))
    before = snapshot(workdir)
    message = one_error_line(*convert(tiny_dir, workdir / dst, *flags)[::2])
    assert message == f"{workdir / dst}: " + problem.format(notes=workdir / "notes.txt", locked=locked)
    assert snapshot(workdir) == before


# ----------------------------------------------------------------------------------------------------------
# Files that belong together: both or neither


def test_files_written_together_are_all_replaced_or_none(tmp_path):
    from bitcli.writes import WriteFailed, write_together

    array, paths = tmp_path / "p.npy", tmp_path / "p.paths.txt"
    array.write_bytes(b"old array")
    paths.mkdir()  # in the way of the second file, found only when its temporary file is complete
    with pytest.raises(WriteFailed) as caught:
        write_together([(array, lambda f: f.write(b"new array")), (paths, lambda f: f.write(b"new paths"))])
    assert str(caught.value) == (
        f"{paths}: cannot write it (Is a directory); nothing was written: {array} and {paths} are as they were"
    )
    assert snapshot(tmp_path) == {"p.npy": hashlib.sha256(b"old array").hexdigest(), "p.paths.txt": "dir"}

    paths.rmdir()
    paths.write_bytes(b"old paths")

    def disk_full(f) -> None:
        f.write(b"half of the paths")
        raise OSError(28, "No space left on device")

    before = snapshot(tmp_path)
    with pytest.raises(WriteFailed, match="No space left on device"):
        write_together([(array, lambda f: f.write(b"new array")), (paths, disk_full)])
    assert snapshot(tmp_path) == before  # no temporary file left either

    write_together([(array, lambda f: f.write(b"new array")), (paths, lambda f: f.write(b"new paths"))])
    assert (array.read_bytes(), paths.read_bytes()) == (b"new array", b"new paths")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.npy", "p.paths.txt"]


# ----------------------------------------------------------------------------------------------------------
# One home for atomic replace: the model cache's download and the run folder's final model use writes.py


def test_a_cache_entry_appears_whole_or_not_at_all(tmp_path):
    from bitcli.writes import replaced_when_complete

    target = tmp_path / "BiT-M-R50x1.npz"
    with replaced_when_complete(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".BiT-M-R50x1.npz.") and tmp.name.endswith(".tmp")
        assert not target.exists()  # nothing under the final name while it is written
        tmp.write_bytes(b"complete")
    assert target.read_bytes() == b"complete"
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~_umask()  # not mkstemp's 0600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["BiT-M-R50x1.npz"]

    other = tmp_path / "BiT-S-R50x1.npz"
    with pytest.raises(ValueError, match=r"^not a BiT"), replaced_when_complete(other) as tmp:
        tmp.write_bytes(b"<html>")
        raise ValueError("not a BiT .npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["BiT-M-R50x1.npz"]  # no entry, no temporary file


def test_files_moved_into_a_folder_rename_config_json_last(tiny_dir, tmp_path, monkeypatch):
    from bitcli import writes
    from bitcli.finetune.rundir import write_final_model
    from bitcli.formats import read

    renamed = []
    real_replace = os.replace
    monkeypatch.setattr(writes.os, "replace", lambda a, b: renamed.append(Path(b).name) or real_replace(a, b))
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")  # the run's other files stay
    write_final_model(read(tiny_dir), run)
    assert renamed[-3:] == ["model.safetensors", "preprocessor_config.json", "config.json"]
    assert sorted(p.name for p in run.iterdir()) == [
        "config.json", "metrics.jsonl", "model.safetensors", "preprocessor_config.json",
    ]  # fmt: skip


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
