"""GPU JPEG decoding (bitcli.gpu_decode), tested on the CPU: torchvision's decode_jpeg runs the same function there
(device="cpu"), so the routing of each file, the fall-backs to the CPU path with its exact errors, the resize and
crop and the pipeline's choice all run here; only nvjpeg itself needs a GPU (benchmarks/gpu_check.py measures it)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from conftest import BIT50_PREPROCESSOR, run_main, save_hf_model
from PIL import Image

from bitcli import gpu_decode
from bitcli.engine import load_engine
from bitcli.errors import BitError
from bitcli.gpu_decode import DeviceDecoder, Encoded, file_bytes, for_engine
from bitcli.hub import load_checkpoint
from bitcli.inputs import path_decoder
from bitcli.pipeline import failure
from bitcli.preprocess import Preprocess, load_image

CPU = torch.device("cpu")
PRE = Preprocess(resize=64, crop=(64, 64))  # shortest edge, then a centre crop: BiT's eval transform, small


def _decoder(preprocess: Preprocess = PRE) -> DeviceDecoder:
    return DeviceDecoder(preprocess, CPU, path_decoder(preprocess), file_bytes)


def _jpeg(path, image: Image.Image, **save) -> str:
    image.save(path, "JPEG", quality=90, **save)
    return str(path)


def _cpu_error(path) -> str:
    with pytest.raises(BitError) as info:
        path_decoder(PRE)(path)
    return failure(str(path), info.value)


@pytest.fixture(scope="module")
def picture(photos) -> Image.Image:
    return Image.open(photos["chelsea.png"]).convert("RGB").crop((0, 0, 200, 150))


# An XMP packet with a rotation and no EXIF: Pillow's exif_transpose (the CPU path) turns the picture by it too.
XMP_ROTATED = (
    b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>'
)


def _sos_corrupted(data: bytes) -> bytes:
    """The scan header's first component selector made invalid: the header reads, no decoder decodes it."""
    sos = data.index(b"\xff\xda")
    return data[: sos + 5] + b"\x09" + data[sos + 6 :]


def test_files_are_routed_to_the_gpu_or_the_cpu_path(tmp_path, picture):
    """JPEGs the GPU decodes like PIL go there (baseline, progressive, grayscale); every other file is decoded
    by the CPU path on the decoding thread, pixel for pixel or error for error."""
    dec = _decoder()
    for name, image, save in [
        ("baseline.jpg", picture, {}),
        ("progressive.jpg", picture, {"progressive": True}),
        ("gray.jpg", picture.convert("L"), {}),
        ("subsampled444.jpg", picture, {"subsampling": 0}),
    ]:
        encoded = dec.prepare(_jpeg(tmp_path / name, image, **save))
        assert isinstance(encoded, Encoded), name
        assert (encoded.width, encoded.height) == (200, 150)

    rotated = Image.Exif()
    rotated[gpu_decode.ORIENTATION] = 6
    picture.save(tmp_path / "png.png")
    cpu_path = {
        "png.png": str(tmp_path / "png.png"),
        "rotated.jpg": _jpeg(tmp_path / "rotated.jpg", picture, exif=rotated),
        "xmp-rotated.jpg": _jpeg(tmp_path / "xmp-rotated.jpg", picture, xmp=XMP_ROTATED),
        "cmyk.jpg": _jpeg(tmp_path / "cmyk.jpg", picture.convert("CMYK")),
        "named-jpg-is-png.jpg": str(tmp_path / "png.png"),
    }
    for name, path in cpu_path.items():
        result = dec.prepare(path)
        assert isinstance(result, np.ndarray), name
        assert np.array_equal(result, path_decoder(PRE)(path)), name
    whole = Preprocess(resize=None, crop=(200, 150))  # the turned picture, 150 wide and 200 high, uncut
    upright = whole.to_uint8(picture.transpose(Image.Transpose.ROTATE_270)).astype(int)  # orientation 6's turn
    for name in ("rotated.jpg", "xmp-rotated.jpg"):  # the CPU path turned it (JPEG's loss: a few levels apart)
        assert np.abs(_decoder(whole).prepare(cpu_path[name]).astype(int) - upright).mean() < 3, name


def test_bad_files_fail_with_the_cpu_paths_words(tmp_path, picture):
    """A truncated JPEG, a bomb's header, a folder, a missing file: the CPU path decides, with its own error."""
    whole = _jpeg(tmp_path / "whole.jpg", picture)
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) * 2 // 3])
    sof = data.index(b"\xff\xc0")
    (tmp_path / "bomb.jpg").write_bytes(data[: sof + 5] + (12000).to_bytes(2, "big") * 2 + data[sof + 9 :])
    (tmp_path / "folder.jpg").mkdir()
    dec = _decoder()
    assert isinstance(dec.prepare(whole), Encoded)
    for name, words in [("cut.jpg", "truncated"), ("bomb.jpg", "pixel limit"), ("folder.jpg", "is a directory"),
                        ("missing.jpg", "no such file")]:  # fmt: skip
        path = str(tmp_path / name)
        with pytest.raises(BitError) as info:
            dec.prepare(path)
        assert failure(path, info.value) == _cpu_error(path), name
        assert words in str(info.value), name


def test_a_jpeg_the_decoder_refuses_goes_the_cpu_path(tmp_path, picture):
    """A file that passes the header check but does not decode fails the batched call: the others are decoded
    one by one on the device, and it goes the CPU path, whose error it gets."""
    good = _jpeg(tmp_path / "good.jpg", picture)
    (tmp_path / "bad.jpg").write_bytes(_sos_corrupted((tmp_path / "good.jpg").read_bytes()))
    bad = str(tmp_path / "bad.jpg")
    dec = _decoder()
    prepared = [dec.prepare(good), dec.prepare(bad), dec.prepare(good)]
    assert all(isinstance(p, Encoded) for p in prepared)
    out = dec.finish(prepared)
    assert isinstance(out[1], BitError) and failure(bad, out[1]) == _cpu_error(bad)
    expected = torch.from_numpy(path_decoder(PRE)(good).copy())
    for image in (out[0], out[2]):
        assert image.shape == (64, 64, 3) and image.dtype == torch.uint8
        assert (image.int() - expected.int()).abs().max() <= 2


@pytest.fixture(scope="module")
def jpegs(photos) -> dict[str, bytes]:
    """The real photos as JPEGs, full size (for BiT's own 448-px transform) and at most 256 px (the others)."""
    out = {}
    for name, path in photos.items():
        image = Image.open(path).convert("RGB")
        for key, im in [(name, image), ("small-" + name, image.resize((image.width * 256 // max(image.size),
                                                                     image.height * 256 // max(image.size))))]:  # fmt: skip
            buffer = io.BytesIO()
            im.save(buffer, "JPEG", quality=90)
            out[key] = buffer.getvalue()
    return out


@pytest.mark.parametrize(
    "preprocess",
    [
        Preprocess(resize=448, crop=(448, 448)),  # google/bit-50: shortest edge, centre crop
        Preprocess(resize=(224, 224), crop=(224, 224), interpolation="bicubic"),  # an exact size, bicubic
        Preprocess(resize=(300, 300), crop=(288, 288), crop_rounding="round"),  # an upscale; timm's centre
        Preprocess(resize=96, crop=None),  # no crop: each image keeps its aspect ratio
        Preprocess(resize=100, crop=(120, 140)),  # a crop larger than the image: padded with black
        Preprocess(resize=None, crop=(128, 128)),  # no resize
    ],
    ids=["bit-50", "bicubic-exact", "upscale-round", "no-crop", "padded", "no-resize"],
)
def test_pixels_match_the_cpu_path_on_real_photos(jpegs, preprocess):
    """The GPU path's resize and crop (run on the CPU) against PIL's: the same shape, at most 2 levels apart
    (PIL rounds in fixed point, torch in float), and equal almost everywhere."""
    dec = DeviceDecoder(preprocess, CPU, lambda d: preprocess.to_uint8(load_image(io.BytesIO(d))), lambda d: d)
    for name, data in jpegs.items():
        if name.startswith("small-") == (preprocess.resize == 448):
            continue
        [image] = dec.finish([dec.prepare(data)])
        expected = preprocess.to_uint8(load_image(io.BytesIO(data)))
        assert image.shape == expected.shape, name
        diff = (image.int() - torch.from_numpy(expected.astype(np.int32))).abs()
        assert diff.max() <= 2 and diff.float().mean() < 0.1, (name, diff.max(), diff.float().mean())


SMALL = {**BIT50_PREPROCESSOR, "size": {"shortest_edge": 64}, "crop_size": {"height": 64, "width": 64}}
TINY = {"embedding_size": 16, "hidden_sizes": [32, 64], "depths": [1, 1], "num_groups": 8}


@pytest.fixture(scope="module")
def spread_model(tmp_path_factory):
    """A tiny model at 64 px whose logits are spread (no near-ties), with 10 classes."""
    return save_hf_model(tmp_path_factory.mktemp("spread") / "m", SMALL, head_scale=20.0, num_labels=10, **TINY)


def test_top1_agrees_with_the_cpu_path_on_200_photos(photos, spread_model):
    """200 crops of the real photos as JPEGs: every top-1 of a model is the same through either decoder."""
    engine = load_engine(load_checkpoint(str(spread_model)), CPU, torch.float32)
    pre = engine.preprocess
    rng = np.random.default_rng(0)
    base = [Image.open(p).convert("RGB") for p in photos.values()]
    datas = []
    for i in range(200):
        im = base[i % len(base)]
        w, h = im.size
        cw, ch = int(w * rng.uniform(0.1, 0.3)), int(h * rng.uniform(0.1, 0.3))
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        buffer = io.BytesIO()
        im.crop((left, top, left + cw, top + ch)).save(buffer, "JPEG", quality=90)
        datas.append(buffer.getvalue())
    dec = DeviceDecoder(pre, CPU, lambda d: pre.to_uint8(load_image(io.BytesIO(d))), lambda d: d)
    on_device = torch.stack(dec.finish([dec.prepare(d) for d in datas]))
    on_cpu = np.stack([pre.to_uint8(load_image(io.BytesIO(d))) for d in datas])
    assert (on_device.int() - torch.from_numpy(on_cpu.astype(np.int32))).abs().max() <= 2
    a, b = engine.logits(on_cpu), engine.logits(on_device)
    assert len(set(a.argmax(1).tolist())) >= 3  # the classes differ between images: agreement means something
    assert (a.argmax(1) == b.argmax(1)).float().mean() >= 0.995


def test_the_engine_takes_a_tensor_batch_as_it_takes_numpy(spread_model):
    engine = load_engine(load_checkpoint(str(spread_model)), CPU, torch.float32)
    batch = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    assert torch.equal(engine.logits(batch), engine.logits(torch.from_numpy(batch)))


def test_the_pipeline_decodes_on_the_device_only_when_it_is_chosen(tmp_path, jpegs, monkeypatch):
    """`bit predict` and `bit eval` take the device decoder only where decodes_on says so (CUDA: here the
    check is made to say so for the CPU); the results are the CPU path's, and a bad file's error is the same."""
    model = save_hf_model(tmp_path / "model", SMALL, head_scale=20.0, id2label={0: "c0", 1: "c1"},
                          label2id={"c0": 0, "c1": 1}, **TINY)  # fmt: skip
    finished = []
    real = gpu_decode.DeviceDecoder.finish
    monkeypatch.setattr(gpu_decode.DeviceDecoder, "finish", lambda self, r: finished.append(len(r)) or real(self, r))
    data = tmp_path / "data"
    small = sorted(name for name in jpegs if name.startswith("small-"))
    for i, name in enumerate(small):
        (data / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        (data / f"c{i % 2}" / f"{name}.jpg").write_bytes(jpegs[name])
    Image.open(io.BytesIO(jpegs["small-chelsea.png"])).save(data / "c0" / "cat.png")
    whole = jpegs["small-rocket.jpg"]
    (tmp_path / "cut.jpg").write_bytes(whole[: len(whole) // 2])

    def runs() -> tuple[list, dict, list]:
        code, out, err = run_main("predict", data, tmp_path / "cut.jpg", "--model", model, "--device", "cpu",
                                  "--format", "json", "-k", "2", "-r", "--batch-size", "4")  # fmt: skip
        assert code == 1 and "cut.jpg: cannot decode image" in err and "truncated" in err, err
        code, evaluated, err = run_main("eval", data, "--model", model, "--device", "cpu", "--format", "json")
        assert code == 0, err
        code, embedded, err = run_main("embed", data, tmp_path / "cut.jpg", "--model", model, "--device", "cpu",
                                       "--format", "jsonl", "-r", "--batch-size", "4")  # fmt: skip
        assert code == 1 and "cut.jpg: cannot decode image" in err, err
        return json.loads(out), json.loads(evaluated), [json.loads(line) for line in embedded.splitlines()]

    rows_cpu, eval_cpu, vectors_cpu = runs()
    assert finished == []
    monkeypatch.setattr(gpu_decode, "decodes_on", lambda device: True)
    rows_dev, eval_dev, vectors_dev = runs()
    assert sum(finished) == 10 + 9 + 10  # predict's 10 files (the cut one is read, routed and fails), eval's 9, embed's
    assert [v.get("error") for v in vectors_cpu] == [v.get("error") for v in vectors_dev]
    for a, b in zip(vectors_cpu, vectors_dev):
        assert a["path"] == b["path"] and (a.get("embedding") is None) == (b.get("embedding") is None)
        if a.get("embedding") is not None:
            assert np.allclose(a["embedding"], b["embedding"], atol=0.05 * np.abs(a["embedding"]).max())
    assert [r["path"] for r in rows_cpu] == [r["path"] for r in rows_dev]
    assert [r.get("error") for r in rows_cpu] == [r.get("error") for r in rows_dev]
    assert sum("error" in r for r in rows_dev) == 1
    for a, b in zip(rows_cpu, rows_dev):
        if "predictions" in a:
            assert a["predictions"][0]["label"] == b["predictions"][0]["label"]
            assert abs(a["predictions"][0]["score"] - b["predictions"][0]["score"]) < 0.01
    assert (eval_cpu["top1"], eval_cpu["count"]) == (eval_dev["top1"], eval_dev["count"])


def test_for_engine_chooses_by_the_device_check(spread_model, monkeypatch):
    engine = load_engine(load_checkpoint(str(spread_model)), CPU, torch.float32)
    decode = path_decoder(engine.preprocess)
    assert for_engine(engine, decode, file_bytes) is None  # a CPU engine decodes with PIL, as always
    monkeypatch.setattr(gpu_decode, "decodes_on", lambda device: True)
    assert isinstance(for_engine(engine, decode, file_bytes), DeviceDecoder)
    engine.preprocess = Preprocess(resize=64, crop=(64, 64), interpolation="lanczos")
    assert for_engine(engine, decode, file_bytes) is None  # no antialiased lanczos in torch: the CPU path


def test_a_resize_that_fails_on_the_device_sends_that_file_to_the_cpu_path(tmp_path, picture, monkeypatch):
    """The device's resize failing for one image (out of GPU memory, a scale its kernels refuse; here a test
    double of the resize raises for the second file only) costs that file the device, not the batch: it is
    decoded by the CPU path, exactly, and the others still go through the device."""
    paths = [_jpeg(tmp_path / f"{i}.jpg", picture.rotate(10 * i)) for i in range(3)]
    real, calls = gpu_decode.resize_and_crop, []

    def failing_second(image, preprocess):
        calls.append(image.shape)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(image, preprocess)

    monkeypatch.setattr(gpu_decode, "resize_and_crop", failing_second)
    dec = _decoder()
    prepared = [dec.prepare(p) for p in paths]
    assert all(isinstance(p, Encoded) for p in prepared)
    out = dec.finish(prepared)
    assert len(calls) == 3
    assert torch.equal(out[1], torch.from_numpy(path_decoder(PRE)(paths[1]).copy()))  # the CPU path's, exactly
    for i in (0, 2):
        expected = torch.from_numpy(path_decoder(PRE)(paths[i]).copy())
        assert out[i].shape == (64, 64, 3) and (out[i].int() - expected.int()).abs().max() <= 2


def test_a_downscale_beyond_the_devices_kernels_goes_the_cpu_path(tmp_path, picture):
    """torch's antialiased CUDA resize refuses large downscales: a JPEG shrunk more than MAX_DOWNSCALE times
    on an axis (200x150 to 2x2: 100 and 75 times) is decoded by the CPU path; 50 times still goes the device."""
    path = _jpeg(tmp_path / "big.jpg", picture)
    for size, on_device in [((2, 2), False), ((3, 2), False), ((2, 4), False), ((3, 4), True)]:
        pre = Preprocess(resize=size, crop=None)  # (height, width)
        prepared = _decoder(pre).prepare(path)
        assert isinstance(prepared, Encoded) == on_device, size
        if not on_device:
            assert np.array_equal(prepared, path_decoder(pre)(path)), size
