"""`bit finetune` and bad input: undecodable images skipped before step 0 (resumable, also after the user
deletes them), degenerate runs refused before any weight is built, short schedules that train at every
step, and a run folder where only bitcli's own files are ever removed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_main, write_folder
from PIL import Image

from bitcli import finetune
from bitcli.data import find_undecodable, few_shot, scan
from bitcli.errors import BitError
from bitcli.preprocess import image_size

TINY = '{"depths": [1, 1], "hidden_sizes": [32, 64], "embedding_size": 16, "num_groups": 8}'
FAST = ["--random-init", "--model", TINY, "--resolution", "16", "--workers", "2"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def truncated_jpeg(path: Path) -> Path:
    """A JPEG cut short: its header reads fine (so a header scan passes it), its pixels do not decode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(7).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    assert image_size(path) == (64, 64)
    return path


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


# ----------------------------------------------------------------------------------------------------------
# Undecodable images


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
    real_write = finetune.MetricsLog.write

    def interrupt_at(step: int):
        def write(self, record: dict) -> None:
            if record["step"] == step:
                raise KeyboardInterrupt  # Ctrl-C during this step, before its checkpoint
            real_write(self, record)

        return write

    monkeypatch.setattr(finetune.MetricsLog, "write", interrupt_at(3))
    code, _, err = run_main(*args, "--output", killed)
    assert code == 130 and "continues from the checkpoint of step 2" in err, err
    monkeypatch.setattr(finetune.MetricsLog, "write", interrupt_at(5))
    code, _, err = run_main(*args, "--output", killed, "--resume")  # the files are still there: skipped again
    assert code == 130 and "resuming at step 2 of 6" in err and f"skipped {bad_train}" in err, err
    monkeypatch.setattr(finetune.MetricsLog, "write", real_write)

    bad_train.unlink()  # the user deletes what the warnings named
    bad_val.unlink()
    code, _, err = run_main(*args, "--output", killed, "--resume")
    assert code == 0, err
    assert "resuming at step 4 of 6" in err and "skipped" not in err
    a, b = read_weights(straight / "model.safetensors"), read_weights(killed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run trained on other images"
    assert json.loads((killed / "summary.json").read_text())["val_top1"] == summary["val_top1"]


def test_find_undecodable_names_every_bad_file(tmp_path: Path) -> None:
    write_folder(tmp_path, {"a": 2})
    bad = truncated_jpeg(tmp_path / "a" / "cut.jpg")
    (tmp_path / "a" / "text.png").write_text("not a png")
    paths = [str(tmp_path / "a" / "000.png"), str(bad), str(tmp_path / "a" / "text.png"), str(tmp_path / "a" / "001.png")]
    for workers in (0, 2):
        failed = find_undecodable(paths, workers)
        assert sorted(failed) == [1, 2]
        assert failed[1].startswith(f"{bad}: cannot decode image (") and "truncated" in failed[1]
        assert failed[2] == f"{paths[2]}: not an image PIL can read (empty, corrupt or another format)"


def test_few_shot_decodes_only_candidates_and_picks_as_if_bad_files_were_gone(tmp_path: Path) -> None:
    write_folder(tmp_path, {"a": 6, "b": 6})
    ds = scan(tmp_path)
    bad = few_shot(ds, 3, seed=4).paths[1]  # one of the images the seed picks
    decoded: list[int] = []

    def undecodable(indices: list[int]) -> set[int]:
        decoded.extend(indices)
        return {i for i in indices if ds.paths[i] == bad}

    picked = few_shot(ds, 3, 4, undecodable)
    assert picked.counts() == [3, 3] and bad not in picked.paths
    assert len(decoded) == 7  # the six candidates, then one replacement: not the whole folder
    os.remove(bad)
    after = scan(tmp_path)
    assert few_shot(after, 3, seed=4).paths == picked.paths  # deleting the file changes nothing else ...
    assert few_shot(after, 3, seed=4).fingerprint() == picked.fingerprint()  # ... so --resume accepts it
    with pytest.raises(BitError, match=r"class 'a' has only 5 training image\(s\) that decode \(1 could not be decoded\)"):
        few_shot(ds, 6, 4, undecodable)


def test_a_class_with_no_decodable_image_is_refused_before_training(tmp_path: Path) -> None:
    write_folder(tmp_path / "data", {"red": 4})
    truncated_jpeg(tmp_path / "data" / "green" / "only.jpg")
    code, _, err = run_main("finetune", tmp_path / "data", "--output", tmp_path / "run", *FAST)
    assert code == 1, err
    assert f"Error: {tmp_path / 'data' / 'green'}: none of the images of class 'green' can be decoded" in err
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------------------
# Degenerate runs


def test_degenerate_runs_are_refused_before_any_weight_is_built(tmp_path: Path, tiny_dir: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    data, one, val = tmp_path / "data", tmp_path / "one", tmp_path / "val"
    write_folder(data, {"red": 4, "green": 4})
    write_folder(one, {"red": 4})
    write_folder(val, {"red": 2, "green": 2})
    out = tmp_path / "run"

    def never(*args, **kwargs):
        raise AssertionError("weights were built")

    monkeypatch.setattr(finetune, "build_start_model", never)
    before = sorted(tmp_path.rglob("*"))
    cases = [
        ([one, "--output", out, *FAST], f"{one}: holds one class folder ('red'); a classifier needs at least 2 classes"),
        ([data, "--output", data / "myrun", *FAST], f"--output {data / 'myrun'}: is inside the image folder {data} (DATA)"),
        ([data, "--output", data, *FAST], f"--output {data}: is the image folder {data} (DATA)"),
        ([data, "--output", val / "x" / "run", "--val", val, *FAST], f"is inside the image folder {val} (--val)"),
        ([data, "--output", out, "--random-init", "--model", TINY, "--resolution", "1"], "use a crop of at least 8"),
        ([data, "--output", out, "--random-init", "--model", TINY, "--resolution", "6:4"], "a 4-px crop is below"),
        ([data, "--output", out, "--random-init", "--model", "small", "--resolution", "16"], "total stride of 32 px"),
        ([data, "--output", out, "--model", tiny_dir, "--resolution", "4"], "use a crop of at least 8"),  # pretrained
    ]
    for args, message in cases:
        code, _, err = run_main("finetune", *args)
        assert code == 2 and message in err, err
        assert err.startswith("Error: ") and len(err.strip().splitlines()) == 1
    assert sorted(tmp_path.rglob("*")) == before  # nothing written anywhere


def test_short_runs_train_at_every_step(tmp_path: Path) -> None:
    """`--steps 1` was one step at lr 0 (the head stayed zero); `--steps 3` said "/10 after steps 1, 2, 2"."""
    write_folder(tmp_path / "data", {"red": 4, "green": 4})
    out = tmp_path / "one"
    code, _, err = run_main("finetune", tmp_path / "data", "--output", out, "--steps", "1", "--batch-size", "4", *FAST)
    assert code == 0, err
    assert "  schedule    1 step; lr 0.003 from the first step (no warm-up), no decay" in err
    assert [(m["step"], m["lr"]) for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [(0, 0.003)]
    assert torch.count_nonzero(read_weights(out / "model.safetensors")["classifier.1.weight"]) > 0  # it trained
    out = tmp_path / "three"
    code, _, err = run_main("finetune", tmp_path / "data", "--output", out, "--steps", "3", "--batch-size", "4", *FAST)
    assert code == 0, err
    assert "  schedule    3 steps; lr 0.003 from the first step (no warm-up), /10 after step 1   [" in err
    lrs = [m["lr"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    assert lrs == pytest.approx([0.003, 0.003, 0.0003])


# ----------------------------------------------------------------------------------------------------------
# The run folder


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


def test_lock_is_exclusive_and_gone_when_the_run_ends(tmp_path: Path) -> None:
    with finetune.lock_output(tmp_path):
        assert (tmp_path / ".lock").is_file()
        with pytest.raises(BitError, match="another bit finetune is writing to this folder"):
            with finetune.lock_output(tmp_path):
                pass
    assert not (tmp_path / ".lock").exists()
    with finetune.lock_output(tmp_path):  # and the folder can be locked again
        pass


# ----------------------------------------------------------------------------------------------------------
# Several processes


def test_torchrun_processes_skip_the_same_files(tmp_path: Path) -> None:
    """Each process decodes its share of the images; all skip the same files and train what one process does."""
    data = tmp_path / "data"
    write_folder(data, {"red": 6, "green": 6})
    bads = [truncated_jpeg(data / "green" / "zz.jpg"), truncated_jpeg(data / "red" / "cut.jpg")]  # class order
    common = ["finetune", str(data), "--steps", "2", "--batch-size", "8", "--eval-every", "0", "--workers", "1",
              "--random-init", "--model", TINY, "--resolution", "16"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    one = subprocess.run([sys.executable, "-m", "bitcli", *common, "--output", str(tmp_path / "one"), "--batch-split", "2"],
                         capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "bitcli",
         *common, "--output", str(tmp_path / "two"), "--batch-split", "1"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    for bad in bads:
        assert two.stderr.count(f"skipped {bad}: cannot decode image") == 1  # named once, by the main process
    for run in ("one", "two"):
        assert json.loads((tmp_path / run / "summary.json").read_text())["skipped"] == [str(b) for b in bads]
    a, b = read_weights(tmp_path / "one" / "model.safetensors"), read_weights(tmp_path / "two" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
