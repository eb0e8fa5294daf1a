"""The run folder: finished, unfinished and foreign folders, the lock, clean-up of interrupted writes (and of
nothing else), a full disk, and data-set names that never become file names."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import run_main, write_folder
from PIL import Image

from bitcli.errors import BitError
from bitcli.finetune.rundir import lock_output
from bitcli.pages.folder import MARKER, listed, write_page_folder

from .helpers import FAST, PROCESS_ENV, RUN_FILES, bit_process


def test_finished_unfinished_and_foreign_output_folders(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["finetune", dataset, "--output", out, "--steps", "2", "--batch-size", "4", "--eval-every", "0", *FAST]
    assert run_main(*args)[0] == 0
    code, _, err = run_main(*args)
    assert code == 1 and "holds a finished run; pass --overwrite" in err
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    code, _, err = run_main(*args, "--resume")
    assert code == 0 and "already finished (summary.json is there): nothing to resume" in err, err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing touched, no .lock left
    code, _, err = run_main(*args, "--resume", "--overwrite")
    assert code == 2 and "pass only one" in err
    before = (out / "summary.json").stat().st_mtime_ns
    code, _, err = run_main(*args, "--overwrite")
    assert code == 0, err
    assert (out / "summary.json").stat().st_mtime_ns != before

    (out / "summary.json").unlink()  # now it looks like a run that stopped before the end
    code, _, err = run_main(*args)
    assert code == 1 and "unfinished run; pass --resume" in err

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    code, _, err = run_main("finetune", dataset, "--output", foreign, "--steps", "2", "--overwrite", *FAST)
    assert code == 1 and "holds no bit finetune run" in err
    assert (foreign / "thesis.tex").read_text() == "precious"
    code, _, err = run_main("finetune", dataset, "--output", tmp_path / "new", "--steps", "2", "--resume", *FAST)
    assert code == 1 and "holds no bit finetune run" in err


def test_overwrite_removes_only_what_bitcli_wrote(tmp_path: Path) -> None:
    write_folder(tmp_path / "data", {"red": 4, "green": 4})
    out = tmp_path / "run"
    args = ["finetune", tmp_path / "data", "--output", out, "--steps", "1", "--batch-size", "4", *FAST]
    assert run_main(*args)[0] == 0
    mine = {".notes.tmp": "draft", ".keep.old": "old", "notes.txt": "mine", ".final.tmp": "x"}
    for name, text in mine.items():
        (out / name).write_text(text)
    (out / ".metrics.jsonl.a1b2c3d4.tmp").write_text("{")  # what a kill during atomic_write leaves
    (out / "..final.zz_9yx8w.tmp").mkdir()  # ... and during the final model's staging
    (out / ".final").mkdir()
    code, _, err = run_main(*args, "--overwrite")
    assert code == 0, err
    assert {name: (out / name).read_text() for name in mine} == mine
    assert not any(p.name.endswith((".a1b2c3d4.tmp", "zz_9yx8w.tmp")) or p.name == ".final" for p in out.iterdir())


def _immutable(path: Path, on: bool) -> bool:
    """chattr +i / -i: as root, the one way to make a file that unlink refuses; False where it is not there."""
    chattr = shutil.which("chattr")
    if chattr is None:
        return False
    return subprocess.run([chattr, "+i" if on else "-i", str(path)], capture_output=True).returncode == 0


def test_an_old_report_file_that_cannot_be_removed_is_one_error_and_the_run_stays(tmp_path: Path) -> None:
    """--overwrite removes the earlier report first: a file of it that cannot be removed (immutable) is one
    `Error:` line, exit 1, and the run's own files are all still there, untouched."""
    write_folder(tmp_path / "data", {"red": 4, "green": 4})
    out = tmp_path / "run"
    args = ["finetune", tmp_path / "data", "--output", out, "--steps", "1", "--batch-size", "4", *FAST]
    assert run_main(*args)[0] == 0
    write_page_folder(out / "report", {"index.html": b"old", "images/1.jpg": b"a", "images/2.jpg": b"b"}, "t")
    stuck = out / "report" / "images" / "1.jpg"
    if not _immutable(stuck, on=True):
        pytest.skip("chattr +i is not available here (no chattr, or a file system without the flag)")
    try:
        before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir() if p.is_file()}
        code, _, err = run_main(*args, "--overwrite")
        lines = err.splitlines()
        assert code == 1, err
        expected = (
            f"Error: {stuck}: cannot remove this file of the earlier page (Operation not permitted); make it "
            "removable (or move the folder away) and run again"
        )
        assert [line for line in lines if line.startswith("Error")] == lines[-1:] == [expected], err
        assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir() if p.is_file()} == before
        assert stuck.read_bytes() == b"a" and listed(out / "report") == ["index.html", "images/1.jpg", "images/2.jpg"]
    finally:
        _immutable(stuck, on=False)
    code, _, err = run_main(*args, "--overwrite")  # once it is removable, a rerun takes up what is left
    assert code == 0, err
    assert not (out / "report").exists() and not (out / MARKER).exists()


def test_lock_is_exclusive_and_gone_when_the_run_ends(tmp_path: Path) -> None:
    with lock_output(tmp_path):
        assert (tmp_path / ".lock").is_file()
        with pytest.raises(BitError, match="another bit finetune is writing to this folder"), lock_output(tmp_path):
            pass
    assert not (tmp_path / ".lock").exists()
    with lock_output(tmp_path):  # and the folder can be locked again
        pass


def test_full_disk_is_a_user_error_and_leaves_nothing_half_written(dataset: Path, tmp_path: Path) -> None:
    """A file-size limit makes writes fail as a full disk does: exit 1 with a one-line reason (not an internal
    error), no temporary file left behind, and the run resumes once there is room. (The limited run is a
    process of its own: the limit applies to a whole process.)"""
    import resource

    out = tmp_path / "run"
    args = ["finetune", dataset, "--output", out, "--steps", "4", "--batch-size", "4", "--eval-every", "0",
            "--random-init", "--model", "small", "--resolution", "32", "--workers", "0"]  # fmt: skip
    # `small` has 0.13 M float32 weights (0.5 MB): the checkpoint (weights + momentum) cannot be written.
    limit = 800_000

    def small_files_only() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    done = subprocess.run(bit_process(*args), capture_output=True, text=True, preexec_fn=small_files_only,
                          env=PROCESS_ENV, timeout=300)  # fmt: skip
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: ") and "cannot write" in last and "File too large" in last
    assert "internal error" not in done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["finetune_config.json", "metrics.jsonl"]
    code, _, err = run_main(*args, "--resume")
    assert code == 0, err
    assert "no checkpoint in" in err and (out / "summary.json").is_file()


def test_hostile_class_names_stay_labels_and_never_name_files(tmp_path: Path) -> None:
    """Folder names from a data set become label strings only: every file the run writes has a fixed name
    inside --output, whatever the class folders are called."""
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    names = ["x..y", "-rf", "a\nb", "café ☕", "$(touch pwned)"]  # (hidden ".name" folders are skipped by design)
    for name in names:
        folder = data / name
        folder.mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    out = tmp_path / "run"
    code, _, err = run_main("finetune", data, "--output", out, "--steps", "2", "--batch-size", "4", *FAST)
    assert code == 0, err
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert [p for p in after if p not in before and p.parts[0] != "run"] == []  # nothing outside --output
    assert {p.name for p in out.iterdir()} == RUN_FILES
    labels = json.loads((out / "config.json").read_text())["id2label"]
    assert sorted(labels.values()) == sorted(names)
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


def test_resume_keeps_every_step_record_before_its_step_past_a_bad_line(tmp_path: Path, capsys) -> None:
    """Review of issue 20: the log kept the lines up to the first bad one and dropped every step after it
    (as bit report once did); now a bad line is left out and counted, and the later records stay."""
    from bitcli.finetune.rundir import MetricsLog

    def line(step: int) -> str:
        return json.dumps({"step": step, "lr": 0.003, "loss": 1.0 + step, "images_per_s": 10.0}) + "\n"

    path = tmp_path / "metrics.jsonl"
    path.write_text(line(0) + line(1) + "{garbage\n" + line(2) + '{"step": 3}\n' + line(3) + line(4) + line(5)
                    + '{"step": 6, "lr": 0.0')  # fmt: skip
    log = MetricsLog(path, keep_before=5)  # the checkpoint's step: 5 and the torn 6 were logged after it
    log.write({"step": 5, "lr": 0.003, "loss": 6.5, "images_per_s": 10.0})
    log.close()
    assert path.read_text() == line(0) + line(1) + line(2) + line(3) + line(4) + (
        json.dumps({"step": 5, "lr": 0.003, "loss": 6.5, "images_per_s": 10.0}) + "\n"
    )
    assert capsys.readouterr().err == (
        f"{path}: left out 3 line(s) that are no step record (the first: line 3); the records of steps before 5 "
        "are kept\n"
    )


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_user_file_in_best_is_refused_before_anything_is_removed(dataset: Path, tmp_path: Path) -> None:
    """--keep-best writes RUN/best/ as a model folder: one that holds a file of the user's (directly or through a
    symlink) is refused while the command line is read (exit 2) by --overwrite, which would otherwise remove the
    finished run's files first, and by --resume; every file stays as it was, byte for byte."""
    out = tmp_path / "run"
    args = ["finetune", dataset, "--output", out, "--steps", "2", "--batch-size", "4", "--eval-every", "1",
            "--keep-best", "top1", *FAST]  # fmt: skip
    code, _, err = run_main(*args)
    assert code == 0, err
    (out / "best" / "notes.txt").write_text("mine")
    before = _files(out)
    owned = {"model.safetensors", "summary.json", "checkpoint.safetensors", "curves.png", "best/config.json"}
    assert owned < set(before)
    expected = (
        f"Error: --keep-best: {out / 'best'}: holds the file 'notes.txt', which is not a model file; bitcli writes "
        "a model folder only into a new folder or one holding nothing but model files (config.json, "
        "model.safetensors, preprocessor_config.json, pytorch_model.bin), so choose another folder (or move it out "
        f"of {out / 'best'})"
    )
    code, _, err = run_main(*args, "--overwrite")
    assert code == 2 and err.splitlines() == [expected], err
    assert _files(out) == before
    (out / "summary.json").unlink()  # an interrupted run
    del before["summary.json"]
    code, _, err = run_main(*args, "--resume")
    assert code == 2 and err.splitlines() == [expected], err
    assert _files(out) == before

    theirs = tmp_path / "theirs"  # best/ a symlink to a folder of the user's
    (out / "best").rename(theirs)
    (out / "best").symlink_to(theirs, target_is_directory=True)
    code, _, err = run_main(*args, "--resume")
    assert code == 2 and err.splitlines() == [expected], err
    assert _files(out) == {k: v for k, v in before.items() if not k.startswith("best/")}
    assert _files(theirs) == {k.removeprefix("best/"): v for k, v in before.items() if k.startswith("best/")}
