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
