"""`bit convert` end to end: bit-identical round trips through every layout, the converted folder in
transformers against `bit predict`, --labels and --dtype, and one clean error per kind of bad input.

Sources in Google's layout are written by hand (tests/formats/helpers.py), never with bitcli's writer, so a
test cannot agree with itself. Google's .npz against timm's npz reader is in tests/formats/test_npz.py.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_bit, run_main
from formats.helpers import (
    R50,
    TINY,
    bitcli_model,
    convert_ok,
    google_arrays,
    google_to_oihw,
    google_to_torch_names,
    inputs,
    listing,
    read_st,
    save_npz,
    timm_from_npz,
    tiny_npz,
)

bit = run_main  # the real entry point, in this process


@pytest.fixture(scope="module")
def r50(tmp_path_factory) -> dict:
    """R50x1 with an ImageNet-1k head, its Google-layout .npz and the bitcli file converted from it."""
    folder = tmp_path_factory.mktemp("r50")
    arrays = google_arrays(R50, 1, 1000, seed=1, head_std=0.3)  # a spread-out head: no near-ties in the top-k
    npz = save_npz(folder / "BiT-M-R50x1-ILSVRC2012.npz", arrays)
    bitcli = folder / "r50.safetensors"
    code, out, err = bit("convert", npz, bitcli)
    assert (code, out) == (0, ""), err
    assert (
        err.splitlines()[-1] == f"wrote {bitcli} (bitcli): 4 stages [3, 4, 6, 3], width 2048, 1000 classes, 153 tensors"
    )
    return {"arrays": arrays, "npz": npz, "bitcli": bitcli, "folder": folder}


# ----------------------------------------------------------------------------------------------------------
# Round trips


def test_round_trip_npz_bitcli_hf_bitcli_is_bit_identical(r50, tmp_path):
    hf, again = tmp_path / "hf", tmp_path / "again.safetensors"
    convert_ok(r50["bitcli"], hf)
    convert_ok(hf, again)

    first, meta1 = read_st(r50["bitcli"])
    hf_tensors, _ = read_st(hf / "model.safetensors")
    second, meta2 = read_st(again)
    assert len(r50["arrays"]) == len(first) == len(hf_tensors) == len(second) == 153
    for key, array in r50["arrays"].items():
        expected = google_to_oihw(key, array)
        hf_name, timm_name = google_to_torch_names(key)
        bitcli_name = timm_name.replace(".blocks.", ".units.").replace("head.fc.", "head.")
        for tensors, name in ((first, bitcli_name), (hf_tensors, hf_name), (second, bitcli_name)):
            got = tensors[name]
            assert got.dtype == torch.float32 and torch.equal(got, expected), (key, name)
            assert got.view(torch.int32).equal(expected.view(torch.int32))  # bits, not just values
    for field in ("config", "labels", "preprocess"):
        assert json.loads(meta1[field]) == json.loads(meta2[field]), field
    assert json.loads(meta2["config"])["ws_eps"] == 1e-10


def test_round_trip_timm_bitcli_timm_is_bit_identical(tmp_path):
    import timm
    from conftest import perturb
    from timm.models._hub import save_for_hf

    model = timm.create_model("resnetv2_50x1_bit", num_classes=10).eval()
    perturb(model, seed=6)
    source = tmp_path / "timm-src"
    save_for_hf(model, source, safe_serialization=True)
    bitcli, back = tmp_path / "mid.safetensors", tmp_path / "timm-back"
    convert_ok(source, bitcli)
    convert_ok(bitcli, back, "--format", "timm")

    original, _ = read_st(source / "model.safetensors")
    result, _ = read_st(back / "model.safetensors")
    assert sorted(original) == sorted(result)
    for key, t in original.items():
        assert result[key].dtype == t.dtype == torch.float32 and result[key].view(torch.int32).equal(
            t.view(torch.int32)
        ), key
    src_cfg, back_cfg = (json.loads((f / "config.json").read_text()) for f in (source, back))
    assert back_cfg["architecture"] == src_cfg["architecture"] == "resnetv2_50x1_bit"
    assert back_cfg["num_classes"] == 10

    reloaded = timm.create_model(f"local-dir:{back}", pretrained=True).eval()  # timm's own folder loader
    x = inputs(64)
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))


def test_bare_timm_file_converts(tmp_path):
    """A timm state dict saved with torch.save (the weights_only-loadable kind) is a valid source."""
    import timm
    from conftest import perturb

    model = timm.create_model("resnetv2_50x1_bit", num_classes=5).eval()
    perturb(model, seed=7)
    torch.save(model.state_dict(), tmp_path / "model.pth")
    convert_ok(tmp_path / "model.pth", tmp_path / "out.safetensors")
    x = inputs(64)
    with torch.no_grad():
        assert (bitcli_model(tmp_path / "out.safetensors")(x) - model(x)).abs().max() < 1e-5


# ----------------------------------------------------------------------------------------------------------
# transformers loads the folder and agrees with `bit predict`


def test_transformers_loads_converted_folder_like_bit_predict(r50, tmp_path, photos):
    import transformers
    from PIL import Image

    from bitcli.hub import load_checkpoint

    hf = tmp_path / "hf"
    convert_ok(r50["npz"], hf)
    images = [photos[n] for n in ("chelsea.png", "china.jpg")]

    model = transformers.BitForImageClassification.from_pretrained(hf).eval()
    processor = transformers.BitImageProcessorPil.from_pretrained(hf)
    pixels = processor([Image.open(p) for p in images], return_tensors="pt")["pixel_values"]
    # Google's eval transform travelled into the folder: the whole image resized to 480x480, no centre crop.
    written = json.loads((hf / "preprocessor_config.json").read_text())
    assert written["size"] == {"height": 480, "width": 480} and written["do_center_crop"] is False
    assert pixels.shape == (2, 3, 480, 480)
    assert model.config.id2label[0] == "tench, Tinca tinca"  # ImageNet-1k names for a 1000-class head

    # Same pixels, same weights: transformers standardises kernels with its fixed eps 1e-8, bitcli with the
    # 1e-10 the weights came with (kept in config.json as bitcli_ws_eps). At transformers' eps the two
    # computations are the same; the eps alone moves these logits (up to ~16) by about 1e-4.
    ckpt = load_checkpoint(str(hf))
    assert ckpt.config.ws_eps == 1e-10
    center = pixels[:, :, 128:352, 128:352]  # the 224-px centre: under a quarter of the compute
    with torch.no_grad():
        hf_logits = model(center).logits
        ours = ckpt.build_model()(center)
        ckpt.config = dataclasses.replace(ckpt.config, ws_eps=1e-8)
        ours_at_hf_eps = ckpt.build_model()(center)
        hf_probs = model(pixels).logits.softmax(-1)
    assert (ours_at_hf_eps - hf_logits).abs().max() < 1e-5
    assert (ours - hf_logits).abs().max() < 5e-4

    # `bit predict` from the image files, on the converted folder and on the .npz directly.
    args = [*images, "--format", "json", "--top-k", "1000", "--device", "cpu"]
    for source in (hf, r50["npz"]):
        code, stdout, stderr = bit("predict", "--model", source, *args)
        assert code == 0, stderr
        for row, probs in zip(json.loads(stdout), hf_probs, strict=True):
            preds = row["predictions"]
            assert len(preds) == 1000
            assert [p["index"] for p in preds[:5]] == probs.topk(5).indices.tolist(), (source, row["path"])
            assert all(p["label"] == model.config.id2label[p["index"]] for p in preds)
            got = torch.tensor([p["score"] for p in sorted(preds, key=lambda p: p["index"])])
            assert (got - probs).abs().max() < 1e-4, (source, row["path"])  # eps, and channels-last conv rounding


# ----------------------------------------------------------------------------------------------------------
# --labels and --dtype


def test_labels_file_travels_into_every_layout(tmp_path, photos):
    npz = tiny_npz(tmp_path / "tiny.npz")
    (tmp_path / "labels.txt").write_text("red fox\n\nsnow leopard\nkōala\n", encoding="utf-8")  # blank lines ignored
    names = ["red fox", "snow leopard", "kōala"]
    convert_ok(npz, tmp_path / "out.safetensors", "--labels", tmp_path / "labels.txt")
    convert_ok(npz, tmp_path / "hf", "--labels", tmp_path / "labels.txt")
    assert json.loads(read_st(tmp_path / "out.safetensors")[1]["labels"]) == names
    id2label = json.loads((tmp_path / "hf" / "config.json").read_text(encoding="utf-8"))["id2label"]
    assert [id2label[str(i)] for i in range(3)] == names

    code, out, err = bit(
        "predict", photos["chelsea.png"], "--model", tmp_path / "out.safetensors", "--format", "json", "--top-k", "3"
    )
    assert code == 0, err
    predictions = json.loads(out)[0]["predictions"]
    assert sorted(p["index"] for p in predictions) == [0, 1, 2]
    assert all(p["label"] == names[p["index"]] for p in predictions)  # each name stays with its class


@pytest.mark.parametrize("dtype, st_name", [("float16", "F16"), ("bfloat16", "BF16")])
def test_dtype(tmp_path, dtype, st_name):
    arrays = google_arrays(TINY["depths"], widths=TINY["widths"], stem=TINY["stem"], num_classes=4, seed=8)
    npz = save_npz(tmp_path / "tiny.npz", arrays)
    convert_ok(npz, tmp_path / "out.safetensors", "--dtype", dtype)
    convert_ok(npz, tmp_path / "hf", "--dtype", dtype)
    torch_dtype = getattr(torch, dtype)
    with open(tmp_path / "out.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {st_name}
    bitcli, _ = read_st(tmp_path / "out.safetensors")
    hf, _ = read_st(tmp_path / "hf" / "model.safetensors")
    for key, array in arrays.items():
        expected = google_to_oihw(key, array).to(torch_dtype)
        hf_name, timm_name = google_to_torch_names(key)
        assert torch.equal(bitcli[timm_name.replace(".blocks.", ".units.").replace("head.fc.", "head.")], expected)
        assert torch.equal(hf[hf_name], expected)
    x = inputs(64)
    with torch.no_grad():
        reference = bitcli_model(tmp_path / "hf")(x)  # a half-precision checkpoint still builds and runs
        assert (
            reference - timm_from_npz(npz, TINY["depths"], 1, 4, channels=TINY["widths"], stem_chs=32)(x)
        ).abs().max() < 0.05


# ----------------------------------------------------------------------------------------------------------
# Bad input: one line, exit 1, nothing left behind


class Evil:
    """Unpickling this runs code: it must never happen."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _npz_without(tmp: Path, key: str) -> Path:
    arrays = google_arrays(TINY["depths"], widths=TINY["widths"], stem=TINY["stem"], num_classes=3)
    del arrays[key]
    return save_npz(tmp / "src.npz", arrays)


def _npz_replacing(tmp: Path, key: str, value: np.ndarray) -> Path:
    arrays = google_arrays(TINY["depths"], widths=TINY["widths"], stem=TINY["stem"], num_classes=3)
    arrays[key] = value
    return save_npz(tmp / "src.npz", arrays)


def _truncated(tmp: Path) -> Path:
    data = tiny_npz(tmp / "full.npz").read_bytes()
    (tmp / "full.npz").unlink()
    (tmp / "src.npz").write_bytes(data[: len(data) // 2])
    return tmp / "src.npz"


def _member_cut_short(tmp: Path) -> Path:
    """A well-formed zip whose .npy member holds less data than its header promises."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.zeros((64,), np.float32))
    with zipfile.ZipFile(tmp / "src.npz", "w") as zf, zf.open("resnet/group_norm/gamma.npy", "w") as f:
        f.write(buf.getvalue()[:-40])
    return tmp / "src.npz"


def _object_array(tmp: Path) -> Path:
    arrays = google_arrays(TINY["depths"], widths=TINY["widths"], stem=TINY["stem"], num_classes=3)
    arrays["resnet/group_norm/gamma"] = np.array([Evil(tmp / "PWNED")], dtype=object)
    np.savez(tmp / "src.npz", **arrays)  # numpy pickles object arrays; loading would run Evil's payload
    return tmp / "src.npz"


def _npy_not_npz(tmp: Path) -> Path:
    np.save(tmp / "src.npy", np.zeros(3, np.float32))
    (tmp / "src.npy").rename(tmp / "src.npz")
    return tmp / "src.npz"


def _torch_save_evil(tmp: Path) -> Path:
    torch.save({"stem.conv.weight": torch.zeros(64, 3, 7, 7), "x": Evil(tmp / "PWNED")}, tmp / "src.bin")
    return tmp / "src.bin"


def _raw_pickle_evil(tmp: Path) -> Path:
    (tmp / "src.pth").write_bytes(pickle.dumps({"stem.conv.weight": Evil(tmp / "PWNED")}))
    return tmp / "src.pth"


def _unknown_names(tmp: Path) -> Path:
    from safetensors.torch import save_file

    save_file({"encoder.layer.0.weight": torch.zeros(4, 4)}, tmp / "src.safetensors")
    return tmp / "src.safetensors"


def _unknown_npz_names(tmp: Path) -> Path:
    return save_npz(tmp / "src.npz", {"params/Transformer/encoder/kernel": np.zeros((4, 4), np.float32)})


def _other_model_folder(tmp: Path) -> Path:
    (tmp / "src").mkdir()
    (tmp / "src" / "config.json").write_text(json.dumps({"model_type": "vit", "architectures": ["ViTModel"]}))
    return tmp / "src"


def _unknown_suffix(tmp: Path) -> Path:
    (tmp / "src.tflite").write_bytes(b"\x08\x07")
    return tmp / "src.tflite"


def _truncated_safetensors(tmp: Path) -> Path:
    from safetensors.torch import save_file

    save_file({"stem.conv.weight": torch.zeros(64, 3, 7, 7)}, tmp / "full.safetensors")
    data = (tmp / "full.safetensors").read_bytes()
    (tmp / "full.safetensors").unlink()
    (tmp / "src.safetensors").write_bytes(data[:-100])
    return tmp / "src.safetensors"


BAD_INPUTS = {
    "missing key": (
        lambda t: _npz_without(t, "resnet/block2/unit01/b/group_norm/gamma"),
        "weights do not match the architecture: missing resnet/block2/unit01/b/group_norm/gamma",
    ),
    "missing stage width": (
        lambda t: _npz_without(t, "resnet/block1/unit01/c/standardized_conv2d/kernel"),
        "missing resnet/block1/unit01/c/standardized_conv2d/kernel",
    ),
    "wrong shape": (
        lambda t: _npz_replacing(
            t, "resnet/block3/unit01/b/standardized_conv2d/kernel", np.zeros((3, 3, 32, 30), np.float32)
        ),
        "wrong shape resnet/block3/unit01/b/standardized_conv2d/kernel (3, 3, 32, 30) (expected (3, 3, 32, 32))",
    ),
    "wrong rank": (
        lambda t: _npz_replacing(t, "resnet/group_norm/beta", np.zeros((128, 1), np.float32)),
        "resnet/group_norm/beta has shape (128, 1); expected a 1-d array",
    ),
    "integer array": (
        lambda t: _npz_replacing(t, "resnet/group_norm/beta", np.zeros(128, np.int32)),
        "array resnet/group_norm/beta has dtype int32; BiT weights must be float16, float32 or float64",
    ),
    "truncated npz": (_truncated, "the .npz archive is truncated"),
    "npz member cut short": (_member_cut_short, "array resnet/group_norm/gamma is truncated"),
    "object array": (_object_array, "array resnet/group_norm/gamma holds Python objects (a pickle); bitcli refuses"),
    "single .npy": (_npy_not_npz, "is a single .npy array, not an .npz archive"),
    "pickled code in torch.save": (
        _torch_save_evil,
        "pickled Python objects, not plain weights (it refers to posix.system)",
    ),
    "pickled code in raw pickle": (_raw_pickle_evil, "pickled Python objects, not plain weights"),
    "unknown tensor names": (
        _unknown_names,
        "unknown tensor name(s) encoder.layer.0.weight; not a BiT checkpoint in timm's",
    ),
    "unknown npz names": (
        _unknown_npz_names,
        "unknown array name(s) params/Transformer/encoder/kernel; not a BiT .npz",
    ),
    "other model type": (_other_model_folder, "neither a transformers BiT config"),
    "unknown file type": (_unknown_suffix, "unknown model file type '.tflite'"),
    "truncated safetensors": (_truncated_safetensors, "truncated"),
}


@pytest.mark.parametrize("dst_name", ["out.safetensors", "out"])
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_exit_1_and_leaves_nothing(case, dst_name, tmp_path):
    make, message = BAD_INPUTS[case]
    src = make(tmp_path)
    before = listing(tmp_path)
    code, out, err = bit("convert", src, tmp_path / dst_name)
    assert code == 1, err
    assert out == ""
    assert err.endswith("\n") and err.count("\n") == 1 and err.startswith("Error: "), err
    assert message in err, err
    assert listing(tmp_path) == before  # no DST, no temporary file
    assert not (tmp_path / "PWNED").exists()  # no pickled payload ran


@pytest.mark.parametrize("case", ["pickled code in torch.save", "pickled code in raw pickle"])
def test_bad_input_through_a_real_process(case, tmp_path):
    """The same failures in a fresh interpreter: nothing (warnings included) but the one line on stderr."""
    make, message = BAD_INPUTS[case]
    src = make(tmp_path)
    before = listing(tmp_path)
    result = run_bit("convert", src, tmp_path / "out")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("Error: ") and message in result.stderr, (
        result.stderr
    )
    assert listing(tmp_path) == before
    assert not (tmp_path / "PWNED").exists()


def _corrupt_member_data(npz: Path, member: str) -> None:
    """Flip one byte inside a stored member's data: the zip still opens, its CRC no longer matches."""
    with zipfile.ZipFile(npz) as zf:
        info = zf.getinfo(member)
    data = bytearray(npz.read_bytes())
    name_len, extra_len = (
        int.from_bytes(data[info.header_offset + 26 : info.header_offset + 28], "little"),
        int.from_bytes(data[info.header_offset + 28 : info.header_offset + 30], "little"),
    )
    data[info.header_offset + 30 + name_len + extra_len + info.file_size - 1] ^= 0xFF
    npz.write_bytes(bytes(data))


@pytest.mark.parametrize("dst_name", ["out.safetensors", "out"])
def test_corruption_found_while_writing_leaves_no_temporary_file(dst_name, tmp_path):
    npz = tiny_npz(tmp_path / "src.npz")
    # A member too big to be read along with its header: the damage shows only when its data is converted,
    # after earlier tensors are already in the temporary output.
    _corrupt_member_data(npz, "resnet/block4/unit01/c/standardized_conv2d/kernel.npy")
    code, _, err = bit("convert", npz, tmp_path / dst_name)
    assert code == 1 and err.count("\n") == 1
    assert "array resnet/block4/unit01/c/standardized_conv2d/kernel cannot be read (Bad CRC-32" in err, err
    assert "the file is corrupt" in err
    assert listing(tmp_path) == ["src.npz"]


def test_small_corrupt_member_is_found_before_writing(tmp_path):
    npz = tiny_npz(tmp_path / "src.npz")
    _corrupt_member_data(npz, "resnet/head/conv2d/bias.npy")
    code, _, err = bit("convert", npz, tmp_path / "out")
    assert code == 1 and err.count("\n") == 1
    assert "array resnet/head/conv2d/bias is corrupt (Bad CRC-32" in err, err
    assert listing(tmp_path) == ["src.npz"]


def test_existing_dst_needs_overwrite(tmp_path):
    """--overwrite replaces a bitcli file, or the model files of a folder; any other file, and a folder holding
    anything else, is refused either way (tests/test_safe_writes.py has the rest)."""
    npz = tiny_npz(tmp_path / "src.npz")
    (tmp_path / "out.safetensors").write_bytes(b"keep me")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("keep me")
    refused = (
        f"Error: {tmp_path / 'out'}: holds the file 'keep.txt', which is not a model file; bitcli writes a model "
        "folder only into a new folder or one holding nothing but model files (config.json, model.safetensors, "
        "preprocessor_config.json, pytorch_model.bin), so choose another folder\n"
    )
    code, _, err = bit("convert", npz, tmp_path / "out.safetensors")
    assert (
        code == 1
        and err == f"Error: {tmp_path / 'out.safetensors'}: already exists; pass --overwrite to replace this file\n"
    )
    for flags in ([], ["--overwrite"]):
        code, _, err = bit("convert", npz, tmp_path / "out", *flags)
        assert code == 1 and err == refused, err
    assert (tmp_path / "out.safetensors").read_bytes() == b"keep me"
    assert (tmp_path / "out" / "keep.txt").read_text() == "keep me"
    assert listing(tmp_path) == ["out", "out.safetensors", "src.npz"]

    (tmp_path / "out" / "keep.txt").unlink()
    code, _, err = bit("convert", npz, tmp_path / "out.safetensors", "--overwrite")  # not a file bitcli wrote
    assert code == 1 and err == (
        f"Error: {tmp_path / 'out.safetensors'}: is not a safetensors file; --overwrite replaces only a file that "
        "bitcli wrote, so choose another DST or remove this one yourself\n"
    )
    assert (tmp_path / "out.safetensors").read_bytes() == b"keep me"
    (tmp_path / "out.safetensors").unlink()
    assert bit("convert", npz, tmp_path / "out.safetensors")[0] == 0
    inode = (tmp_path / "out.safetensors").stat().st_ino
    for dst in ("out.safetensors", "out"):
        code, _, err = bit("convert", npz, tmp_path / dst, "--overwrite")
        assert code == 0, err
    assert (tmp_path / "out.safetensors").stat().st_ino != inode  # bitcli's own file was replaced
    code, _, err = bit("convert", npz, tmp_path / "out")
    assert code == 1 and err == (
        f"Error: {tmp_path / 'out'}: already holds a model; pass --overwrite to replace its model files "
        "(config.json, model.safetensors, preprocessor_config.json, pytorch_model.bin)\n"
    )
    assert listing(tmp_path) == ["out", "out.safetensors", "src.npz"]
    assert listing(tmp_path / "out") == ["config.json", "model.safetensors", "preprocessor_config.json"]
    assert read_st(tmp_path / "out.safetensors")[1]["format"] == "bitcli"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--labels", "labels.txt"], "labels.txt: has 2 labels but the model has 3 classes; one name per line"),
        (["--labels", "nope.txt"], "nope.txt: cannot read label file"),
    ],
)
def test_bad_labels_file(flags, message, tmp_path):
    npz = tiny_npz(tmp_path / "src.npz")
    (tmp_path / "labels.txt").write_text("a\nb\n")
    flags = [str(tmp_path / f) if f.endswith(".txt") else f for f in flags]
    code, _, err = bit("convert", npz, tmp_path / "out.safetensors", *flags)
    assert code == 1 and err.count("\n") == 1 and message in err, err
    assert listing(tmp_path) == ["labels.txt", "src.npz"]


def test_labels_file_naming_a_class_twice_is_refused(tmp_path):
    npz = tiny_npz(tmp_path / "src.npz")
    (tmp_path / "labels.txt").write_text("cat\n\ndog\ncat\n")
    code, out, err = bit("convert", npz, tmp_path / "out.safetensors", "--labels", tmp_path / "labels.txt")
    assert (code, out) == (1, "")
    assert err == (f"Error: {tmp_path / 'labels.txt'}: names class 'cat' twice (names 1 and 3); "
                   "give each class its own name\n")  # fmt: skip
    assert listing(tmp_path) == ["labels.txt", "src.npz"]


def test_timm_layout_needs_a_timm_architecture(tmp_path):
    npz = tiny_npz(tmp_path / "src.npz")
    code, _, err = bit("convert", npz, tmp_path / "out", "--format", "timm")
    assert (code, err) == (
        1,
        (
            f"Error: {npz}: depths [1, 1, 1, 1] and widths [128, 128, 128, 128] have no timm name (timm's BiT models are "
            "R50x1, R50x3, R101x1, R101x3, R152x2, R152x4); convert to --format bitcli or hf instead\n"
        ),
    ), err
    assert listing(tmp_path) == ["src.npz"]


def sparse_bitcli_file(path: Path, name: str) -> Path:
    """A bitcli .safetensors of architecture `name` whose tensor bytes are a hole in the file (zeros that take
    no disk space): a full-size layout to convert, for a refusal that comes before any tensor is read."""
    from bitcli.architectures import from_name
    from bitcli.formats import expected_shapes
    from bitcli.preprocess import Preprocess

    config = from_name(name, num_classes=10)
    header, offset = {}, 0
    for key, shape in sorted(expected_shapes(config).items()):
        size = 4 * int(np.prod(shape))
        header[key] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "bitcli", "config": json.dumps(config.to_dict()),
                              "labels": json.dumps([f"c{i}" for i in range(10)]),
                              "preprocess": json.dumps(Preprocess().to_dict())}  # fmt: skip
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        f.truncate(8 + len(text) + offset)
    return path


def test_an_r50x2_has_no_timm_model_to_convert_to(tmp_path):
    """timm builds R50x1, R50x3, R101x1, R101x3, R152x2 and R152x4 only: it cannot create resnetv2_50x2_bit,
    so writing one would give a folder timm cannot load."""
    src = sparse_bitcli_file(tmp_path / "r50x2.safetensors", "R50x2")
    code, out, err = bit("convert", src, tmp_path / "out", "--format", "timm")
    assert (code, out) == (1, ""), err
    assert err == (
        f"Error: {src}: depths [3, 4, 6, 3] and widths [512, 1024, 2048, 4096] have no timm name (timm's BiT "
        "models are R50x1, R50x3, R101x1, R101x3, R152x2, R152x4); convert to --format bitcli or hf instead\n"
    )
    assert listing(tmp_path) == ["r50x2.safetensors"]


def test_an_unpublished_name_is_not_downloaded(tmp_path, monkeypatch):
    """BiT-M-R50x2 was never published: it is not looked for in Google's bucket."""
    monkeypatch.setenv("BITCLI_MODELS_URL", "http://127.0.0.1:9/never-asked")
    monkeypatch.setenv("BITCLI_CACHE", str(tmp_path / "cache"))
    code, out, err = bit("convert", "BiT-M-R50x2", tmp_path / "out.safetensors")
    assert (code, out) == (1, "")
    assert err == (
        "Error: model 'BiT-M-R50x2': no such file or folder, and not a Hub repo id (org/name) or a published BiT "
        "name (e.g. BiT-M-R50x1)\n"
    )
    assert listing(tmp_path) == []


def test_written_files_get_ordinary_permissions(r50, tmp_path):
    convert_ok(r50["bitcli"], tmp_path / "hf")
    umask = os.umask(0o022)
    os.umask(umask)
    assert (tmp_path / "hf").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "hf" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    assert r50["bitcli"].stat().st_mode & 0o777 == 0o666 & ~umask


def test_run_takes_typed_options_by_keyword(tmp_path):
    """What the CLI calls: convert.run(ConvertOptions); no --format and a DST without a suffix: hf."""
    from bitcli.commands import convert
    from bitcli.options import ConvertOptions, DType

    npz = tiny_npz(tmp_path / "src.npz")
    convert.run(ConvertOptions(src=str(npz), dst=tmp_path / "out", dtype=DType.bfloat16))
    assert listing(tmp_path / "out") == ["config.json", "model.safetensors", "preprocessor_config.json"]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert {t.dtype for t in read_st(tmp_path / "out" / "model.safetensors")[0].values()} == {torch.bfloat16}
