"""The scores predict, eval and embed report, on both engines: a calibrated model's temperature stored in every
format bitcli writes and applied alike by the torch engine, a converted transformers folder and the ONNX engine
(transformers itself ignores it); --tta flip against the mean of two direct engine calls; --min-score's
unknown label in every output format."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from conftest import BIT50_PREPROCESSOR, TINY_LABELS, run_main, save_hf_model
from PIL import Image

from bitcli.engine import load_engine
from bitcli.formats import bitcli as bitcli_format
from bitcli.formats import timm as timm_format
from bitcli.hub import load_checkpoint
from bitcli.preprocess import load_image

TEMPERATURE = 1.7
CROP_64 = {**BIT50_PREPROCESSOR, "size": {"shortest_edge": 64}, "crop_size": {"height": 64, "width": 64}}


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory) -> dict[str, Path]:
    """A tiny 10-class model with spread logits (saved by transformers), and the same model calibrated at
    TEMPERATURE: as a bitcli file, converted from it to a transformers folder and exported to ONNX."""
    folder = tmp_path_factory.mktemp("calibrated")
    src = save_hf_model(folder / "src", CROP_64, head_scale=10.0, embedding_size=16, hidden_sizes=[32, 64],
                        depths=[1, 1], num_groups=8, id2label=dict(enumerate(TINY_LABELS)),
                        label2id={n: i for i, n in enumerate(TINY_LABELS)})  # fmt: skip
    bitcli_format.write(
        dataclasses.replace(load_checkpoint(str(src)), temperature=TEMPERATURE), folder / "m.safetensors"
    )
    for dst in ("hf", "m.onnx"):
        code, out, err = run_main("convert", folder / "m.safetensors", folder / dst)
        assert (code, out) == (0, ""), err
    return {"src": src, "bitcli": folder / "m.safetensors", "hf": folder / "hf", "onnx": folder / "m.onnx"}


def _scores(model: Path, images: list[Path], *flags: object) -> np.ndarray:
    """predict's scores of every class, [images, classes], from its JSON."""
    code, out, err = run_main("predict", *images, "--model", model, "--top-k", "10", "--format", "json", *flags)
    assert code == 0, err
    table = np.zeros((len(images), 10))
    for i, row in enumerate(json.loads(out)):
        for p in row["predictions"]:
            table[i, p["index"]] = p["score"]
    return table


def _transformers_logits(model_dir: Path, images: list[Path]) -> torch.Tensor:
    model = transformers.BitForImageClassification.from_pretrained(model_dir).eval()
    processor = transformers.BitImageProcessorPil.from_pretrained(model_dir)
    with torch.no_grad():
        return model(processor([Image.open(p) for p in images], return_tensors="pt")["pixel_values"]).logits


def test_the_temperature_is_stored_in_every_format_and_applied_by_every_engine(calibrated, photos) -> None:
    images = [photos["chelsea.png"], photos["coffee.png"], photos["rocket.jpg"]]
    logits = _transformers_logits(calibrated["src"], images)
    want = torch.softmax(logits / TEMPERATURE, dim=-1).numpy()
    for kind in ("bitcli", "hf", "onnx"):
        assert load_checkpoint(str(calibrated[kind])).temperature == TEMPERATURE, kind
        np.testing.assert_allclose(_scores(calibrated[kind], images), want, atol=2e-6, err_msg=kind)
    # the uncalibrated source: plain softmax
    np.testing.assert_allclose(_scores(calibrated["src"], images), torch.softmax(logits, -1).numpy(), atol=2e-6)
    # transformers reads the converted folder, ignores the key, and gives the uncalibrated softmax
    config = json.loads((calibrated["hf"] / "config.json").read_text())
    assert config["bitcli_temperature"] == TEMPERATURE
    torch.testing.assert_close(_transformers_logits(calibrated["hf"], images), logits, rtol=1e-5, atol=1e-5)
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(calibrated["onnx"])).metadata_props}
    assert json.loads(meta["bitcli.temperature"]) == TEMPERATURE


def test_timm_folder_keeps_the_temperature(bit50_dir: Path, tmp_path: Path) -> None:
    """timm's layout (a named architecture: R50x1) carries it in config.json, which timm ignores."""
    ckpt = dataclasses.replace(load_checkpoint(str(bit50_dir)), temperature=0.8)
    timm_format.write(ckpt, tmp_path / "timm")
    assert json.loads((tmp_path / "timm" / "config.json").read_text())["bitcli_temperature"] == 0.8
    assert timm_format.read(tmp_path / "timm").temperature == 0.8


@pytest.mark.parametrize("value", ["0", "-1", "NaN", "Infinity", '"hot"', "true"])
def test_a_damaged_temperature_is_one_line(calibrated, tmp_path: Path, photos, value: str) -> None:
    folder = tmp_path / "hf"
    folder.mkdir()
    for name in ("model.safetensors", "preprocessor_config.json"):
        (folder / name).write_bytes((calibrated["hf"] / name).read_bytes())
    config = (calibrated["hf"] / "config.json").read_text().replace(f'"bitcli_temperature": {TEMPERATURE}',
                                                                     f'"bitcli_temperature": {value}')  # fmt: skip
    (folder / "config.json").write_text(config)
    code, out, err = run_main("predict", photos["chelsea.png"], "--model", folder)
    assert (code, out) == (1, "")
    assert err.startswith(f"Error: {folder / 'config.json'}: bitcli_temperature must be a number greater than 0, got ")


def _two_views(engine, image: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = np.array(engine.preprocess.to_uint8(load_image(image))[None])
    return batch, np.ascontiguousarray(batch[:, :, ::-1])


@pytest.mark.parametrize("kind", ["bitcli", "onnx"])
def test_tta_flip_is_the_mean_of_two_engine_calls(calibrated, photos, kind: str) -> None:
    """--tta flip: the engine's scores of the image (after resize and crop) and of its mirror image, averaged;
    on the torch and the ONNX engine alike, and eval records it."""
    images = [photos["chelsea.png"], photos["astronaut.png"]]
    engine = load_engine(load_checkpoint(str(calibrated[kind])), torch.device("cpu"), torch.float32)
    want = []
    for image in images:
        plain, mirrored = _two_views(engine, image)
        assert not np.array_equal(plain, mirrored)
        probs = [torch.softmax(engine.logits(view) / TEMPERATURE, -1)[0].numpy() for view in (plain, mirrored)]
        want.append((probs[0] + probs[1]) / 2)
    got = _scores(calibrated[kind], images, "--tta", "flip")
    np.testing.assert_allclose(got, np.array(want), atol=1e-6)
    assert np.abs(got - _scores(calibrated[kind], images)).max() > 1e-3  # the flip changes the scores


def test_tta_flip_agrees_between_engines_and_in_eval(calibrated, photos, tmp_path: Path) -> None:
    images = [photos["chelsea.png"], photos["coffee.png"], photos["rocket.jpg"], photos["flower.jpg"]]
    torch_scores = _scores(calibrated["bitcli"], images, "--tta", "flip")
    np.testing.assert_allclose(_scores(calibrated["onnx"], images, "--tta", "flip"), torch_scores, atol=1e-5)
    # eval over the same images (two class folders): its NLL is that of the TTA scores, "tta" recorded
    data = tmp_path / "data"
    truth = ["apple", "apple", "banana", "banana"]
    for image, label in zip(images, truth):
        (data / label).mkdir(parents=True, exist_ok=True)
        (data / label / image.name).write_bytes(image.read_bytes())
    order = sorted(range(4), key=lambda i: (truth[i], images[i].name))  # eval's order: class, then file name
    y = np.array([TINY_LABELS.index(truth[i]) for i in order])
    probs = torch_scores[order]
    for kind in ("bitcli", "onnx"):
        code, out, err = run_main("eval", data, "--model", calibrated[kind], "--tta", "flip", "--format", "json")
        assert code == 0, err
        result = json.loads(out)
        assert (result["tta"], result["temperature"]) == ("flip", TEMPERATURE)
        assert result["nll"] == pytest.approx(-np.mean(np.log(probs[np.arange(4), y])), rel=1e-4)
        assert result["top1"] == np.mean(probs.argmax(1) == y)
    code, out, err = run_main("eval", data, "--model", calibrated["bitcli"], "--format", "json")
    assert (code, json.loads(out)["tta"]) == (0, None), err


def test_multi_label_eval_records_tta_and_scores_the_mean_of_the_views(calibrated, photos, tmp_path: Path) -> None:
    """A multi-label model's `bit eval --tta flip`: the JSON records it (as the single-label one does), the
    table says it, and the metrics are those of the two views' mean sigmoid scores (scikit-learn's AP, and the
    binary cross-entropy of those scores)."""
    from sklearn.metrics import average_precision_score

    model = tmp_path / "multi.safetensors"
    bitcli_format.write(dataclasses.replace(load_checkpoint(str(calibrated["src"])), thresholds=[0.5] * 10), model)
    images = [photos["chelsea.png"], photos["coffee.png"], photos["rocket.jpg"], photos["astronaut.png"]]
    truth = [["apple", "cherry"], ["banana"], ["apple", "banana"], ["cherry"]]
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps({"path": str(i), "label": t}) + "\n" for i, t in zip(images, truth)))
    engine = load_engine(load_checkpoint(str(model)), torch.device("cpu"), torch.float32)
    probs = []
    for image in images:
        views = [torch.sigmoid(engine.logits(view))[0].double().numpy() for view in _two_views(engine, image)]
        probs.append((views[0] + views[1]) / 2)
    p = np.array(probs)
    y = np.array([[int(name in t) for name in TINY_LABELS] for t in truth])
    present = [c for c in range(10) if y[:, c].any()]
    code, out, err = run_main("eval", labels, "--model", model, "--tta", "flip", "--format", "json")
    assert code == 0, err
    result = json.loads(out)
    assert (result["multi_label"], result["tta"]) == (True, "flip")
    assert result["mAP"] == pytest.approx(np.mean([average_precision_score(y[:, c], p[:, c]) for c in present]))
    bce = -(y * np.log(p) + (1 - y) * np.log(1 - p)).sum(axis=1).mean()
    assert result["loss"] == pytest.approx(bce, rel=1e-5)
    code, table, err = run_main("eval", labels, "--model", model, "--tta", "flip")
    assert (code, err) == (0, "") and table.startswith("images  4 (multi-label, --tta flip)\n")
    code, out, err = run_main("eval", labels, "--model", model, "--format", "json")
    plain = json.loads(out)
    assert (code, plain["tta"]) == (0, None) and plain["loss"] != pytest.approx(bce, rel=1e-5)


def test_embed_tta_flip_is_the_mean_of_the_two_feature_vectors(calibrated, photos, tmp_path: Path) -> None:
    image = photos["chelsea.png"]
    engine = load_engine(load_checkpoint(str(calibrated["bitcli"])), torch.device("cpu"), torch.float32, False)
    plain, mirrored = _two_views(engine, image)
    want = ((engine.features(plain) + engine.features(mirrored)) / 2)[0].numpy()  # no temperature on features
    code, out, err = run_main("embed", image, "--model", calibrated["bitcli"], "--tta", "flip", "-f", "jsonl")
    assert code == 0, err
    got = np.array(json.loads(out)["embedding"], dtype=np.float32)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    code, out, _ = run_main("embed", image, "--model", calibrated["bitcli"], "-f", "jsonl")
    np.testing.assert_allclose(json.loads(out)["embedding"], engine.features(plain)[0].numpy(), rtol=1e-5, atol=1e-6)


def test_min_score_marks_the_unsure_rows_unknown_in_every_format(calibrated, photos, monkeypatch) -> None:
    """A threshold between two images' top scores: the surer one keeps its label, the other's is unknown (null
    in JSON and JSON lines, an empty image_label in CSV, "unknown" in the table), both with their top-k."""
    monkeypatch.setenv("COLUMNS", "200")
    images = [photos["chelsea.png"], photos["coffee.png"], photos["rocket.jpg"]]
    base = ["predict", *images, "--model", calibrated["bitcli"], "--top-k", "2"]
    plain = json.loads(run_main(*base, "--format", "json")[1])
    tops = [row["predictions"][0]["score"] for row in plain]
    assert [row["label"] for row in plain] == [row["predictions"][0]["label"] for row in plain]  # no threshold
    threshold = float(np.sort(tops)[1])  # the middle one is kept: a score equal to P is not below it
    known = [score >= threshold for score in tops]
    assert known.count(False) == 1
    flags = ["--min-score", str(threshold)]

    rows = json.loads(run_main(*base, *flags, "--format", "json")[1])
    assert [row["label"] for row in rows] == [p["predictions"][0]["label"] if k else None for p, k in zip(plain, known)]
    assert [row["predictions"] for row in rows] == [row["predictions"] for row in plain]  # the top-k stays
    assert list(rows[0]) == ["path", "label", "predictions"]
    assert [json.loads(line) for line in run_main(*base, *flags, "--format", "jsonl")[1].splitlines()] == rows
    lines = list(csv.DictReader(io.StringIO(run_main(*base, *flags, "--format", "csv")[1])))
    assert [(r["rank"], r["image_label"]) for r in lines] == [
        (str(rank), row["label"] or "") for row in rows for rank in (1, 2)
    ]
    code, table, err = run_main(*base, *flags)
    assert (code, err) == (0, "")
    assert table.count("│ unknown ") == 1
    unknown_row = table.split(f"│ {images[known.index(False)]} ")[1]
    assert unknown_row.splitlines()[0].split("│")[1].strip() == "unknown"

    assert all(row["label"] is None for row in json.loads(run_main(*base, "--min-score", "1", "-f", "json")[1]))
    assert all(row["label"] for row in json.loads(run_main(*base, "--min-score", "0", "-f", "json")[1]))


@pytest.mark.parametrize("value", ["1.5", "-0.1", "nan", "half"])
def test_min_score_outside_0_1_exits_2(calibrated, photos, value: str) -> None:
    code, out, err = run_main("predict", photos["chelsea.png"], "--model", calibrated["bitcli"], "--min-score", value)
    assert (code, out) == (2, "")
    assert err.startswith("Error: --min-score ") and value in err.splitlines()[0] and "between 0 and 1" in err
