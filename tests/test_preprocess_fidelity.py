"""Each checkpoint preprocessed as its own library does (issue 12): timm's eval transform (torchvision's rounded
centre crop) for timm models, transformers' PIL processor (floored crop) for transformers folders, Google's
480x480 no-crop transform for .npz files; and the rule surviving `bit convert` between layouts.

The peers are the libraries' own code: timm's create_transform, transformers' BitImageProcessorPil and timm's
npz reader. The photos are real (conftest's `photos`), resized to sizes whose margin at the crop is odd
(where the two crop rules differ by a pixel) or even.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BIT50_PREPROCESSOR, perturb, run_main
from formats.helpers import TINY, convert_ok, google_arrays, save_npz, timm_from_npz
from PIL import Image

from bitcli.formats import GOOGLE_EVAL_PREPROCESS
from bitcli.formats.hf import preprocess_from_hf
from bitcli.formats.timm import preprocess_from_timm
from bitcli.hub import load_checkpoint
from bitcli.preprocess import Preprocess, load_image

# (width, height) -> margin of the long side at 448: 223 and 215 (odd: timm's round puts the crop a pixel
# further than transformers' floor), 225 (odd, but half-to-even rounds 112.5 down: the two agree), 224 (even).
SIZES_448 = [(640, 427), (741, 500), (427, 640), (673, 448), (600, 400)]
DIFFER_448 = {(640, 427), (741, 500), (427, 640)}


def _resized(photos: dict[str, Path], tmp: Path, size: tuple[int, int], name: str = "chelsea.png") -> Path:
    out = tmp / f"{Path(name).stem}_{size[0]}x{size[1]}.png"
    if not out.exists():
        Image.open(photos[name]).convert("RGB").resize(size, Image.Resampling.BICUBIC).save(out)
    return out


@pytest.fixture(scope="module")
def timm_bit():
    """timm's resnetv2_50x1_bit with its own pretrained_cfg (goog_in21k_ft_in1k: 448, crop_pct 1.0, bilinear)."""
    import timm

    return timm.create_model("resnetv2_50x1_bit.goog_in21k_ft_in1k", pretrained=False, num_classes=10).eval()


def _timm_transform(model):
    from timm.data import create_transform, resolve_data_config

    return create_transform(**resolve_data_config({}, model=model))


@pytest.mark.parametrize("size", SIZES_448, ids=lambda s: f"{s[0]}x{s[1]}")
def test_timm_models_get_timms_pixels_and_hf_models_transformers(timm_bit, photos, tmp_path, size):
    import transformers

    path = _resized(photos, tmp_path, size)
    timm_pixels = _timm_transform(timm_bit)(Image.open(path).convert("RGB"))
    hf_pixels = transformers.BitImageProcessorPil(**BIT50_PREPROCESSOR)(Image.open(path), return_tensors="pt")[
        "pixel_values"
    ][0]

    ours_timm = preprocess_from_timm(timm_bit.pretrained_cfg)
    assert ours_timm.crop_rounding == "round" and ours_timm.resize == 448 and ours_timm.crop == (448, 448)
    got = ours_timm(load_image(path))
    assert got.shape == timm_pixels.shape == (3, 448, 448)
    assert (got - timm_pixels).abs().max() <= 1e-6

    got = preprocess_from_hf(BIT50_PREPROCESSOR)(load_image(path))
    assert (got - hf_pixels).abs().max() <= 1e-6
    # The two libraries really disagree where the margin's half rounds up (so each match above means something).
    assert ((timm_pixels - hf_pixels).abs().max() > 0.01) == (size in DIFFER_448)


def test_thin_strip_region_path_uses_timms_rounding(timm_bit, tmp_path):
    """A strip whose full resize passes 16 MP is resized only where the crop keeps (_resize_region): the window
    must be timm's too. timm's transform itself is the oracle (the region path is within a grey level)."""
    rng = np.random.default_rng(0)
    strip = tmp_path / "strip.png"
    Image.fromarray(rng.integers(0, 256, (100, 8007, 3), dtype=np.uint8)).save(strip)  # 35871x448 resized
    ours = preprocess_from_timm(timm_bit.pretrained_cfg)
    w, h = ours.resized_size(8007, 100)
    assert (w, h) == (35871, 448) and w * h > 16_000_000  # the region path
    assert (w - 448) % 4 == 3  # odd margin 35423: torchvision's offset is floor's plus one
    expected = _timm_transform(timm_bit)(Image.open(strip).convert("RGB"))
    got = ours(load_image(strip))
    floor = Preprocess(resize=448, crop=(448, 448))(load_image(strip))
    assert (got - expected).abs().max() <= 2 / 255 + 1e-6  # one grey level, in [-1, 1]
    assert (floor - expected).abs().max() > 0.1  # a pixel to the left: another picture


@pytest.mark.parametrize("library", ["timm", "transformers"])
def test_padding_puts_the_odd_pixel_where_each_library_does(photos, tmp_path, library):
    """A crop larger than the resized image pads with black: torchvision (timm) pads pad // 2 before the
    image, transformers ceil(pad / 2); the other axis may still be cropped, by the library's own rule."""
    path = _resized(photos, tmp_path, (1000, 400) if library == "timm" else (451, 400))
    image = Image.open(path).convert("RGB")
    if library == "timm":
        from timm.data import create_transform

        # crop_pct 1.29: shortest edge floor(128 / 1.29) = 99 (a pad of 29), long edge 247 (a crop margin of
        # 119, whose half timm rounds up).
        cfg = {
            "input_size": (3, 128, 128),
            "crop_pct": 1.29,
            "interpolation": "bilinear",
            "mean": (0.5,) * 3,
            "std": (0.5,) * 3,
        }
        expected = create_transform(**cfg, crop_mode="center")(image)
        ours = preprocess_from_timm(cfg)
    else:
        import transformers

        processor = {
            **BIT50_PREPROCESSOR,
            "size": {"height": 101, "width": 99},
            "crop_size": {"height": 128, "width": 128},
        }
        expected = transformers.BitImageProcessorPil(**processor)(image, return_tensors="pt")["pixel_values"][0]
        ours = preprocess_from_hf(processor)
    got = ours(load_image(path))
    assert got.shape == expected.shape == (3, 128, 128)
    assert (got - expected).abs().max() <= 1e-6


# ----------------------------------------------------------------------------------------------------------
# `bit predict` against the peers' own predictions


def _predict(model_dir: Path, paths: list[Path], k: int) -> list[torch.Tensor]:
    code, out, err = run_main(
        "predict", "--model", model_dir, *paths, "--format", "json", "--top-k", k, "--device", "cpu"
    )
    assert code == 0, err
    rows = json.loads(out)
    return [torch.tensor([p["score"] for p in sorted(r["predictions"], key=lambda p: p["index"])]) for r in rows]


def test_bit_predict_on_a_timm_folder_equals_timm(photos, tmp_path):
    import timm
    from timm.models._hub import save_for_hf

    model = timm.create_model(
        "resnetv2_50x1_bit", num_classes=10, pretrained_cfg_overlay=dict(input_size=(3, 224, 224), crop_pct=1.0)
    ).eval()
    perturb(model, seed=3)
    with torch.no_grad():
        model.head.fc.weight.mul_(4.0)  # spread logits (as a trained head's are) but not past fp32's 1e-4
    save_for_hf(model, tmp_path / "timm", safe_serialization=True)
    # At 224 the long sides are 335 and 331: margins 111 and 107, where timm's crop is a pixel right of floor.
    paths = [_resized(photos, tmp_path, s, n) for s, n in [((640, 427), "chelsea.png"), ((741, 500), "coffee.png")]]
    transform = _timm_transform(model)
    with torch.no_grad():
        x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
        expected = model(x).softmax(-1)
        floored = torch.stack([Preprocess(resize=224, crop=(224, 224))(load_image(p)) for p in paths])
        floor_probs = model(floored).softmax(-1)
    assert (floor_probs - expected).abs().max() > 1e-3, (floor_probs - expected).abs().max()  # the pixel matters
    for got, want in zip(_predict(tmp_path / "timm", paths, 10), expected, strict=True):
        assert (got - want).abs().max() < 1e-4, (got - want).abs().max()


def test_npz_prediction_equals_timms_npz_reader_on_googles_480_transform(photos, tmp_path):
    arrays = google_arrays(
        TINY["depths"], widths=TINY["widths"], stem=TINY["stem"], num_classes=10, seed=8, head_std=1.0
    )
    npz = save_npz(tmp_path / "tiny.npz", arrays)
    assert load_checkpoint(str(npz)).preprocess == Preprocess(resize=(480, 480), crop=None) == GOOGLE_EVAL_PREPROCESS
    paths = [_resized(photos, tmp_path, (640, 427)), photos["china.jpg"]]
    # Google's evaluation transform, written out: the whole image to 480x480 (bilinear), scaled to [-1, 1].
    x = torch.stack([
        torch.from_numpy(np.asarray(Image.open(p).convert("RGB").resize((480, 480), Image.Resampling.BILINEAR)).copy())
        .permute(2, 0, 1).float() / 255 * 2 - 1
        for p in paths
    ])  # fmt: skip
    reference = timm_from_npz(npz, TINY["depths"], 1, 10, channels=TINY["widths"], stem_chs=TINY["stem"])
    with torch.no_grad():
        expected = reference(x).softmax(-1)
        old = torch.stack([Preprocess(resize=448, crop=(448, 448))(load_image(p)) for p in paths])
        old_probs = reference(old).softmax(-1)
    assert (old_probs - expected).abs().max() > 1e-3  # the old default (448 + crop) would give other numbers
    for got, want in zip(_predict(npz, paths, 10), expected, strict=True):
        assert (got - want).abs().max() < 1e-4, (got - want).abs().max()


def test_published_names_use_googles_transform(tmp_path, monkeypatch):
    monkeypatch.setenv("BITCLI_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("BITCLI_OFFLINE", "1")
    (tmp_path / "cache").mkdir()
    arrays = google_arrays(TINY["depths"], widths=TINY["widths"], stem=TINY["stem"], num_classes=3)
    save_npz(tmp_path / "cache" / "BiT-M-R50x1.npz", arrays)
    assert load_checkpoint("BiT-M-R50x1").preprocess == GOOGLE_EVAL_PREPROCESS


def test_convert_npz_writes_googles_480_no_crop_transform(tmp_path):
    arrays = google_arrays(TINY["depths"], widths=TINY["widths"], stem=TINY["stem"], num_classes=3)
    npz = save_npz(tmp_path / "tiny.npz", arrays)
    convert_ok(npz, tmp_path / "hf")
    pre = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    assert pre["size"] == {"height": 480, "width": 480} and pre["do_resize"] is True
    assert pre["do_center_crop"] is False and pre["resample"] == 2
    assert pre["image_mean"] == pre["image_std"] == [0.5, 0.5, 0.5]
    assert "bitcli_crop_rounding" not in pre
    assert load_checkpoint(str(tmp_path / "hf")).preprocess == GOOGLE_EVAL_PREPROCESS
    convert_ok(npz, tmp_path / "out.safetensors")
    assert load_checkpoint(str(tmp_path / "out.safetensors")).preprocess == GOOGLE_EVAL_PREPROCESS


# ----------------------------------------------------------------------------------------------------------
# The rule through `bit convert`


def test_hf_to_timm_keeps_transformers_crop_in_bit_and_says_what_timm_does(bit50_dir, tmp_path):
    from timm.data import create_transform

    convert_ok(bit50_dir, tmp_path / "timm", "--format", "timm")
    cfg = json.loads((tmp_path / "timm" / "config.json").read_text())
    assert cfg["bitcli_preprocess"] == json.loads(json.dumps(preprocess_from_hf(BIT50_PREPROCESSOR).to_dict()))
    assert cfg["bitcli_preprocess"]["crop_rounding"] == "floor"
    assert cfg["bitcli_preprocess_note"] == (
        "bit preprocesses with bitcli_preprocess (the source model's own transform); timm's create_transform "
        "follows pretrained_cfg, which differs: crop_rounding 'round' instead of 'floor'"
    )
    assert load_checkpoint(str(tmp_path / "timm")).preprocess == preprocess_from_hf(BIT50_PREPROCESSOR)
    # What timm will do with the folder: its pretrained_cfg is google/bit-50's sizes with torchvision's crop.
    pretrained = cfg["pretrained_cfg"]
    assert preprocess_from_timm(pretrained) == Preprocess(resize=448, crop=(448, 448), crop_rounding="round")
    create_transform(
        **{k: pretrained[k] for k in ("input_size", "crop_pct", "crop_mode", "interpolation", "mean", "std")}
    )


def test_timm_to_hf_keeps_timms_crop_in_bit(tmp_path):
    import timm
    import transformers
    from timm.models._hub import save_for_hf

    model = timm.create_model("resnetv2_50x1_bit.goog_in21k_ft_in1k", num_classes=4)
    save_for_hf(model, tmp_path / "timm", safe_serialization=True)
    source = load_checkpoint(str(tmp_path / "timm")).preprocess
    assert source == Preprocess(resize=448, crop=(448, 448), crop_rounding="round")

    convert_ok(tmp_path / "timm", tmp_path / "hf", "--format", "hf")
    pre = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    assert pre["bitcli_crop_rounding"] == "round"
    assert load_checkpoint(str(tmp_path / "hf")).preprocess == source
    transformers.BitImageProcessorPil.from_pretrained(tmp_path / "hf")  # transformers still reads the file

    convert_ok(tmp_path / "hf", tmp_path / "back", "--format", "timm")  # and back: timm's own rule, no record
    cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert "bitcli_preprocess" not in cfg and "bitcli_preprocess_note" not in cfg
    assert load_checkpoint(str(tmp_path / "back")).preprocess == source

    convert_ok(tmp_path / "timm", tmp_path / "m.safetensors")  # bitcli's own metadata keeps the field
    assert load_checkpoint(str(tmp_path / "m.safetensors")).preprocess == source
