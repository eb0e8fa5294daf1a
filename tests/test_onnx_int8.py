"""`bit convert SRC m.onnx --quantize int8 --calibrate DIR`: the reported top-1 agreement is what onnxruntime
gives for the float32 and int8 graphs on DIR's images, a low agreement writes nothing, and the int8 file serves."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import transformers
from conftest import BIT50_PREPROCESSOR, TINY_LABELS, run_main, save_hf_model
from PIL import Image

TINY = dict(embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1], num_groups=8, id2label=dict(enumerate(TINY_LABELS)),
            label2id={n: i for i, n in enumerate(TINY_LABELS)})  # fmt: skip
CROP_64 = {**BIT50_PREPROCESSOR, "size": {"shortest_edge": 64}, "crop_size": {"height": 64, "width": 64}}


@pytest.fixture(scope="module")
def calibration(photos, tmp_path_factory):
    folder = tmp_path_factory.mktemp("calibration")
    for path in photos.values():
        shutil.copy(path, folder / path.name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")  # named on stderr and left out
    return folder


def metadata(path: Path) -> dict:
    """The file's metadata_props, read with onnx itself."""
    return {p.key: json.loads(p.value) for p in onnx.load(str(path)).metadata_props}


def top1(model_path, pixels: np.ndarray) -> np.ndarray:
    return (
        ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
        .run(["logits"], {"pixel_values": pixels})[0]
        .argmax(-1)
    )


def test_int8_reports_onnxruntime_agreement_and_serves(calibration, photos, tmp_path):
    src = save_hf_model(tmp_path / "src", CROP_64, head_scale=20.0, **TINY)
    fp32, int8 = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    assert run_main("convert", src, fp32)[0] == 0
    code, out, err = run_main(
        "convert", src, int8, "--quantize", "int8", "--calibrate", calibration, "--min-agreement", "0"
    )
    assert (code, out) == (0, ""), err
    assert f"skipped: {calibration / 'broken.jpg'}: " in err
    agreed, total = map(
        int, re.search(r"int8 top-1 agrees with float32 on (\d+) of (\d+) calibration images", err).groups()
    )
    # The oracle: onnxruntime on both files, with transformers' own preprocessing of the same photos.
    paths = sorted(p for p in calibration.iterdir() if p.name != "broken.jpg")
    pixels = transformers.BitImageProcessorPil.from_pretrained(src)(
        [Image.open(p) for p in paths], return_tensors="np"
    )["pixel_values"]
    assert total == len(paths) and agreed == int((top1(fp32, pixels) == top1(int8, pixels)).sum())
    meta = metadata(int8)
    assert meta["bitcli.precision"] == "int8" and meta["bitcli.check"]["top1_agreement"] == agreed / total
    ops = {n.op_type for n in onnx.load(str(int8)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ: int8 kernels and activations
    kernels = {t.name: t.data_type for t in onnx.load(str(int8)).graph.initializer}
    assert onnx.TensorProto.INT8 in kernels.values()
    code, out, err = run_main("predict", *photos.values(), "--model", int8, "--format", "json", "--top-k", "1")
    assert code == 0, err
    assert [r["predictions"][0]["index"] for r in json.loads(out)] == top1(int8, transformers.BitImageProcessorPil.from_pretrained(src)(
        [Image.open(p) for p in photos.values()], return_tensors="np")["pixel_values"]).tolist()  # fmt: skip


def test_low_agreement_writes_nothing(calibration, tmp_path):
    # Classes 0 and 1 on top of every image, with head rows 1e-5 apart: float32 tells them apart image by
    # image, while int8 rounds both rows to the same integers and always answers class 0.
    src = save_hf_model(tmp_path / "src", CROP_64, **TINY)
    model = transformers.BitForImageClassification.from_pretrained(src)
    with torch.no_grad():
        head = model.classifier[1]
        head.weight[1] = head.weight[0] + 1e-5 * torch.randn(
            head.weight.shape[1], generator=torch.Generator().manual_seed(0)
        )
        head.bias[1] = head.bias[0]
        head.bias[:2] += 10.0
    model.save_pretrained(src)
    dst = tmp_path / "int8.onnx"
    code, out, err = run_main("convert", src, dst, "--quantize", "int8", "--calibrate", calibration)
    assert (code, out) == (1, "")
    line = err.splitlines()[-1]
    assert re.fullmatch(r"Error: int8 top-1 agrees with float32 on \d+\.\d% of the calibration images, below --min-agreement 0\.99; "
                        r"nothing was written \(.*\)", line), line  # fmt: skip
    assert not dst.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_calibration_folder_without_images(tmp_path):
    src = save_hf_model(tmp_path / "src", CROP_64, **TINY)
    (tmp_path / "empty").mkdir()
    code, _, err = run_main(
        "convert", src, tmp_path / "x.onnx", "--quantize", "int8", "--calibrate", tmp_path / "empty"
    )
    assert (
        code == 1
        and err.splitlines()[-1]
        == f"Error: --calibrate {tmp_path / 'empty'}: holds no image that decodes; int8 needs images to calibrate on"
    )
    assert not (tmp_path / "x.onnx").exists()
