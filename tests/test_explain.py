"""`bit explain`: Grad-CAM maps of any images equal the `grad-cam` package's GradCAM on transformers' own model
(the final norm + ReLU, `bit.norm`) fed by transformers' own preprocessing, to 1e-4; overlays on the image as the
user sees it (EXIF-rotated, grey, transparent), one JSON row per input, failures in place."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_LABELS, run_main
from PIL import Image, ImageOps


@pytest.fixture(scope="module")
def images(photos: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Five inputs of every kind a user has: RGB photos, a grey PNG, an RGBA PNG, and a JPEG whose EXIF says to
    turn it a quarter (stored 451x300, shown 300x451)."""
    folder = tmp_path_factory.mktemp("explain")
    cat = Image.open(photos["chelsea.png"]).convert("RGB")
    grey, rgba, rotated = folder / "grey.png", folder / "clear.png", folder / "turned.jpg"
    cat.convert("L").save(grey)
    transparent = cat.convert("RGBA")
    transparent.putalpha(Image.linear_gradient("L").resize(cat.size))
    transparent.save(rgba)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to show
    cat.save(rotated, exif=exif, quality=95)
    return [photos["chelsea.png"], photos["rocket.jpg"], grey, rgba, rotated]


def oracle(model_dir: Path, images: list[Path], target: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(the grad-cam package's maps [N, H, W], softmax [N, classes]) on transformers' model and preprocessing, for
    the images as shown (EXIF applied; transformers composites transparency on white itself)."""
    import transformers
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = transformers.BitForImageClassification.from_pretrained(model_dir).eval()
    processor = transformers.BitImageProcessorPil.from_pretrained(model_dir)
    shown = [ImageOps.exif_transpose(Image.open(p)) for p in images]
    x = processor(shown, return_tensors="pt")["pixel_values"]

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return self.model(pixel_values=pixel_values).logits

    with torch.no_grad():
        probs = model(pixel_values=x).logits.softmax(dim=1).numpy()
    targets = probs.argmax(axis=1) if target is None else np.full(len(images), target)
    with GradCAM(model=Logits(), target_layers=[model.bit.norm]) as cam:
        maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets])
    return maps, probs


def read_maps(folder: Path) -> tuple[np.ndarray, dict[str, str]]:
    from safetensors import safe_open

    with safe_open(folder / "maps.safetensors", "np") as f:
        assert list(f.keys()) == ["maps"]
        return f.get_tensor("maps"), f.metadata()


def test_maps_equal_grad_cam_on_transformers_and_overlays_follow_the_image(
    tiny_dir: Path, images, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    missing = tmp_path / "missing.png"
    args = [*images[:2], missing, *images[2:]]
    code, stdout, err = run_main("explain", *args, "--model", tiny_dir, "-o", out, "-b", "2", "--workers", "0")
    assert code == 1  # the missing file; every other input is explained
    assert err.splitlines()[-1] == f"error: {missing}: no such file or folder"
    rows = [json.loads(line) for line in stdout.splitlines()]
    assert [r["path"] for r in rows] == [str(p) for p in args]
    assert rows[2] == {"path": str(missing), "error": f"{missing}: no such file or folder"}
    del rows[2]
    assert [json.loads(line) for line in (out / "explain.jsonl").read_text().splitlines()][:2] == rows[:2]

    expected, probs = oracle(tiny_dir, images, target=None)
    maps, metadata = read_maps(out)
    assert maps.shape == (5, 64, 64) and maps.dtype == np.float32
    np.testing.assert_allclose(maps, expected, atol=1e-4, rtol=0)
    assert json.loads(metadata["paths"]) == [str(p) for p in images]
    for row, p in zip(rows, probs):
        assert row["index"] == int(p.argmax()) and row["target"] == TINY_LABELS[row["index"]]
        assert row["score"] == pytest.approx(p.max(), abs=1e-5)
    assert json.loads(metadata["targets"]) == [r["target"] for r in rows]

    for number, (row, image) in enumerate(zip(rows, images), 1):
        overlay = Path(row["overlay"])
        assert overlay.parent == out and overlay.name.startswith(f"{number + (number > 2):05d}-")
        shown = ImageOps.exif_transpose(Image.open(image))
        assert Image.open(overlay).size == shown.size  # as the user sees it: the turned JPEG is 300x451
    assert Image.open(rows[4]["overlay"]).size == (300, 451)


def test_target_explains_one_class_everywhere_and_a_rerun_replaces_the_output(
    tiny_dir: Path, images, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    assert run_main("explain", images[0], "--model", tiny_dir, "-o", out)[0] == 0
    (out / "notes.txt").write_text("the user's")
    code, stdout, err = run_main("explain", *images[1:3], "--model", tiny_dir, "-o", out, "--target", "banana")
    assert code == 0, err
    rows = [json.loads(line) for line in stdout.splitlines()]
    assert [(r["target"], r["index"]) for r in rows] == [("banana", 1), ("banana", 1)]
    expected, probs = oracle(tiny_dir, images[1:3], target=1)
    np.testing.assert_allclose(read_maps(out)[0], expected, atol=1e-4, rtol=0)
    assert [r["score"] for r in rows] == pytest.approx(probs[:, 1], abs=1e-5)
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert names == sorted([Path(rows[0]["overlay"]).name, Path(rows[1]["overlay"]).name, "explain.jsonl",
                            "maps.safetensors", "notes.txt"])  # fmt: skip


def test_bad_targets_models_and_folders_are_one_line(tiny_dir: Path, images, tmp_path: Path) -> None:
    code, out, err = run_main("explain", images[0], "--model", tiny_dir, "-o", tmp_path / "a", "--target", "durian")
    assert (code, out) == (1, "")
    assert err.startswith("Error: --target: class 'durian' is not a label of ")
    assert err.endswith("; give a label as `bit predict` prints it, its first name, or a class index\n")
    assert not (tmp_path / "a").exists()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "photo.jpg").write_bytes(b"mine")
    code, out, err = run_main("explain", images[0], "--model", tiny_dir, "-o", tmp_path / "b")
    assert (code, out) == (2, "")
    assert "holds 'photo.jpg', which bitcli did not write" in err


def test_an_onnx_model_is_refused_and_writes_nothing(tiny_onnx: Path, images, tmp_path: Path) -> None:
    code, out, err = run_main("explain", images[0], "--model", tiny_onnx, "-o", tmp_path / "out")
    assert (code, out) == (1, "")
    assert err == (
        f"Error: {tiny_onnx}: Grad-CAM needs the torch checkpoint the ONNX file was exported from (the export gives "
        "logits only)\n"
    )
    assert not (tmp_path / "out").exists()


def test_an_undecodable_image_is_its_row_s_error_and_the_others_are_explained(
    tiny_dir: Path, images, tmp_path: Path
) -> None:
    broken = tmp_path / '"><img src=x onerror=alert(1)>.png'
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not a picture")
    out = tmp_path / "out"
    code, stdout, err = run_main("explain", broken, images[0], "--model", tiny_dir, "-o", out)
    assert code == 1
    why = f"{broken}: not an image PIL can read (empty, corrupt or another format)"
    assert err.splitlines()[-1] == f"error: {why}"
    rows = [json.loads(line) for line in stdout.splitlines()]
    assert rows[0] == {"path": str(broken), "error": why} and rows[1]["path"] == str(images[0])
    assert Path(rows[1]["overlay"]) == out / "00002-chelsea.png" and (out / "00002-chelsea.png").is_file()
    maps, metadata = read_maps(out)
    assert maps.shape == (1, 64, 64) and json.loads(metadata["paths"]) == [str(images[0])]
    assert sorted(p.name for p in out.iterdir()) == sorted([".bitcli-page.json", "00002-chelsea.png",
                                                            "explain.jsonl", "maps.safetensors"])  # fmt: skip


def test_an_output_inside_a_folder_read_recursively_or_another_command_s_folder_is_refused(
    images, tmp_path: Path
) -> None:
    """Before any work (exit 2): with --recursive, the next run would explain its own overlays; and a report of
    `bit eval --report` is no folder of explain's (neither replaces the other's)."""
    from bitcli.pages.folder import EVAL_REPORT, write_page_folder

    inside = images[2].parent / "out"
    code, out, err = run_main("explain", images[2].parent, "-r", "--model", "nothing-is-loaded", "-o", inside)
    assert (code, out) == (2, "")
    assert (
        err == f"Error: --output {inside}: is inside the image folder {images[2].parent}; choose a folder outside it\n"
    )
    assert not inside.exists()
    write_page_folder(tmp_path / "report", {"index.html": b"the report"}, EVAL_REPORT)
    code, out, err = run_main("explain", images[0], "--model", "nothing-is-loaded", "-o", tmp_path / "report")
    assert (code, out) == (2, "")
    assert err == (
        f"Error: --output {tmp_path / 'report'}: was written by bit eval --report; give a new or empty folder, or "
        "one that bit explain wrote\n"
    )
    assert (tmp_path / "report" / "index.html").read_bytes() == b"the report"


@pytest.mark.parametrize("stored", ["temperature", "thresholds"])
def test_the_score_is_bit_predict_s_for_a_calibrated_or_a_multi_label_model(
    stored: str, tiny_dir: Path, images, tmp_path: Path
) -> None:
    """The row's score is the one `bit predict` gives the explained class: softmax(logits / T) for a model with a
    stored temperature, the class's sigmoid for a multi-label model (not the softmax at temperature 1)."""
    import dataclasses

    from bitcli.formats import bitcli as bitcli_format
    from bitcli.hub import load_checkpoint

    extra = {"temperature": 0.535} if stored == "temperature" else {"thresholds": [0.45, 0.5, 0.55] * 3 + [0.5]}
    model = tmp_path / f"{stored}.safetensors"
    bitcli_format.write(dataclasses.replace(load_checkpoint(str(tiny_dir)), **extra), model)
    code, stdout, err = run_main("explain", *images[:3], "--model", model, "-o", tmp_path / "out", "--workers", "0")
    assert code == 0, err
    rows = [json.loads(line) for line in stdout.splitlines()]
    code, out, err = run_main("predict", *images[:3], "--model", model, "-f", "json", "-k", "10", "--workers", "0")
    assert code == 0, err
    predicted = json.loads(out)
    assert [r["path"] for r in rows] == [p["path"] for p in predicted] == [str(p) for p in images[:3]]
    for row, prediction in zip(rows, predicted):
        scores = {p["index"]: p["score"] for p in prediction["predictions"]}
        # explained: the prediction (a multi-label model's: its first label, else its top score)
        assert row["index"] == (prediction.get("labels") or prediction["predictions"])[0]["index"]
        assert row["score"] == pytest.approx(scores[row["index"]], abs=1e-6)
        if stored == "thresholds":
            assert row["above_threshold"] is (row["index"] in [p["index"] for p in prediction["labels"]])
        else:
            assert "above_threshold" not in row


def test_a_multi_label_model_explains_a_label_bit_predict_prints(tiny_dir: Path, images, tmp_path: Path) -> None:
    """A multi-label model explains the highest-scoring class that reaches its threshold (one of the labels bit
    predict prints), even where a class scoring higher does not reach its own; above_threshold says which."""
    import dataclasses

    from bitcli.formats import bitcli as bitcli_format
    from bitcli.hub import load_checkpoint

    ckpt = load_checkpoint(str(tiny_dir))
    image = images[0]
    model = tmp_path / "open.safetensors"
    bitcli_format.write(dataclasses.replace(ckpt, thresholds=[0.0] * 10), model)
    code, out, err = run_main("predict", image, "--model", model, "-f", "json", "-k", "10", "--workers", "0")
    assert code == 0, err
    ranked = [p["index"] for p in json.loads(out)[0]["predictions"]]
    cases = {  # thresholds -> (explained class, above_threshold)
        "top-closed": ([1.0 if i == ranked[0] else 0.0 for i in range(10)], ranked[1], True),
        "all-closed": ([1.0] * 10, ranked[0], False),
    }
    for name, (thresholds, explained, reached) in cases.items():
        model = tmp_path / f"{name}.safetensors"
        bitcli_format.write(dataclasses.replace(ckpt, thresholds=thresholds), model)
        code, out, err = run_main("explain", image, "--model", model, "-o", tmp_path / name, "--workers", "0")
        assert code == 0, err
        row = json.loads(out)
        assert (row["index"], row["above_threshold"]) == (explained, reached), name
