"""`bit predict` end to end through the real CLI entry point (in this process): numbers against transformers,
formats, inputs, failures."""

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
from conftest import run_bit, run_main
from PIL import Image


def _json(result: tuple[int, str, str]) -> list[dict]:
    _, out, _ = result
    assert out.lstrip().startswith("["), out[:200]
    return json.loads(out)  # the whole of stdout is exactly one JSON array


def _transformers_top_k(model_dir: Path, paths: list[Path], k: int) -> list[tuple[list[int], list[str], np.ndarray]]:
    """The peer's answer for the same files: transformers' PIL processor and model, top-k softmax."""
    model = transformers.BitForImageClassification.from_pretrained(model_dir).eval()
    processor = transformers.BitImageProcessorPil.from_pretrained(model_dir)
    pixels = processor([Image.open(p) for p in paths], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        top = model(pixels).logits.softmax(-1).topk(k, dim=-1)
    return [
        (i.tolist(), [model.config.id2label[j] for j in i.tolist()], s.numpy()) for s, i in zip(top.values, top.indices)
    ]


def _assert_matches_peer(rows: list[dict], peer: list[tuple[list[int], list[str], np.ndarray]], atol: float) -> None:
    assert len(rows) == len(peer)
    for row, (indices, labels, scores) in zip(rows, peer):
        assert [p["index"] for p in row["predictions"]] == indices, row["path"]
        assert [p["label"] for p in row["predictions"]] == labels
        assert np.allclose([p["score"] for p in row["predictions"]], scores, atol=atol, rtol=0)


def test_real_photos_match_transformers_pipeline(bit50_dir, photos):
    paths = list(photos.values())
    result = run_main("predict", *paths, "--model", bit50_dir, "--format", "json", "--top-k", "5", "--device", "cpu")
    assert result[0] == 0, result[2]
    got = _json(result)
    assert [r["path"] for r in got] == [str(p) for p in paths]
    _assert_matches_peer(got, _transformers_top_k(bit50_dir, paths, 5), atol=1e-3)


def test_formats_agree(tiny_dir, photos, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # the table is as wide as the terminal: keep names unfolded
    images = [photos["chelsea.png"], photos["coffee.png"]]
    base = ["predict", *images, "--model", tiny_dir, "--top-k", "3"]
    as_json = _json(run_main(*base, "--format", "json"))
    _assert_matches_peer(as_json, _transformers_top_k(tiny_dir, images, 3), atol=1e-5)

    jsonl = run_main(*base, "--format", "jsonl")[1]
    assert [json.loads(line) for line in jsonl.splitlines()] == as_json

    rows = list(csv.DictReader(io.StringIO(run_main(*base, "--format", "csv")[1])))
    assert len(rows) == 6
    assert [(r["path"], int(r["rank"]), r["label"], int(r["index"])) for r in rows] == [
        (r["path"], rank, p["label"], p["index"]) for r in as_json for rank, p in enumerate(r["predictions"], 1)
    ]
    assert all(
        abs(float(r["score"]) - p["score"]) < 1e-6 for r, p in zip(rows, [p for r in as_json for p in r["predictions"]])
    )

    code, table, err = run_main(*base)
    assert (code, err) == (0, "")
    for r in as_json:
        assert f"│ {r['path']} " in table
        for p in r["predictions"]:
            assert f"│ {p['label']} ({p['index']}) " in table and f" {p['score']:.4f} │" in table


def test_output_file_and_clean_stdout(tiny_dir, photos, tmp_path):
    out = tmp_path / "preds.json"
    assert run_main("predict", photos["rocket.jpg"], "--model", tiny_dir, "--format", "json", "--output", out) == (
        0,
        "",
        "",
    )
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

    flat = _json(run_main("predict", root, "--model", tiny_dir, "--format", "json"))
    assert [Path(r["path"]).name for r in flat] == ["a.png", "b.jpg"]

    deep = _json(run_main("predict", root, "--recursive", "--model", tiny_dir, "--format", "json"))
    assert [Path(r["path"]).relative_to(root).as_posix() for r in deep] == ["a.png", "b.jpg", "sub/c.png"]

    globbed = _json(run_main("predict", str(root / "*.png"), "--model", tiny_dir, "--format", "json"))
    assert [Path(r["path"]).name for r in globbed] == ["a.png"]

    # the same image by name and through a glob: one row per occurrence, classified identically
    same = _json(run_main("predict", root / "a.png", str(root / "a.*"), "--model", tiny_dir, "--format", "json"))
    assert [r["path"] for r in same] == [str(root / "a.png")] * 2
    assert all(r["predictions"] == flat[0]["predictions"] for r in same)


def test_batching_does_not_change_results(tiny_dir, photos):
    images = list(photos.values())
    one = _json(
        run_main("predict", *images, "--model", tiny_dir, "--format", "json", "--batch-size", "1", "--workers", "0")
    )
    many = _json(
        run_main("predict", *images, "--model", tiny_dir, "--format", "json", "--batch-size", "3", "--workers", "3")
    )
    assert [r["path"] for r in one] == [r["path"] for r in many] == [str(p) for p in images]
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
    result = run_main("predict", *args, "--model", tiny_dir, "--format", "json")
    code, _, stderr = result
    assert code == 1
    assert "Traceback" not in stderr
    rows = {Path(r["path"]).name: r for r in _json(result)}
    assert set(rows) == {p.name for p in good} | set(bad) | {"missing.jpg"}
    for p in good:
        assert len(rows[p.name]["predictions"]) == 5
    for name in [*bad, "missing.jpg"]:
        error = rows[name]["error"]
        assert name in error and "\n" not in error
        assert f"error: {error}" in stderr  # each failure also gets one line on stderr
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
    names = [
        "rgb.png",
        "gray.png",
        "gray_as_rgb.png",
        "rgba.png",
        "cmyk.tiff",
        "palette.png",
        "palette_as_rgb.png",
        "rotated.png",
    ]
    result = run_main(
        "predict", *(tmp_path / n for n in names), "--model", tiny_dir, "--format", "json", "--top-k", "10"
    )
    assert result[0] == 0, result[2]
    by_name = {Path(r["path"]).name: r["predictions"] for r in _json(result)}
    assert by_name["rgba.png"] == by_name["rgb.png"]
    assert by_name["cmyk.tiff"] == by_name["rgb.png"]
    assert by_name["rotated.png"] == by_name["rgb.png"]
    assert by_name["gray.png"] == by_name["gray_as_rgb.png"]
    assert by_name["palette.png"] == by_name["palette_as_rgb.png"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--top-k", "0"],
            "Invalid value for '--top-k' / '-k': Input should be greater than or equal to 1 (`bit predict -h` lists the options)\n",
        ),
        (["--format", "xml"], "Invalid value for '--format' / '-f'"),
        (
            ["--batch-size", "0"],
            "Invalid value for '--batch-size' / '-b': Input should be greater than or equal to 1 (`bit predict -h` lists the options)\n",
        ),
        (
            ["--workers", "-1"],
            "Invalid value for '--workers': Input should be greater than or equal to 0 (`bit predict -h` lists the options)\n",
        ),
        (["--device", "tpu"], "Error: --device 'tpu': use auto, cpu, cuda, cuda:N or mps\n"),
        (
            ["--device", "cuda"],
            "Error: --device cuda: CUDA is not available on this machine; use --device cpu or auto\n",
        ),
        (["--precision", "fp8"], "Invalid value for '--precision'"),
        (["--no-such-flag"], "No such option: --no-such-flag"),
    ],
)
def test_usage_errors_exit_2(tiny_dir, photos, flags, message):
    if "cuda" in flags and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, out, err = run_main("predict", photos["chelsea.png"], "--model", tiny_dir, *flags)
    assert (code, out) == (2, ""), err
    assert message in err and len(err.splitlines()) == 1  # one line: no usage block, no traceback


@pytest.mark.parametrize(
    "model, message",
    [
        ("./no/such/model.safetensors", "model './no/such/model.safetensors': no such file or folder"),
        ("not-a-model", "model 'not-a-model': no such file or folder, and not a Hub repo id"),
    ],
)
def test_model_errors_are_one_line(photos, model, message):
    code, out, err = run_main("predict", photos["chelsea.png"], "--model", model)
    assert (code, out) == (1, "")
    assert err.startswith(f"Error: {message}") and err.count("\n") == 1, err


def test_model_missing_from_the_hub_cache_is_one_line(photos, tmp_path):
    """A process: huggingface_hub reads HF_HOME (where the cache is) when it is imported."""
    result = run_bit(
        "predict", photos["chelsea.png"], "--model", "google/no-such-bit", env={"HF_HOME": str(tmp_path / "hf")}
    )
    assert (result.returncode, result.stdout) == (1, "")
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "not in the Hugging Face cache" in lines[0], (
        result.stderr
    )
    assert str(tmp_path / "hf") in lines[0]


def test_headless_checkpoint_cannot_predict(tmp_path, photos):
    from conftest import save_hf_model

    folder = save_hf_model(
        tmp_path / "headless", embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1], num_groups=8, num_labels=0
    )
    code, out, err = run_main("predict", photos["chelsea.png"], "--model", folder)
    assert (code, out) == (1, "")
    assert err == f"Error: {folder}: checkpoint has no classification head; it gives features, not labels\n"
