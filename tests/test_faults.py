"""Faults while writing or running: a killed or starved process never leaves a half-written file behind."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_main, save_hf_model

from bitcli.hub import load_checkpoint


@pytest.fixture(scope="module")
def r50_folder(tmp_path_factory) -> Path:
    """An R50x1 transformers folder (~100 MB of weights): big enough to kill a conversion half-way."""
    return save_hf_model(tmp_path_factory.mktemp("r50") / "r50", num_labels=10)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _bit_command(*args) -> list[str]:
    return [sys.executable, "-m", "bitcli", *map(str, args)]


def test_sigkill_during_convert_keeps_previous_dst(r50_folder, tiny_dir, tmp_path):
    dst = tmp_path / "model.safetensors"
    assert run_main("convert", tiny_dir, dst)[0] == 0  # the DST a killed process must keep
    before = _digest(dst)
    proc = subprocess.Popen(_bit_command("convert", r50_folder, dst, "--overwrite"), env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".model.safetensors.*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "conversion finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _digest(dst) == before  # the old file, whole
    old = load_checkpoint(str(dst))
    assert old.config.hidden_sizes == (32, 64)  # still the tiny model, and it loads
    old.build_model()


def test_sigkill_during_convert_into_a_folder_keeps_previous_model_files(r50_folder, tiny_dir, tmp_path):
    """The new files are written beside the old ones inside DST (the folder itself is never replaced); a kill
    leaves the old files whole, and the next conversion cleans up what the killed one left."""
    dst = tmp_path / "hf"
    assert run_main("convert", tiny_dir, dst, "--format", "hf")[0] == 0
    before = {p.name: _digest(p) for p in dst.iterdir()}
    proc = subprocess.Popen(_bit_command("convert", r50_folder, dst, "--format", "hf", "--overwrite"),
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 120
    while not list(tmp_path.rglob(".model.safetensors.*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "conversion finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert {p.name: _digest(p) for p in dst.iterdir() if not p.name.startswith(".")} == before
    assert load_checkpoint(str(dst)).config.hidden_sizes == (32, 64)

    code, _, err = run_main("convert", r50_folder, dst, "--format", "hf", "--overwrite")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # nothing left over, beside DST or in it
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    assert load_checkpoint(str(dst)).config.hidden_sizes == (256, 512, 1024, 2048)


def _limit_file_size(max_bytes: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return apply


@pytest.mark.parametrize("fmt, dst_name", [("bitcli", "model.safetensors"), ("hf", "hf-folder")])
def test_full_disk_during_convert_keeps_previous_dst(r50_folder, tiny_dir, tmp_path, fmt, dst_name):
    """A file-size limit makes writes fail as a full disk does; the old DST must stay valid, no temp left."""
    dst = tmp_path / dst_name
    assert run_main("convert", tiny_dir, dst, "--format", fmt)[0] == 0
    snapshot = {p.relative_to(tmp_path): _digest(p) for p in tmp_path.rglob("*") if p.is_file()}
    result = subprocess.run(
        _bit_command("convert", r50_folder, dst, "--format", fmt, "--overwrite"),
        env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
        preexec_fn=_limit_file_size(20 << 20), timeout=300,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1, result.stderr
    kept = "the previous file is unchanged" if fmt == "bitcli" else "the previous folder is unchanged"
    assert result.stderr.startswith(f"Error: {dst}: cannot write it (") and result.stderr.endswith(f"); {kept}\n"), (
        result.stderr
    )
    after = {p.relative_to(tmp_path): _digest(p) for p in tmp_path.rglob("*") if p.is_file()}
    assert after == snapshot  # same files, same bytes: nothing half-written, nothing left over
    assert load_checkpoint(str(dst)).config.hidden_sizes == (32, 64)


def test_sigint_during_predict_reports_what_was_done(tiny_dir, photos, tmp_path):
    # The same files under 2000 distinct links. Their JSONL (~700 KB) cannot fit in the stdout pipe (64 KiB),
    # so the child blocks writing until we read: it is still running when SIGINT arrives, however slowly this
    # process gets scheduled on a loaded machine.
    images = [photos[name] for name in sorted(photos)] * 250
    links = []
    for i, image in enumerate(images):
        link = tmp_path / f"img{i:04d}{image.suffix}"
        link.symlink_to(image)
        links.append(link)
    proc = subprocess.Popen(
        _bit_command("predict", *links, "--model", tiny_dir, "--format", "jsonl", "--batch-size", "2"),
        env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # Ctrl-C as in a terminal: a shell starts background jobs (`.ci/run &`) with SIGINT ignored, children
        # inherit that, and Python then never raises KeyboardInterrupt.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    first = proc.stdout.readline()  # jsonl streams: the first result proves the loop is running
    assert json.loads(first)["path"] == str(links[0])
    proc.send_signal(signal.SIGINT)
    rest = proc.stdout.read()  # through the same buffer that readline() filled (communicate() would bypass it)
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 130, err
    done = [json.loads(line) for line in [first, *rest.splitlines()]]
    assert 0 < len(done) < len(links)
    assert [r["path"] for r in done] == [str(p) for p in links[: len(done)]]  # a prefix, in order
    assert all("predictions" in r for r in done)
    assert f"interrupted: {len(done)} of {len(links)} images done" in err
    assert "Traceback" not in err
