"""The registry (bitcli.formats): which format reads a path, and the writers `bit convert` looks up by name."""

from __future__ import annotations

import json
import shutil

import pytest

from bitcli.errors import BitError
from bitcli.formats import FORMATS, MODEL_FILE_SUFFIXES, detect
from bitcli.options import ConvertFormat


def test_every_convert_format_has_a_writer_and_says_if_it_is_a_folder():
    assert {f.value for f in ConvertFormat} <= set(FORMATS)
    assert {name: f.folder for name, f in FORMATS.items()} == {
        "bitcli": False,
        "timm": True,
        "hf": True,
        "npz": False,
        "onnx": False,
    }
    assert {name: f.fixed_eps_library for name, f in FORMATS.items()} == {
        "bitcli": None, "timm": "timm", "hf": "transformers", "npz": None, "onnx": None,
    }  # fmt: skip
    assert sorted(MODEL_FILE_SUFFIXES) == [".bin", ".npz", ".onnx", ".pt", ".pth", ".safetensors"]


@pytest.mark.parametrize(
    "name, expected",
    [
        ("m.safetensors", "bitcli"),
        ("M.NPZ", "npz"),
        ("m.bin", "timm"),
        ("m.pth", "timm"),
        ("m.pt", "timm"),
        ("m.onnx", "onnx"),
    ],
)
def test_files_by_suffix(tmp_path, name, expected):
    (tmp_path / name).write_bytes(b"")
    assert detect(tmp_path / name).name == expected


@pytest.mark.parametrize(
    "config, expected",
    [
        ({"model_type": "bit"}, "hf"),
        ({"architectures": ["BitForImageClassification"]}, "hf"),
        ({"architecture": "resnetv2_50x1_bit"}, "timm"),
        ({"architecture": "resnetv2_50x1_bit", "model_type": "bit"}, "timm"),  # timm's "architecture" wins
    ],
)
def test_folders_by_config_json(tmp_path, config, expected):
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert detect(tmp_path).name == expected


def test_what_no_format_reads_is_one_clear_error(tmp_path, tiny_dir):
    (tmp_path / "m.tflite").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    (tmp_path / "vit").mkdir()
    (tmp_path / "vit" / "config.json").write_text(json.dumps({"model_type": "vit"}))
    expected = {
        "m.tflite": f"{tmp_path / 'm.tflite'}: unknown model file type '.tflite'; use .safetensors, .npz, .bin/.pth, .onnx or a model folder",
        "empty": f"{tmp_path / 'empty'}: folder has no config.json; expected a transformers or timm model folder",
        "vit": f"{tmp_path / 'vit' / 'config.json'}: neither a transformers BiT config (model_type 'bit') nor a timm config",
    }
    for name, message in expected.items():
        with pytest.raises(BitError) as err:
            detect(tmp_path / name)
        assert str(err.value) == message
    shutil.copytree(tiny_dir, tmp_path / "tiny")
    assert detect(tmp_path / "tiny").read(tmp_path / "tiny").format == "hf"
