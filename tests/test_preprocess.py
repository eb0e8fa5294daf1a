"""Image loading and the eval transform, against transformers' PIL pipeline pixel for pixel."""

from __future__ import annotations

import dataclasses
import os
import socket

import numpy as np
import pytest
import torch
import transformers
from conftest import BIT50_PREPROCESSOR
from PIL import Image

from bitcli.errors import BitError
from bitcli.formats.hf import preprocess_from_hf, preprocess_to_hf
from bitcli.formats.timm import preprocess_from_timm, preprocess_to_timm
from bitcli.preprocess import Preprocess, load_image
from bitcli.reads import file_size, open_regular, read_json


@pytest.mark.parametrize(
    "processor",
    [
        BIT50_PREPROCESSOR,
        {
            **BIT50_PREPROCESSOR,
            "size": {"shortest_edge": 224},
            "crop_size": {"height": 224, "width": 224},
            "resample": 3,
        },
        {**BIT50_PREPROCESSOR, "size": {"height": 160, "width": 200}, "crop_size": {"height": 128, "width": 127}},
        {},  # BitImageProcessor's own defaults: 224, bicubic, CLIP mean/std
    ],
)
def test_pixels_equal_transformers_pil_pipeline(photos, processor):
    reference = transformers.BitImageProcessorPil(**processor)
    ours = preprocess_from_hf(processor)
    for path in photos.values():
        expected = reference(Image.open(path), return_tensors="pt")["pixel_values"][0]
        got = ours(load_image(path))
        assert got.shape == expected.shape
        assert torch.allclose(got, expected, atol=1e-6, rtol=0), path.name


def test_hf_round_trip_of_preprocessing():
    for p in [
        Preprocess(), Preprocess.square(160, 128), Preprocess(resize=256, crop=(224, 224), interpolation="bicubic"),
        Preprocess(resize=448, crop=(448, 448), crop_rounding="round"),  # timm's crop, in a bitcli_ key
    ]:  # fmt: skip
        assert preprocess_from_hf(preprocess_to_hf(p)) == p
        assert Preprocess.from_dict(p.to_dict()) == p
    assert "bitcli_crop_rounding" not in preprocess_to_hf(Preprocess())  # transformers' own rule needs no extra key


def test_metadata_without_the_rounding_field_is_transformers_rule():
    old = {"resize": 448, "crop": [448, 448], "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.5] * 3}
    assert Preprocess.from_dict(old).crop_rounding == "floor"
    with pytest.raises(BitError, match="crop_rounding must be 'floor' or 'round', not 'up'"):
        Preprocess.from_dict({**old, "crop_rounding": "up"})


def test_timm_pretrained_cfg():
    cfg = {
        "input_size": [3, 448, 448],
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
    }
    assert preprocess_from_timm(cfg) == Preprocess(resize=448, crop=(448, 448), crop_rounding="round")
    cfg = {
        "input_size": [3, 224, 224],
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
    }
    assert preprocess_from_timm(cfg) == Preprocess(
        resize=256, crop=(224, 224), interpolation="bicubic", crop_rounding="round"
    )


def test_to_timm_says_squash_for_an_exact_size_resize():
    """Google's and fine-tuning's eval transforms resize to an exact square: timm's "squash" mode, not a
    shortest-edge resize (which would crop a non-square photo)."""
    for p in [
        Preprocess(resize=(480, 480), crop=None),
        Preprocess.square(160, 128),
        Preprocess(resize=448, crop=(448, 448)),
    ]:
        assert preprocess_from_timm(preprocess_to_timm(p)).same_pixels(dataclasses.replace(p, crop_rounding="round"))
    assert preprocess_to_timm(Preprocess(resize=(480, 480), crop=None))["crop_mode"] == "squash"
    assert not Preprocess(resize=448, crop=(448, 448)).same_pixels(
        Preprocess(resize=448, crop=(448, 448), crop_rounding="round")
    )
    assert Preprocess(resize=(64, 64), crop=(64, 64)).same_pixels(
        Preprocess(resize=(64, 64), crop=None, crop_rounding="round")
    )


def _rgb(path) -> np.ndarray:
    return np.asarray(load_image(path))


def test_modes_convert_like_their_rgb_form(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    assert np.array_equal(_rgb(tmp_path / "rgb.png"), rgb)

    gray = rng.integers(0, 256, (40, 50), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "gray.png")
    assert np.array_equal(_rgb(tmp_path / "gray.png"), np.repeat(gray[..., None], 3, axis=2))

    palette = Image.fromarray(rgb).quantize(64)
    palette.save(tmp_path / "palette.png")
    assert np.array_equal(_rgb(tmp_path / "palette.png"), np.asarray(palette.convert("RGB")))

    opaque = np.dstack([rgb, np.full((40, 50), 255, np.uint8)])
    Image.fromarray(opaque, "RGBA").save(tmp_path / "rgba.png")
    assert np.array_equal(_rgb(tmp_path / "rgba.png"), rgb)

    clear = np.dstack([rgb, np.zeros((40, 50), np.uint8)])
    Image.fromarray(clear, "RGBA").save(tmp_path / "clear.png")
    assert np.array_equal(_rgb(tmp_path / "clear.png"), np.full_like(rgb, 255))  # composited on white

    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.tiff")
    assert np.array_equal(_rgb(tmp_path / "cmyk.tiff"), rgb)

    sixteen = (gray.astype(np.uint16) * 257).astype(np.uint16)
    Image.fromarray(sixteen).save(tmp_path / "gray16.png")
    assert np.array_equal(_rgb(tmp_path / "gray16.png")[..., 0], gray)

    floats = gray.astype(np.float32) / 255
    Image.fromarray(floats, "F").save(tmp_path / "float.tiff")
    assert np.abs(_rgb(tmp_path / "float.tiff")[..., 0].astype(int) - gray).max() <= 1


@pytest.mark.parametrize(
    "orientation, undo",
    [(3, Image.Transpose.ROTATE_180), (6, Image.Transpose.ROTATE_90), (8, Image.Transpose.ROTATE_270)],
)
def test_exif_orientation_is_applied(tmp_path, orientation, undo):
    rng = np.random.default_rng(1)
    upright = Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8))
    stored = upright.transpose(undo)  # what a camera writes before tagging the orientation
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(tmp_path / "tagged.png", exif=exif)
    assert np.array_equal(_rgb(tmp_path / "tagged.png"), np.asarray(upright))


def test_animated_gif_uses_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 0, 255)]]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert tuple(_rgb(tmp_path / "anim.gif")[0, 0]) == (255, 0, 0)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "not an image"),
        (b"this is text, not pixels", "not an image"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, "cannot decode|not an image"),
    ],
)
def test_bad_files_raise_one_line_errors(tmp_path, content, message):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(BitError, match=message) as info:
        load_image(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_truncated_jpeg_is_an_error(tmp_path, photos):
    data = photos["rocket.jpg"].read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(BitError, match="truncated"):
        load_image(tmp_path / "cut.jpg")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL warns; load_image refuses
def test_decompression_bomb_is_refused(tmp_path):
    # A 12000x12000 PNG header with almost no data: refused from the header, never decoded.
    Image.new("1", (12000, 12000)).save(tmp_path / "bomb.png")
    with pytest.raises(BitError, match="pixel limit"):
        load_image(tmp_path / "bomb.png")


def test_what_is_no_regular_file_has_one_wording_for_images_model_and_run_files(tmp_path):
    """An image (load_image), a model file (file_size) and a run's file (open_regular, read_json): one line."""
    fifo, sock = tmp_path / "pipe.png", tmp_path / "sock.png"
    os.mkfifo(fifo)
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(sock))
    try:
        for path, kind in [(fifo, "a FIFO (named pipe)"), (sock, "a socket")]:
            for read in (load_image, file_size, read_json):
                with pytest.raises(BitError) as caught:
                    read(path)
                assert str(caught.value) == f"{path}: is {kind}, not a regular file", read
        with pytest.raises(BitError) as caught:
            open_regular(fifo)
        assert str(caught.value) == f"{fifo}: is a FIFO (named pipe), not a regular file"
    finally:
        server.close()
