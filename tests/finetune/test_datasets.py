"""The run's images: undecodable files skipped before step 0 and named (resumable, also after the user
deletes them), and files that the folder lists but that are not images to read."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import run_main, write_folder

from bitcli.finetune import rundir
from bitcli.finetune.datasets import find_undecodable

from .helpers import FAST, read_weights, truncated_jpeg


def test_undecodable_images_are_skipped_before_step_0_and_resume_survives_their_removal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run used to die at the step that first drew a truncated JPEG; deleting the file then made
    --resume refuse ("train_examples 217 -> 216"). Now both files are skipped up front and named, and a run
    interrupted twice (once with the files there, once after they were deleted) ends bit-identical to an
    uninterrupted one."""
    data = tmp_path / "data"
    write_folder(data / "train", {"red": 8, "green": 8, "blue": 8})
    write_folder(data / "val", {"red": 3, "green": 3, "blue": 3}, seed=1)
    bad_train = truncated_jpeg(data / "train" / "green" / "zz_truncated.jpg")
    bad_val = truncated_jpeg(data / "val" / "red" / "truncated.jpg")
    # 6 steps of 8 from 24 images: two whole epochs, so every training file is drawn.
    args = ["finetune", data, "--batch-size", "8", "--steps", "6", "--save-every", "2", "--eval-every", "0", *FAST]

    straight = tmp_path / "straight"
    code, _, err = run_main(*args, "--output", straight)
    assert code == 0, err
    for bad in (bad_train, bad_val):
        assert f"skipped {bad}: cannot decode image (" in err and "the file may be truncated or corrupt" in err
    assert "  skipped     2 images that do not decode (listed above; summary.json lists them too)" in err
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["skipped"] == [str(bad_train), str(bad_val)]
    assert (summary["train_examples"], summary["val_examples"]) == (24, 9)
    assert json.loads((straight / "finetune_config.json").read_text())["skipped"] == [str(bad_train), str(bad_val)]

    killed = tmp_path / "killed"
    real_write = rundir.MetricsLog.write

    def interrupt_at(step: int):
        def write(self, record: dict) -> None:
            if record["step"] == step:
                raise KeyboardInterrupt  # Ctrl-C during this step, before its checkpoint
            real_write(self, record)

        return write

    monkeypatch.setattr(rundir.MetricsLog, "write", interrupt_at(3))
    code, _, err = run_main(*args, "--output", killed)
    assert code == 130 and "continues from the checkpoint of step 2" in err, err
    monkeypatch.setattr(rundir.MetricsLog, "write", interrupt_at(5))
    code, _, err = run_main(*args, "--output", killed, "--resume")  # the files are still there: skipped again
    assert code == 130 and "resuming at step 3 of 6" in err and f"skipped {bad_train}" in err, err
    monkeypatch.setattr(rundir.MetricsLog, "write", real_write)

    bad_train.unlink()  # the user deletes what the warnings named
    bad_val.unlink()
    code, _, err = run_main(*args, "--output", killed, "--resume")
    assert code == 0, err
    assert "resuming at step 5 of 6" in err and "skipped" not in err
    a, b = read_weights(straight / "model.safetensors"), read_weights(killed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run trained on other images"
    assert json.loads((killed / "summary.json").read_text())["val_top1"] == summary["val_top1"]


def test_a_dangling_link_or_a_pipe_in_a_class_folder_is_named_and_skipped(tmp_path: Path) -> None:
    """The class folders are listed as every command lists images (bitcli.images.list_images): a broken link
    or a FIFO with an image suffix is named on stderr and in summary.json, not silently left out."""
    data = tmp_path / "data"
    write_folder(data, {"red": 4, "green": 4})
    link, fifo = data / "red" / "gone.png", data / "green" / "pipe.png"
    link.symlink_to(tmp_path / "nowhere.png")
    os.mkfifo(fifo)
    out = tmp_path / "run"
    code, _, err = run_main("finetune", data, "--output", out, "--steps", "1", "--batch-size", "4", *FAST)
    assert code == 0, err
    assert f"skipped {link}: broken symbolic link\n" in err
    assert f"skipped {fifo}: is a FIFO (named pipe), not a regular file\n" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped"] == [str(fifo), str(link)] and summary["train_examples"] == 8


def test_find_undecodable_names_every_bad_file(tmp_path: Path) -> None:
    write_folder(tmp_path, {"a": 2})
    bad = truncated_jpeg(tmp_path / "a" / "cut.jpg")
    (tmp_path / "a" / "text.png").write_text("not a png")
    paths = [
        str(tmp_path / "a" / "000.png"),
        str(bad),
        str(tmp_path / "a" / "text.png"),
        str(tmp_path / "a" / "001.png"),
    ]
    for workers in (0, 2):
        failed = find_undecodable(paths, workers)
        assert sorted(failed) == [1, 2]
        assert failed[1].startswith(f"{bad}: cannot decode image (") and "truncated" in failed[1]
        assert failed[2] == f"{paths[2]}: not an image PIL can read (empty, corrupt or another format)"
