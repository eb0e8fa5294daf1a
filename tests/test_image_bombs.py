"""Images that cost far more memory than their bytes: thin strips whose shortest-edge resize is huge, headers
that promise billions of pixels. No input may make `bit` allocate more than a few hundred MB for one image, and
predict and finetune word the refusals alike."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import transformers
from conftest import BIT50_PREPROCESSOR, TINY_LABELS, run_main, save_hf_model
from PIL import Image, ImageFile

from bitcli import preprocess
from bitcli.data import median_area
from bitcli.errors import BitError
from bitcli.formats.hf import preprocess_from_hf
from bitcli.preprocess import Preprocess, image_size, load_image
from bitcli.sources.folder import scan

NO_CROP = {**BIT50_PREPROCESSOR, "do_center_crop": False}


def _tiny(folder: Path, preprocessor: dict) -> Path:
    return save_hf_model(
        folder, preprocessor, embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1], num_groups=8,
        id2label=dict(enumerate(TINY_LABELS)), label2id={n: i for i, n in enumerate(TINY_LABELS)},
    )  # fmt: skip


@pytest.fixture(scope="module")
def tiny448(tmp_path_factory) -> Path:
    """google/bit-50's preprocessing (shortest edge 448, centre crop 448) on a tiny network."""
    return _tiny(tmp_path_factory.mktemp("tiny448") / "model", BIT50_PREPROCESSOR)


def _strip(path: Path, width: int, height: int = 1) -> Path:
    Image.new("RGB", (width, height), (20, 160, 90)).save(path)
    return path


def _blank_png(path: Path, width: int, height: int) -> Path:
    """A valid 1-bit PNG of any size written row by row: a few KB on disk, never held in memory whole."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = bytes(1 + (width + 7) // 8)  # filter byte, then the packed bits
    deflate = zlib.compressobj(9)
    body = b"".join(deflate.compress(row * min(4096, height - i)) for i in range(0, height, 4096)) + deflate.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


# The shortest-edge resize of an 8000x1 strip to 448 is 3,584,000x448 pixels: 6.3 GB peak RSS before the fix.
_CHILD = r"""
import contextlib, io, resource, sys
from bitcli.cli import main

def predict(*args):
    sys.argv = ["bit", "predict", *args]
    try:
        main()
    except SystemExit as exc:
        return exc.code or 0
    return 0

model, normal, *strips = sys.argv[1:]
with contextlib.redirect_stdout(io.StringIO()):  # torch, its threads and the model, before any limit
    assert predict(normal, "--model", model, "-f", "json") == 0
with open("/proc/self/status") as f:
    peak = int(f.read().split("VmPeak:")[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (peak + 2**30, peak + 2**30))  # 1 GiB more than the warm process
sys.exit(predict(*strips, "--model", model, "-f", "json"))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_thin_strips_classify_within_a_gigabyte(tiny448, photos, tmp_path):
    strips = [_strip(tmp_path / "8000x1.png", 8000), _strip(tmp_path / "20000x1.png", 20000)]
    assert max(p.stat().st_size for p in strips) < 200  # bytes on disk
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tiny448), str(photos["coffee.png"]), *map(str, strips)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = json.loads(result.stdout)
    assert [r["path"] for r in rows] == [str(p) for p in strips]
    assert all(len(r["predictions"]) == 5 for r in rows), rows


def test_absurd_strip_classifies_with_a_crop_and_is_refused_without(tiny448, photos, tmp_path):
    strip = _strip(tmp_path / "400000x1.png", 400_000)  # resized whole: 179,200,000x448 (321 GB)
    code, out, err = run_main("predict", strip, "--model", tiny448, "-f", "json")
    assert code == 0, err
    assert len(json.loads(out)[0]["predictions"]) == 5

    no_crop = _tiny(tmp_path / "nocrop", NO_CROP)
    code, out, err = run_main("predict", strip, photos["coffee.png"], "--model", no_crop, "-f", "json")
    assert code == 1
    rows = {r["path"]: r for r in json.loads(out)}
    assert rows[str(strip)]["error"] == (
        f"{strip}: a 400000x1 image would be 179200000x448 after resizing, over the 100,000,000-pixel limit; "
        "crop it to a less extreme aspect ratio first"
    )
    assert len(rows[str(photos["coffee.png"])]["predictions"]) == 5  # the other input is still classified
    assert f"error: {strip}: a 400000x1 image would be" in err


def test_uncropped_transform_refuses_resizes_over_the_limit(tmp_path):
    # Resized whole: 112,000,000x448 (200 GB); PIL's own overflow check fails it at once (no OOM before the fix).
    image = load_image(_strip(tmp_path / "wide.png", 500_000, 2))
    with pytest.raises(BitError) as info:
        Preprocess(resize=448, crop=None).to_uint8(image)
    assert str(info.value) == (
        f"{tmp_path / 'wide.png'}: a 500000x2 image would be 112000000x448 after resizing, over the "
        "100,000,000-pixel limit; crop it to a less extreme aspect ratio first"
    )
    assert Preprocess(resize=(448, 448), crop=None).to_uint8(image).shape == (448, 448, 3)  # fine-tuning's square


def test_strip_crop_matches_the_full_resize(tmp_path):
    """Past FULL_RESIZE_PIXELS only the crop is resized: the pixels still agree with resizing everything."""
    rng = np.random.default_rng(0)
    strip = Image.fromarray(rng.integers(0, 256, (3, 20000, 3), dtype=np.uint8))
    for interpolation in ["bilinear", "bicubic", "lanczos"]:
        ours = Preprocess(resize=64, crop=(64, 64), interpolation=interpolation)
        assert ours.resized_size(20000, 3)[0] * 64 > 16_000_000  # 426,666x64: the cropped path
        full = strip.resize(ours.resized_size(20000, 3), preprocess.PIL_FILTERS[interpolation])
        left = (full.width - 64) // 2
        expected = np.asarray(full.crop((left, 0, left + 64, 64)), dtype=int)
        assert np.abs(np.asarray(ours.resize_and_crop(strip), dtype=int) - expected).max() <= 1, interpolation


@pytest.mark.parametrize("processor", [BIT50_PREPROCESSOR, {**BIT50_PREPROCESSOR, "resample": 3}])
def test_cropped_region_path_agrees_with_transformers_on_photos(photos, monkeypatch, processor):
    """Forced onto ordinary photos, the region path stays within one level of transformers' pipeline."""
    monkeypatch.setattr(preprocess, "FULL_RESIZE_PIXELS", 0)
    reference = transformers.BitImageProcessorPil(**processor)
    ours = preprocess_from_hf(processor)
    for path in photos.values():
        expected = reference(Image.open(path), return_tensors="pt")["pixel_values"][0]
        got = ours(load_image(path))
        assert got.shape == expected.shape
        assert (got - expected).abs().max().item() <= 1 / 255 / 0.5 + 1e-6, path.name


def test_tall_thin_header_is_refused_before_decoding(tmp_path):
    """1x40,000,000 is under the pixel limit, but PIL keeps an 8-byte pointer per row: 480 MB to decode."""
    path = _blank_png(tmp_path / "tall.png", 1, 40_000_000)
    assert path.stat().st_size < 200_000
    expected = f"{path}: a 1x40000000 image has over 10,000,000 rows; rotate or crop it first"
    for read in (load_image, image_size):
        with pytest.raises(BitError) as info:
            read(path)
        assert str(info.value) == expected


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("side", [12_000, 20_000])  # 144 and 400 megapixels: PIL warns, then refuses itself
def test_predict_and_finetune_word_huge_images_alike(tiny_dir, tmp_path, side):
    data = tmp_path / "data"
    (data / "cat").mkdir(parents=True)
    bomb = _blank_png(data / "cat" / "bomb.png", side, side)
    expected = (
        f"{bomb}: image is larger than the 100,000,000-pixel limit (possible decompression bomb); downscale it first"
    )

    code, out, _err = run_main("predict", bomb, "--model", tiny_dir, "-f", "json")
    assert code == 1
    assert json.loads(out)[0]["error"] == expected

    with pytest.raises(BitError) as info:  # finetune's header scan, before step 0
        median_area(scan(data))
    assert str(info.value) == expected


def test_out_of_memory_is_a_named_line(tmp_path, photos, monkeypatch):
    """str(MemoryError()) is empty: the line still names the file and what ran out."""
    path = photos["coffee.png"]
    image = load_image(path)

    def exhausted(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(Image.Image, "resize", exhausted)
    with pytest.raises(BitError) as info:
        Preprocess().to_uint8(image)
    assert str(info.value) == f"{path}: out of memory resizing a 600x400 image; free memory first"
    monkeypatch.setattr(ImageFile.ImageFile, "load", exhausted)
    with pytest.raises(BitError) as info:
        load_image(path)
    assert str(info.value) == f"{path}: out of memory while decoding; downscale the image or free memory"
