"""`bit convert SRC model.onnx` and `bit predict/eval --model model.onnx`: onnxruntime against transformers on real
photos, the ONNX path against the torch path in every output format, the metadata, the folded kernels, and
one clean line for every kind of bad file or missing extra.

Models are built here with transformers (google/bit-50's TF "SAME" padding, so the dynamic padding is exported).
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import transformers
from conftest import BIT50_PREPROCESSOR, TINY_LABELS, run_main, save_hf_model
from onnx import TensorProto, helper
from PIL import Image
from safetensors import safe_open

import bitcli
from bitcli.config import BitConfig
from bitcli.hub import load_checkpoint
from bitcli.model import standardize
from bitcli.preprocess import Preprocess

SAME_PADDING = {"global_padding": "same", "embedding_dynamic_padding": True}  # google/bit-50's config
TINY = dict(embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1], num_groups=8, id2label=dict(enumerate(TINY_LABELS)),
            label2id={n: i for i, n in enumerate(TINY_LABELS)}, **SAME_PADDING)  # fmt: skip
CROP_64 = {**BIT50_PREPROCESSOR, "size": {"shortest_edge": 64}, "crop_size": {"height": 64, "width": 64}}


def metadata(path: Path) -> dict:
    """The file's metadata_props, read with onnx itself."""
    return {p.key: json.loads(p.value) for p in onnx.load(str(path)).metadata_props}


def convert_ok(*args: object) -> str:
    code, out, err = run_main("convert", *args)
    assert (code, out) == (0, ""), err  # stdout carries only data: an export prints nothing there
    return err


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    """A tiny BiT with a 64-px centre crop and spread-out logits, and its float32 export."""
    folder = tmp_path_factory.mktemp("onnx")
    src = save_hf_model(folder / "src", CROP_64, head_scale=20.0, **TINY)
    err = convert_ok(src, folder / "m.onnx")
    assert re.search(r"checked with onnxruntime: logits within \S+ of the largest logit", err), err
    assert (
        err.splitlines()[-1] == f"wrote {folder / 'm.onnx'} (onnx): 2 stages [1, 1], width 64, 10 classes, 25 tensors"
    )
    return {"src": src, "onnx": folder / "m.onnx", "folder": folder}


def transformers_pixels_and_logits(src: Path, paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    model = transformers.BitForImageClassification.from_pretrained(src).eval()
    pixels = transformers.BitImageProcessorPil.from_pretrained(src)(
        [Image.open(p) for p in paths], return_tensors="pt"
    )["pixel_values"]
    with torch.no_grad():
        return pixels.numpy(), model(pixels).logits.numpy()


def relative_diff(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("count", [1, 5])
def test_onnxruntime_matches_transformers_on_real_photos(exported, photos, count):
    paths = list(photos.values())[:count]
    pixels, want = transformers_pixels_and_logits(exported["src"], paths)
    session = ort.InferenceSession(str(exported["onnx"]), providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {"pixel_values": pixels})
    assert got.shape == (count, 10)
    assert relative_diff(got, want) <= 1e-4


def test_graph_interface_and_folded_kernels(exported):
    model = onnx.load(str(exported["onnx"]))
    onnx.checker.check_model(model)
    (inp,), (out,) = model.graph.input, model.graph.output
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert (inp.name, inp.type.tensor_type.elem_type, dims(inp)[1:]) == ("pixel_values", TensorProto.FLOAT, [3, 64, 64])
    assert (out.name, out.type.tensor_type.elem_type, dims(out)[1:]) == ("logits", TensorProto.FLOAT, [10])
    assert isinstance(dims(inp)[0], str) and dims(inp)[0] == dims(out)[0]  # one dynamic batch axis
    # Every convolution reads a constant kernel (no standardisation computed per call), and that kernel is
    # transformers' weight, standardised: the 7x7 stem's is found among them.
    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert len(convs) == 9 and all(n.input[1] in initializers for n in convs)
    stem = transformers.BitForImageClassification.from_pretrained(
        exported["src"]
    ).bit.embedder.convolution.weight.detach()
    kernels = [initializers[n.input[1]] for n in convs if initializers[n.input[1]].shape == (16, 3, 7, 7)]
    assert len(kernels) == 1 and np.array_equal(kernels[0], standardize(stem, 1e-8).numpy())


def test_metadata_round_trips(exported):
    meta = metadata(exported["onnx"])
    source = load_checkpoint(str(exported["src"]))
    assert set(meta) == {"bitcli.labels", "bitcli.preprocess", "bitcli.config", "bitcli.source", "bitcli.version",
                         "bitcli.precision", "bitcli.check"}  # fmt: skip
    assert meta["bitcli.labels"] == TINY_LABELS
    assert Preprocess.from_dict(meta["bitcli.preprocess"]) == source.preprocess
    assert BitConfig.from_dict(meta["bitcli.config"]) == source.config
    assert (meta["bitcli.source"], meta["bitcli.version"], meta["bitcli.precision"]) == (
        str(exported["src"]),
        bitcli.__version__,
        "float32",
    )
    assert meta["bitcli.check"]["max_rel_diff"] <= 1e-4 and meta["bitcli.check"]["tolerance"] == 1e-4
    ckpt = load_checkpoint(str(exported["onnx"]))  # what predict and eval read
    assert (ckpt.labels, ckpt.preprocess, ckpt.config) == (source.labels, source.preprocess, source.config)


def test_every_preprocessing_field_round_trips(exported, tmp_path):
    """torchvision's crop rounding (timm), a non-square crop, bicubic, odd mean/std: the file alone serves it."""
    from safetensors.torch import load_file, save_file

    bitcli_file = tmp_path / "m.safetensors"
    convert_ok(exported["src"], bitcli_file)
    with safe_open(bitcli_file, "pt") as f:
        meta = f.metadata()
    want = Preprocess(resize=(80, 70), crop=(64, 48), interpolation="bicubic", mean=(0.485, 0.456, 0.406),
                      std=(0.229, 0.224, 0.225), crop_rounding="round")  # fmt: skip
    save_file(load_file(bitcli_file), bitcli_file, {**meta, "preprocess": json.dumps(want.to_dict())})
    convert_ok(bitcli_file, tmp_path / "t.onnx")
    assert Preprocess.from_dict(metadata(tmp_path / "t.onnx")["bitcli.preprocess"]) == want
    assert load_checkpoint(str(tmp_path / "t.onnx")).preprocess == want
    dims = [d.dim_value for d in onnx.load(str(tmp_path / "t.onnx")).graph.input[0].type.tensor_type.shape.dim]
    assert dims[1:] == [3, 64, 48]


def _rows(fmt: str, out: str) -> list[tuple[str, str, float]]:
    """(path, label, score) per prediction, from any output format."""
    if fmt == "json":
        return [(r["path"], p["label"], p["score"]) for r in json.loads(out) for p in r["predictions"]]
    if fmt == "jsonl":
        return [
            (r["path"], p["label"], p["score"])
            for line in out.splitlines()
            for r in [json.loads(line)]
            for p in r["predictions"]
        ]
    if fmt == "csv":
        return [(r["path"], r["label"], float(r["score"])) for r in csv.DictReader(io.StringIO(out))]
    rows = []  # the table: "│ path │ label (index) │ score │", the path only on a row's first line
    for line in out.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if len(cells) == 3 and re.fullmatch(r"\d\.\d{4}", cells[2]):
            path = cells[0] or rows[-1][0]
            rows.append((path, cells[1], float(cells[2])))
    return rows


@pytest.mark.parametrize("fmt", ["table", "json", "jsonl", "csv"])
def test_predict_onnx_equals_predict_source(exported, photos, fmt, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    images = list(photos.values())
    runs = [
        run_main("predict", *images, "--model", m, "--format", fmt, "--top-k", "5")
        for m in (exported["src"], exported["onnx"])
    ]
    (code_t, out_t, _err_t), (code_o, out_o, err_o) = runs
    assert (code_t, code_o) == (0, 0), err_o
    torch_rows, onnx_rows = _rows(fmt, out_t), _rows(fmt, out_o)
    assert len(torch_rows) == len(images) * 5
    assert [(p, label) for p, label, _ in onnx_rows] == [(p, label) for p, label, _ in torch_rows]
    # table scores are rounded to 4 places: a 1e-4 difference may move the last one by 1
    tolerance = 1e-4 + (1.01e-4 if fmt == "table" else 1e-9)
    assert max(abs(a[2] - b[2]) for a, b in zip(onnx_rows, torch_rows)) <= tolerance


def test_eval_onnx_equals_eval_source(exported, photos, tmp_path):
    for i, (name, path) in enumerate(sorted(photos.items())):
        (tmp_path / TINY_LABELS[i % 3]).mkdir(exist_ok=True)
        Image.open(path).convert("RGB").save(tmp_path / TINY_LABELS[i % 3] / f"{Path(name).stem}.png")
    results = [
        run_main("eval", tmp_path, "--model", m, "--format", "json") for m in (exported["src"], exported["onnx"])
    ]
    assert [r[0] for r in results] == [0, 0], results[1][2]
    torch_json, onnx_json = (json.loads(r[1]) for r in results)
    assert onnx_json["confusion"] == torch_json["confusion"] and onnx_json["top1"] == torch_json["top1"]
    assert onnx_json["loss"] == pytest.approx(torch_json["loss"], abs=1e-4)


def test_uncropped_model_exports_dynamic_height_and_width(photos, tmp_path):
    """Without a centre crop every image keeps its aspect ratio: H and W are dynamic, and the TF "SAME"
    padding of the strided convolutions is computed from them at run time."""
    src = save_hf_model(
        tmp_path / "src",
        {**BIT50_PREPROCESSOR, "size": {"shortest_edge": 64}, "do_center_crop": False},
        head_scale=20.0,
        **TINY,
    )
    convert_ok(src, tmp_path / "m.onnx")
    dims = [d.dim_param for d in onnx.load(str(tmp_path / "m.onnx")).graph.input[0].type.tensor_type.shape.dim]
    assert dims[0] and dims[2] and dims[3]
    images = [photos[n] for n in ("chelsea.png", "astronaut.png", "china.jpg")]  # 451x300, 512x512, 640x427
    want, got = (run_main("predict", *images, "--model", m, "--format", "json") for m in (src, tmp_path / "m.onnx"))
    assert [(p["label"]) for r in json.loads(got[1]) for p in r["predictions"]] == [
        p["label"] for r in json.loads(want[1]) for p in r["predictions"]
    ]
    scores = [np.array([p["score"] for r in json.loads(x[1]) for p in r["predictions"]]) for x in (want, got)]
    assert np.abs(scores[0] - scores[1]).max() <= 1e-4


def test_float16_export(exported, photos, tmp_path):
    convert_ok(exported["src"], tmp_path / "h.onnx", "--dtype", "float16")
    model = onnx.load(str(tmp_path / "h.onnx"))
    kernels = {t.name: t.data_type for t in model.graph.initializer}
    assert {kernels[n.input[1]] for n in model.graph.node if n.op_type == "Conv"} == {TensorProto.FLOAT16}
    assert metadata(tmp_path / "h.onnx")["bitcli.precision"] == "float16"
    pixels, want = transformers_pixels_and_logits(exported["src"], list(photos.values())[:5])
    (got,) = ort.InferenceSession(str(tmp_path / "h.onnx"), providers=["CPUExecutionProvider"]).run(
        ["logits"], {"pixel_values": pixels}
    )
    assert got.dtype == np.float32 and relative_diff(got, want) <= 1e-2  # docs/onnx.md: float16's documented tolerance


# ----------------------------------------------------------------------------------------------------------
# Refusals: one line, non-zero exit, nothing written


def test_failed_proof_writes_nothing(exported, tmp_path, monkeypatch):
    import bitcli.export

    dst = tmp_path / "m.onnx"
    previous = exported["onnx"].read_bytes()  # an earlier export: --overwrite may replace it
    dst.write_bytes(previous)
    monkeypatch.setitem(bitcli.export.TOLERANCE, torch.float32, -1.0)  # no difference can pass
    code, out, err = run_main("convert", exported["src"], dst, "--overwrite")
    assert code == 1 and out == ""
    assert err.splitlines()[-1].startswith("Error: the exported graph differs from the torch model by ")
    assert "nothing was written" in err
    assert dst.read_bytes() == previous and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_overwrite_tells_bitcli_exports_from_other_files(exported, tmp_path):
    """What `bit convert --overwrite` may replace, read from the protobuf's top-level fields alone: bitcli's own
    export, and not another tool's ONNX file, a truncated export or text."""
    from bitcli.formats.onnx import foreign

    data = exported["onnx"].read_bytes()
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])  # fmt: skip
    other = helper.make_model(graph)
    other.metadata_props.add(key="author", value="someone else")
    files = {"other.onnx": other.SerializeToString(), "truncated.onnx": data[: len(data) // 2],
             "notes.onnx": b"my notes\n", "empty.onnx": b""}  # fmt: skip
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    assert foreign(exported["onnx"]) is None
    assert {name: foreign(tmp_path / name) for name in files} == {
        "other.onnx": "an ONNX file without bitcli's metadata (bitcli.config)",
        "truncated.onnx": "not an ONNX file",
        "notes.onnx": "not an ONNX file",
        "empty.onnx": "not an ONNX file",
    }


def _one_error_line(code: int, out: str, err: str) -> str:
    assert (code, out) == (1, ""), (code, out, err)
    lines = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_damaged_onnx_is_one_line(exported, photos, tmp_path, damage):
    data = exported["onnx"].read_bytes()
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(
        {
            "garbage": b"\x08\x07not an onnx file at all\xff\xff" * 50,
            "truncated": data[: len(data) * 2 // 3],
            "empty": b"",
        }[damage]
    )
    line = _one_error_line(*run_main("predict", photos["chelsea.png"], "--model", bad))
    assert line.startswith(f"Error: {bad}: ")
    assert re.search(r"truncated or corrupt|truncated one", line), line


def test_onnx_without_bitcli_metadata_is_one_line(photos, tmp_path):
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])  # fmt: skip
    other = tmp_path / "other.onnx"
    onnx.save(helper.make_model(graph), str(other))
    line = _one_error_line(*run_main("predict", photos["chelsea.png"], "--model", other))
    assert (
        line
        == f"Error: {other}: has no bitcli metadata (bitcli.config); bit runs only ONNX files written by `bit convert SRC model.onnx` (a truncated one loses its metadata too)"
    )


@pytest.mark.parametrize("module", ["onnxruntime", "onnx"])
def test_missing_extra_is_one_line(exported, photos, tmp_path, monkeypatch, module):
    monkeypatch.setitem(sys.modules, module, None)  # `import onnxruntime` now fails, as on a machine without it
    use = {"onnx": "Reading an .onnx file", "onnxruntime": "Running an .onnx model"}[module]
    for args, what in (
        (("predict", photos["chelsea.png"], "--model", exported["onnx"]), use),
        (("convert", exported["src"], tmp_path / "x.onnx"), "An ONNX export"),
    ):
        line = _one_error_line(*run_main(*args))
        assert line == f"Error: {what} needs {module}, which is not installed: pip install 'bitcli[onnx]'"
    assert not (tmp_path / "x.onnx").exists()


def test_an_export_runs_without_the_exporter(exported, photos, tmp_path, monkeypatch):
    """Review of issue 20: with onnx and onnxruntime but not onnxscript (which only exports), `bit predict` and
    `bit eval` of an exported .onnx were refused with the install hint, and so was `bit convert x.onnx
    y.safetensors` instead of saying why it cannot be. Now they run (and say so), and only an export asks for
    the extra."""
    predict = ("predict", photos["chelsea.png"], "--model", exported["onnx"], "--format", "json")
    code, want, err = run_main(*predict)
    assert code == 0, err
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # `import onnxscript` now fails, as on a machine without it
    assert run_main(*predict)[:2] == (0, want)
    (tmp_path / "data" / TINY_LABELS[0]).mkdir(parents=True)
    Image.open(photos["chelsea.png"]).convert("RGB").save(tmp_path / "data" / TINY_LABELS[0] / "chelsea.png")
    code, out, err = run_main("eval", tmp_path / "data", "--model", exported["onnx"], "--format", "json")
    assert (code, json.loads(out)["count"]) == (0, 1), err
    line = _one_error_line(*run_main("convert", exported["onnx"], tmp_path / "x.safetensors"))
    assert line.startswith(f"Error: {exported['onnx']}: an ONNX export runs in bit predict and bit eval only")
    line = _one_error_line(*run_main("convert", exported["src"], tmp_path / "x.onnx"))
    assert line == "Error: An ONNX export needs onnxscript, which is not installed: pip install 'bitcli[onnx]'"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # nothing written


def test_onnx_is_not_a_source_for_convert(exported, tmp_path):
    line = _one_error_line(*run_main("convert", exported["onnx"], tmp_path / "x.safetensors"))
    assert line.startswith(f"Error: {exported['onnx']}: an ONNX export runs in bit predict and bit eval only")
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["x.safetensors", "--opset", "18"], "--opset applies only to an ONNX export"),
        (["x.onnx", "--quantize", "int8"], "--quantize int8 needs --calibrate DIR"),
        (["x.onnx", "--dtype", "bfloat16"], "--dtype bfloat16: an ONNX export is float32 or float16"),
        (
            ["x.onnx", "--quantize", "int8", "--calibrate", ".", "--dtype", "float16"],
            "--quantize int8 starts from the float32 export",
        ),
        (
            ["x.onnx", "--quantize", "int8", "--calibrate", ".", "--min-agreement", "1.5"],
            "--min-agreement 1.5: must be between 0 and 1",
        ),
    ],
)
def test_onnx_flag_misuse_exits_2(exported, tmp_path, flags, message):
    code, _, err = run_main("convert", exported["src"], tmp_path / flags[0], *flags[1:])
    assert code == 2 and message in err, err
    assert not any(tmp_path.iterdir())


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider' is not in available provider names")
def test_a_cuda_session_that_runs_on_the_cpu_says_so_once(monkeypatch, capsys):
    """An onnxruntime that lists a CUDA provider but cannot start it (here: a CPU build made to list one, as
    onnxruntime-gpu without its CUDA libraries does) runs the graph on the CPU: one warning line, once."""
    from bitcli import onnx_engine

    value = {name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [1]) for name in "xy"}
    nodes = [helper.make_node("Identity", ["x"], ["y"])]
    graph = helper.make_model(helper.make_graph(nodes, "g", [value["x"]], [value["y"]])).SerializeToString()
    onnx_engine.session(graph, torch.device("cpu"), "g.onnx")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    onnx_engine._fell_back_to_cpu.cache_clear()
    for _ in range(2):
        assert onnx_engine.session(graph, torch.device("cuda"), "g.onnx").get_providers() == ["CPUExecutionProvider"]
    err = capsys.readouterr().err
    assert err.count("warning: onnxruntime could not start its CUDA provider") == 1, err
    assert err.count("\n") == 1, err
