"""`bit finetune` end to end: the plan on stderr, the run folder's files, the model that transformers and
`bit predict` load, and the refusals that come before any weight is built."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_main, write_folder
from PIL import Image

from bitcli import hyperrule
from bitcli.finetune import prepare

from .helpers import FAST, RUN_FILES, TINY, VALIDATION_FILES, read_metrics, truncated_jpeg


def test_finetune_end_to_end(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    code, stdout, err = run_main("finetune", dataset, "--output", out, "--steps", "8", "--batch-size", "8",
                                 "--eval-every", "4", "--save-every", "3", *FAST)  # fmt: skip
    assert code == 0, err
    assert stdout == ""  # stdout is for data; the plan and progress go to stderr
    for word in ("train       36 images", "validation  12 images", "resize 20x20, random crop 16", "8 steps",
                 "mixup       off", "batch       8 = 1 process(es) x", "SGD momentum 0.9", "[--resolution 16]"):  # fmt: skip
        assert word in err, word
    assert {p.name for p in out.iterdir()} == RUN_FILES | VALIDATION_FILES

    plan = json.loads((out / "finetune_config.json").read_text())
    assert plan["classes"] == ["blue", "green", "red"]
    assert (plan["steps"], plan["boundaries"], plan["resize"], plan["crop"]) == (8, [2, 3, 5, 6, 8], 20, 16)
    assert plan["mixup"] is None and plan["batch_split"] == 1 and plan["train_examples"] == 36
    assert set(plan["why"]) == {"resolution", "steps", "mixup", "batch_split"}  # every choice says where it came from
    assert (plan["eval_every"], plan["save_every"], plan["world_size"]) == (4, 3, 1)

    metrics = read_metrics(out)
    sched = hyperrule.Schedule(tuple(plan["boundaries"]))
    assert [m["step"] for m in metrics] == list(range(8))
    assert [m["lr"] for m in metrics] == [hyperrule.learning_rate(s, sched) for s in range(8)]
    assert all(np.isfinite(m["loss"]) for m in metrics)
    assert [m["step"] for m in metrics if "val_top1" in m] == [3, 7]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["val_top1"] == metrics[-1]["val_top1"] and summary["val_top5"] is None  # 3 classes: no top-5
    assert f"done: val top-1 {summary['val_top1']:.4f}, top-5 n/a on 12 images\n" in err
    assert (
        summary["steps"] == 8
        and summary["val_examples"] == 12
        and set(summary["val_per_class"]) == {"blue", "green", "red"}
    )

    # The model is a transformers folder: bitcli and transformers load it and agree on the logits.
    from transformers import BitForImageClassification

    from bitcli.hub import load_checkpoint
    from bitcli.preprocess import load_image

    ckpt = load_checkpoint(str(out))
    assert ckpt.labels == ["blue", "green", "red"] and ckpt.preprocess.crop == (16, 16)
    ours = ckpt.build_model()
    theirs = BitForImageClassification.from_pretrained(out).eval()
    assert theirs.config.id2label == {0: "blue", 1: "green", 2: "red"}
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ours(x), rtol=1e-5, atol=1e-6)
    assert not torch.equal(ours.head.weight, torch.zeros_like(ours.head.weight))  # the head was trained

    # `bit predict` with the run folder gives transformers' answer for the image: label and score, the score
    # at the temperature fitted on the validation set (config.json's bitcli_temperature, which transformers
    # itself does not apply).
    temperature = json.loads((out / "config.json").read_text())["bitcli_temperature"]
    assert temperature == summary["calibration"]["temperature"] == ckpt.temperature != 1.0
    image = dataset / "val" / "red" / "000.png"
    code, stdout, err = run_main("predict", image, "--model", out, "--format", "json")
    assert code == 0, err
    with torch.no_grad():
        probs = (theirs(ckpt.preprocess(load_image(image)).unsqueeze(0)).logits / temperature).softmax(-1)[0]
    top = json.loads(stdout)[0]["predictions"][0]
    assert (top["label"], top["index"]) == (theirs.config.id2label[int(probs.argmax())], int(probs.argmax()))
    assert top["score"] == pytest.approx(float(probs.max()), abs=1e-5)


def test_flag_errors(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cases = [
        (["--val", dataset / "val", "--val-split", "0.2"], 2, "pass only one"),
        (["--batch-size", "16", "--batch-split", "3"], 2, "--batch-split 3: must divide the 16 images"),
        (["--steps", "many"], 2, "--steps 'many': use auto or a whole number"),
        (["--resolution", "8:16"], 2, "RESIZE:CROP"),
        (["--shots", "13"], 1, "class 'blue' has only 12 training image(s)"),
    ]
    for flags, want_code, message in cases:
        code, _, err = run_main("finetune", dataset, "--output", out, *FAST, *flags)
        assert (code, message in err) == (want_code, True), err
        assert err.startswith("Error: ") and len(err.strip().splitlines()) == 1
    code, _, err = run_main("finetune", tmp_path / "missing", "--output", out, *FAST)
    assert code == 1 and "no such folder" in err
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (8, 8)).save(flat / "a.png")
    code, _, err = run_main("finetune", flat, "--output", out, *FAST)
    assert code == 1 and "one sub-folder per class" in err and "train/cat/" in err  # the expected tree
    assert not out.exists()


def test_few_shot_run_uses_k_per_class(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    code, _, err = run_main("finetune", dataset, "--output", out, "--shots", "2", "--seed", "5", "--steps", "1",
                            "--batch-size", "4", *FAST)  # fmt: skip
    assert code == 0, err
    plan = json.loads((out / "finetune_config.json").read_text())
    assert plan["train_examples"] == 6 and plan["shots"] == 2 and "(2 per class, seed 5)" in err


def test_val_split(tmp_path: Path) -> None:
    train_only = tmp_path / "only"
    write_folder(train_only, {"a": 10, "b": 10})
    out = tmp_path / "run"
    code, _, err = run_main(
        "finetune", train_only, "--output", out, "--val-split", "0.2", "--steps", "1", "--batch-size", "4", *FAST
    )
    assert code == 0, err
    plan = json.loads((out / "finetune_config.json").read_text())
    assert (plan["train_examples"], plan["val_examples"]) == (16, 4)
    assert json.loads((out / "summary.json").read_text())["val_examples"] == 4


def test_degenerate_runs_are_refused_before_any_weight_is_built(tmp_path: Path, tiny_dir: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    data, one, val = tmp_path / "data", tmp_path / "one", tmp_path / "val"
    write_folder(data, {"red": 4, "green": 4})
    write_folder(one, {"red": 4})
    write_folder(val, {"red": 2, "green": 2})
    out = tmp_path / "run"

    def never(*args, **kwargs):
        raise AssertionError("weights were built")

    monkeypatch.setattr(prepare, "build_start_model", never)
    before = sorted(tmp_path.rglob("*"))
    cases = [
        (
            [one, "--output", out, *FAST],
            f"{one}: holds one class folder ('red'); a classifier needs at least 2 classes",
        ),
        (
            [data, "--output", data / "myrun", *FAST],
            f"--output {data / 'myrun'}: is inside the image folder {data} (DATA)",
        ),
        ([data, "--output", data, *FAST], f"--output {data}: is the image folder {data} (DATA)"),
        ([data, "--output", val / "x" / "run", "--val", val, *FAST], f"is inside the image folder {val} (--val)"),
        ([data, "--output", out, "--random-init", "--model", TINY, "--resolution", "1"], "use a crop of at least 8"),
        ([data, "--output", out, "--random-init", "--model", TINY, "--resolution", "6:4"], "a 4-px crop is below"),
        ([data, "--output", out, "--random-init", "--model", "small", "--resolution", "16"], "total stride of 32 px"),
        ([data, "--output", out, "--model", tiny_dir, "--resolution", "4"], "use a crop of at least 8"),  # pretrained
    ]
    for args, message in cases:
        code, _, err = run_main("finetune", *args)
        assert code == 2 and message in err, err
        assert err.startswith("Error: ") and len(err.strip().splitlines()) == 1
    assert sorted(tmp_path.rglob("*")) == before  # nothing written anywhere


def test_a_class_with_no_decodable_image_is_refused_before_training(tmp_path: Path) -> None:
    write_folder(tmp_path / "data", {"red": 4})
    truncated_jpeg(tmp_path / "data" / "green" / "only.jpg")
    code, _, err = run_main("finetune", tmp_path / "data", "--output", tmp_path / "run", *FAST)
    assert code == 1, err
    assert f"Error: {tmp_path / 'data' / 'green'}: none of the images of class 'green' can be decoded" in err
    assert not (tmp_path / "run").exists()
