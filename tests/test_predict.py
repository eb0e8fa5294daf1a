"""`bit predict` end to end through the real CLI: numbers against transformers, formats, inputs, failures."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from conftest import TINY_LABELS, run_bit
from PIL import Image


def _json(result) -> list[dict]:
    assert result.stdout.lstrip().startswith("["), result.stdout[:200]
    return json.loads(result.stdout)  # the whole of stdout is exactly one JSON array


def test_real_photos_match_transformers_pipeline(bit50_dir, photos):
    paths = list(photos.values())
    result = run_bit("predict", *paths, "--model", bit50_dir, "--format", "json", "--top-k", "5", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    got = _json(result)
    assert [r["path"] for r in got] == [str(p) for p in paths]

    model = transformers.BitForImageClassification.from_pretrained(bit50_dir).eval()
    processor = transformers.BitImageProcessorPil.from_pretrained(bit50_dir)
    pixels = processor([Image.open(p) for p in paths], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        probs = model(pixels).logits.softmax(-1)
    top = probs.topk(5, dim=-1)
    for row, scores, indices in zip(got, top.values, top.indices):
        assert [p["index"] for p in row["predictions"]] == indices.tolist(), row["path"]
        assert [p["label"] for p in row["predictions"]] == [model.config.id2label[i] for i in indices.tolist()]
        assert np.allclose([p["score"] for p in row["predictions"]], scores.numpy(), atol=1e-3, rtol=0)


def test_formats_agree(tiny_dir, photos):
    images = [photos["chelsea.png"], photos["coffee.png"]]
    base = ["predict", *images, "--model", tiny_dir, "--top-k", "3"]
    as_json = _json(run_bit(*base, "--format", "json"))
    assert all(len(r["predictions"]) == 3 for r in as_json)
    assert all(p["label"] in TINY_LABELS and 0 <= p["score"] <= 1 for r in as_json for p in r["predictions"])

    jsonl = run_bit(*base, "--format", "jsonl")
    assert [json.loads(line) for line in jsonl.stdout.splitlines()] == as_json

    rows = list(csv.DictReader(io.StringIO(run_bit(*base, "--format", "csv").stdout)))
    assert len(rows) == 6
    assert [(r["path"], int(r["rank"]), r["label"], int(r["index"])) for r in rows] == [
        (r["path"], rank, p["label"], p["index"]) for r in as_json for rank, p in enumerate(r["predictions"], 1)
    ]
    assert all(abs(float(r["score"]) - p["score"]) < 1e-6 for r, p in zip(rows, [p for r in as_json for p in r["predictions"]]))

    table = run_bit(*base)
    assert table.returncode == 0 and table.stderr == ""
    for r in as_json:
        assert Path(r["path"]).name in table.stdout
        assert r["predictions"][0]["label"] in table.stdout
        assert f"{r['predictions'][0]['score']:.4f}" in table.stdout


def test_output_file_and_clean_stdout(tiny_dir, photos, tmp_path):
    out = tmp_path / "preds.json"
    result = run_bit("predict", photos["rocket.jpg"], "--model", tiny_dir, "--format", "json", "--output", out)
    assert result.returncode == 0 and result.stdout == ""
    data = json.loads(out.read_text())
    assert data[0]["path"] == str(photos["rocket.jpg"])
    assert [p.name for p in tmp_path.iterdir()] == ["preds.json"]  # no temporary left behind


def test_folders_globs_and_recursion(tiny_dir, photos, tmp_path):
    root = tmp_path / "album"
    (root / "sub").mkdir(parents=True)
    shutil.copy(photos["chelsea.png"], root / "a.png")
    shutil.copy(photos["rocket.jpg"], root / "b.jpg")
    shutil.copy(photos["coffee.png"], root / "sub" / "c.png")
    (root / "notes.txt").write_text("not an image, and not picked up from a folder")

    flat = _json(run_bit("predict", root, "--model", tiny_dir, "--format", "json"))
    assert [Path(r["path"]).name for r in flat] == ["a.png", "b.jpg"]

    deep = _json(run_bit("predict", root, "--recursive", "--model", tiny_dir, "--format", "json"))
    assert [Path(r["path"]).relative_to(root).as_posix() for r in deep] == ["a.png", "b.jpg", "sub/c.png"]

    globbed = _json(run_bit("predict", str(root / "*.png"), "--model", tiny_dir, "--format", "json"))
    assert [Path(r["path"]).name for r in globbed] == ["a.png"]

    # the same image by name and through a glob: one row per occurrence, classified identically
    same = _json(run_bit("predict", root / "a.png", str(root / "a.*"), "--model", tiny_dir, "--format", "json"))
    assert [r["path"] for r in same] == [str(root / "a.png")] * 2
    assert all(r["predictions"] == flat[0]["predictions"] for r in same)


def test_batching_does_not_change_results(tiny_dir, photos):
    images = list(photos.values())
    one = _json(run_bit("predict", *images, "--model", tiny_dir, "--format", "json", "--batch-size", "1", "--workers", "1"))
    many = _json(run_bit("predict", *images, "--model", tiny_dir, "--format", "json", "--batch-size", "3", "--workers", "3"))
    assert [r["path"] for r in one] == [r["path"] for r in many]
    for a, b in zip(one, many):
        assert [p["index"] for p in a["predictions"]] == [p["index"] for p in b["predictions"]]
        assert np.allclose([p["score"] for p in a["predictions"]], [p["score"] for p in b["predictions"]], atol=1e-5)


def test_bad_inputs_fail_alone(tiny_dir, photos, tmp_path):
    good = [photos["chelsea.png"], photos["rocket.jpg"]]
    bad = {
        "empty.jpg": b"",
        "text.png": b"hello, I am not a picture",
        "truncated.jpg": photos["rocket.jpg"].read_bytes()[:5000],
        "corrupt.png": b"\x89PNG\r\n\x1a\n" + os.urandom(200),
    }
    for name, content in bad.items():
        (tmp_path / name).write_bytes(content)
    missing = tmp_path / "missing.jpg"
    args = [good[0], *(tmp_path / n for n in bad), missing, good[1]]
    result = run_bit("predict", *args, "--model", tiny_dir, "--format", "json")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    rows = {Path(r["path"]).name: r for r in _json(result)}
    assert set(rows) == {p.name for p in good} | set(bad) | {"missing.jpg"}
    for p in good:
        assert len(rows[p.name]["predictions"]) == 5
    for name in [*bad, "missing.jpg"]:
        error = rows[name]["error"]
        assert name in error and "\n" not in error
        assert f"error: {error}" in result.stderr  # each failure also gets one line on stderr
    assert "no such file" in rows["missing.jpg"]["error"]
    assert "truncated" in rows["truncated.jpg"]["error"]


def test_odd_modes_and_rotation_classify_like_upright_rgb(tiny_dir, photos, tmp_path):
    upright = Image.open(photos["coffee.png"]).convert("RGB")
    upright.save(tmp_path / "rgb.png")
    upright.convert("L").convert("RGB").save(tmp_path / "gray_as_rgb.png")
    upright.convert("L").save(tmp_path / "gray.png")
    upright.convert("RGBA").save(tmp_path / "rgba.png")
    upright.convert("CMYK").save(tmp_path / "cmyk.tiff")
    palette = upright.quantize(256)
    palette.save(tmp_path / "palette.png")
    palette.convert("RGB").save(tmp_path / "palette_as_rgb.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view": stored turned the other way
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "rotated.png", exif=exif)
    names = ["rgb.png", "gray.png", "gray_as_rgb.png", "rgba.png", "cmyk.tiff", "palette.png", "palette_as_rgb.png", "rotated.png"]
    result = run_bit("predict", *(tmp_path / n for n in names), "--model", tiny_dir, "--format", "json", "--top-k", "10")
    assert result.returncode == 0, result.stderr
    by_name = {Path(r["path"]).name: r["predictions"] for r in _json(result)}
    assert by_name["rgba.png"] == by_name["rgb.png"]
    assert by_name["cmyk.tiff"] == by_name["rgb.png"]
    assert by_name["rotated.png"] == by_name["rgb.png"]
    assert by_name["gray.png"] == by_name["gray_as_rgb.png"]
    assert by_name["palette.png"] == by_name["palette_as_rgb.png"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--top-k", "0"], "--top-k"),
        (["--format", "xml"], "--format"),
        (["--batch-size", "0"], "--batch-size"),
        (["--device", "tpu"], "--device"),
        (["--device", "cuda"], "CUDA is not available"),
        (["--precision", "fp8"], "--precision"),
        (["--no-such-flag"], "No such option"),
    ],
)
def test_usage_errors_exit_2(tiny_dir, photos, flags, message):
    if "cuda" in flags and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = run_bit("predict", photos["chelsea.png"], "--model", tiny_dir, *flags)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    "model, message",
    [
        ("./no/such/model.safetensors", "no such file or folder"),
        ("not-a-model", "no such file or folder"),
        ("google/no-such-bit", "not in the Hugging Face cache"),
    ],
)
def test_model_errors_are_one_line(photos, model, message, tmp_path):
    result = run_bit("predict", photos["chelsea.png"], "--model", model, env={"HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], result.stderr
    assert result.stdout == ""


def test_headless_checkpoint_cannot_predict(tmp_path, photos):
    from conftest import save_hf_model

    folder = save_hf_model(tmp_path / "headless", embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1], num_groups=8, num_labels=0)
    result = run_bit("predict", photos["chelsea.png"], "--model", folder)
    assert result.returncode == 1 and "no classification head" in result.stderr
