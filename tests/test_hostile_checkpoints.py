"""Hostile checkpoints: whatever the bytes, reading gives a model or one BitError, never a crash or a pickle."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_main
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from bitcli.errors import BitError
from bitcli.hub import load_checkpoint

_TINY = dict(embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1], num_groups=8, num_labels=3)


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory, tiny_dir) -> dict[str, bytes]:
    """The bytes of one valid checkpoint in each format, to mutate."""
    from bitcli.formats.npz import write as write_npz

    out = tmp_path_factory.mktemp("valid")
    assert run_main("convert", tiny_dir, out / "bitcli.safetensors")[0] == 0
    write_npz(load_checkpoint(str(out / "bitcli.safetensors")), out / "google.npz")
    return {name: (out / name).read_bytes() for name in ("bitcli.safetensors", "google.npz")}


def _load(path: Path) -> None:
    load_checkpoint(str(path)).build_model()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    which=st.sampled_from(["bitcli.safetensors", "google.npz"]),
    cut=st.one_of(st.none(), st.integers(min_value=0, max_value=200_000)),
    flips=st.lists(st.tuples(st.integers(0, 200_000), st.integers(0, 255)), max_size=8),
)
def test_mutated_checkpoints_load_or_fail_cleanly(tmp_path, tiny_files, which, cut, flips):
    data = bytearray(tiny_files[which])
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    for pos, value in flips:
        if data:
            data[pos % len(data)] = value
    path = tmp_path / which
    path.write_bytes(bytes(data))
    try:
        _load(path)
    except BitError as exc:
        assert "\n" not in str(exc)


class _Boom:
    """Unpickling this would create a marker file (through getattr, which torch's loader names): the test
    proves it is never unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _predict_error(photos, model) -> str:
    """`bit predict --model MODEL` on one photo must fail with exactly one `Error:` line, exit 1."""
    code, out, err = run_main("predict", photos["chelsea.png"], "--model", model)
    assert (code, out) == (1, ""), err
    assert err.startswith("Error: ") and err.count("\n") == 1, err
    return err.removeprefix("Error: ").rstrip("\n")


def test_pickled_bin_payload_never_runs(tmp_path, photos):
    marker = tmp_path / "pwned"
    torch.save({"stem.conv.weight": torch.zeros(16, 3, 7, 7), "evil": _Boom(marker)}, tmp_path / "evil.bin")
    assert _predict_error(photos, tmp_path / "evil.bin") == (
        f"{tmp_path / 'evil.bin'}: pickled Python objects, not plain weights (it refers to getattr); "
        "bitcli never unpickles those. If you trust the file, re-save its weights as safetensors with the tool that wrote it"
    )
    assert not marker.exists()


def test_object_array_in_npz_is_refused(tmp_path, photos):
    import numpy as np

    marker = tmp_path / "pwned"
    np.savez(
        tmp_path / "evil.npz",
        **{"resnet/root_block/standardized_conv2d/kernel": np.array([_Boom(marker)], dtype=object)},
    )
    assert _predict_error(photos, tmp_path / "evil.npz") == (
        f"{tmp_path / 'evil.npz'}: array resnet/root_block/standardized_conv2d/kernel holds Python objects (a pickle); "
        "bitcli refuses to load it"
    )
    assert not marker.exists()


def _copy_model(tiny_dir: Path, dst: Path) -> Path:
    return Path(shutil.copytree(tiny_dir, dst))


def test_nan_weights_are_refused(tmp_path, tiny_dir, photos):
    model = _copy_model(tiny_dir, tmp_path / "nan")
    state = load_file(model / "model.safetensors")
    state["bit.norm.weight"][3] = float("nan")
    save_file(state, model / "model.safetensors", metadata={"format": "pt"})
    assert _predict_error(photos, model) == (
        f"{model}: tensor bit.norm.weight holds NaN or infinite values; the checkpoint is corrupt"
    )  # named as the file names it


def test_integer_weights_are_refused(tmp_path, tiny_dir, photos):
    model = _copy_model(tiny_dir, tmp_path / "int")
    state = load_file(model / "model.safetensors")
    state["bit.norm.bias"] = state["bit.norm.bias"].to(torch.int32)
    save_file(state, model / "model.safetensors", metadata={"format": "pt"})
    assert _predict_error(photos, model) == (
        f"{model}: tensor bit.norm.bias has dtype torch.int32; BiT weights must be floating point"
    )


def test_config_that_lies_about_shapes(tmp_path, tiny_dir, photos):
    model = _copy_model(tiny_dir, tmp_path / "liar")
    config = json.loads((model / "config.json").read_text())
    config["hidden_sizes"] = [64, 128]  # the weights are 32, 64 wide
    (model / "config.json").write_text(json.dumps(config))
    assert _predict_error(photos, model) == (
        f"{model}: weights do not match the architecture: wrong shape "
        "bit.encoder.stages.0.layers.0.downsample.conv.weight (32, 16, 1, 1) (expected (64, 16, 1, 1)), "
        "bit.encoder.stages.0.layers.0.conv1.weight (8, 16, 1, 1) (expected (16, 16, 1, 1)), "
        "bit.encoder.stages.0.layers.0.norm2.weight (8,) (expected (16,)), "
        "bit.encoder.stages.0.layers.0.norm2.bias (8,) (expected (16,)) (+17 more)"
    )  # every problem counted, in transformers' names


def test_truncated_safetensors_names_the_problem(tmp_path, tiny_dir, photos):
    model = _copy_model(tiny_dir, tmp_path / "cut")
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) - 1000])
    assert _predict_error(photos, model) == (
        f"{model / 'model.safetensors'}: safetensors data runs past the end of the file (truncated)"
    )


@pytest.fixture()
def no_hang():
    """A read that blocks (a FIFO with no writer) fails the test after 20 s instead of hanging the suite."""
    import signal

    class Blocked(BaseException):  # not an OSError (TimeoutError is one): a reader's `except OSError` can't eat it
        pass

    def expire(*_):
        raise Blocked("blocked reading a FIFO")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("name", ["m.safetensors", "m.npz", "m.bin", "m.onnx"])
@pytest.mark.parametrize("command", ["predict", "convert"])
def test_fifo_model_file_is_refused_not_read(tmp_path, photos, monkeypatch, no_hang, name, command):
    monkeypatch.chdir(tmp_path)
    os.mkfifo(name)
    args = (
        ["predict", photos["chelsea.png"], "-m", name] if command == "predict" else ["convert", name, "o.safetensors"]
    )
    assert run_main(*args) == (
        1,
        "",
        f"Error: {name}: is a FIFO (named pipe), not a regular file\n",
    )
    assert sorted(os.listdir()) == [name]


@pytest.mark.parametrize(
    ("fifo", "what"),
    [("config.json", "JSON"), ("preprocessor_config.json", "JSON"), ("model.safetensors", "model")],
)
def test_fifo_in_a_model_folder_is_refused_not_read(tmp_path, tiny_dir, photos, no_hang, fifo, what):
    folder = tmp_path / "model"
    shutil.copytree(tiny_dir, folder)
    (folder / fifo).unlink()
    os.mkfifo(folder / fifo)
    assert run_main("predict", photos["chelsea.png"], "-m", folder) == (
        1,
        "",
        f"Error: {folder / fifo}: is a FIFO (named pipe), not a regular file\n",
    )


def test_fifo_labels_file_is_refused_not_read(tmp_path, tiny_dir, no_hang):
    os.mkfifo(tmp_path / "labels.txt")
    assert run_main("convert", tiny_dir, tmp_path / "o.safetensors", "--labels", tmp_path / "labels.txt") == (
        1,
        "",
        f"Error: {tmp_path / 'labels.txt'}: is a FIFO (named pipe), not a regular file\n",
    )
