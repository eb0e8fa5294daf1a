"""Hub repo ids resolved by huggingface_hub from a pre-populated HF cache, offline, as on a user's machine."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import timm
from conftest import perturb, populate_hf_cache, run_main, write_folder

COMMIT_MAIN = "a" * 40
COMMIT_V1 = "b" * 40


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory, tiny_dir):
    """HF_HOME whose hub cache holds google/bit-50 (main and tag v1) and a timm BiT repo."""
    home = tmp_path_factory.mktemp("hf_home")
    populate_hf_cache(home / "hub", "google/bit-50", tiny_dir, COMMIT_MAIN)

    relabelled = tmp_path_factory.mktemp("v1") / "bit-50-v1"
    relabelled.mkdir()
    for f in tiny_dir.iterdir():
        (relabelled / f.name).write_bytes(f.read_bytes())
    config = json.loads((tiny_dir / "config.json").read_text())
    config["id2label"] = {k: v.upper() for k, v in config["id2label"].items()}
    config["label2id"] = {v.upper(): int(k) for k, v in config["id2label"].items()}
    (relabelled / "config.json").write_text(json.dumps(config))
    populate_hf_cache(home / "hub", "google/bit-50", relabelled, COMMIT_V1, refs=("v1",))

    from timm.models._hub import save_for_hf

    model = timm.create_model(
        "resnetv2_50x1_bit", num_classes=10, pretrained_cfg_overlay=dict(input_size=(3, 64, 64), crop_pct=1.0)
    )
    perturb(model)
    timm_dir = tmp_path_factory.mktemp("timm") / "r50"
    save_for_hf(model, timm_dir, safe_serialization=True)
    populate_hf_cache(home / "hub", "timm/resnetv2_50x1_bit.goog_in21k_ft_in1k", timm_dir, "c" * 40)
    return home


@pytest.fixture
def use_hub_cache(monkeypatch):
    """Point huggingface_hub at an HF_HOME in this process. It reads HF_HOME and HF_HUB_OFFLINE once, at import,
    into its `constants`, and looks them up there on every call: the values a fresh process would have read."""
    from huggingface_hub import constants

    def use(hf_home: Path, offline: bool = True) -> None:
        monkeypatch.setenv("HF_HOME", str(hf_home))
        monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)

    return use


@pytest.fixture
def _predict(use_hub_cache):
    """`bit predict IMAGE --format json FLAGS` in this process, with HF_HOME=hf_home (offline unless told)."""

    def predict(hf_home, image, *flags, offline=True) -> subprocess.CompletedProcess:
        use_hub_cache(hf_home, offline)
        args = ["predict", image, "--format", "json", *flags]
        return subprocess.CompletedProcess(args, *run_main(*args))

    return predict


def test_default_model_resolves_from_cache_offline(_predict, hf_home, tiny_dir, photos):
    from_cache = _predict(hf_home, photos["chelsea.png"])  # no --model: google/bit-50
    assert from_cache.returncode == 0, from_cache.stderr
    from_folder = _predict(hf_home, photos["chelsea.png"], "--model", str(tiny_dir))
    assert json.loads(from_cache.stdout)[0]["predictions"] == json.loads(from_folder.stdout)[0]["predictions"]


def test_revision_selects_another_snapshot(_predict, hf_home, photos):
    main = json.loads(_predict(hf_home, photos["chelsea.png"]).stdout)[0]["predictions"]
    v1 = _predict(hf_home, photos["chelsea.png"], "--revision", "v1")
    assert v1.returncode == 0, v1.stderr
    tagged = json.loads(v1.stdout)[0]["predictions"]
    assert [p["label"] for p in tagged] == [p["label"].upper() for p in main]


def test_timm_repo_id_from_cache(_predict, hf_home, photos):
    result = _predict(
        hf_home, photos["rocket.jpg"], "--model", "timm/resnetv2_50x1_bit.goog_in21k_ft_in1k", "--top-k", "2"
    )
    assert result.returncode == 0, result.stderr
    preds = json.loads(result.stdout)[0]["predictions"]
    assert [p["label"] for p in preds] == [f"class_{p['index']}" for p in preds]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--model", "google/bit-101"], "'google/bit-101' is not in the Hugging Face cache"),
        (["--revision", "v2"], "'google/bit-50@v2' is not in the Hugging Face cache"),
    ],
)
def test_missing_from_cache_offline_is_one_clear_line(_predict, hf_home, photos, flags, message):
    result = _predict(hf_home, photos["chelsea.png"], *flags)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and message in result.stderr and "HF_HUB_OFFLINE=1" in result.stderr
    assert "hf download" in result.stderr


def test_cached_model_works_without_offline_flag_when_hub_is_unreachable(_predict, hf_home, photos):
    """No HF_HUB_OFFLINE and no network: huggingface_hub falls back to the cache by itself."""
    result = _predict(hf_home, photos["chelsea.png"], offline=False)
    assert result.returncode == 0, result.stderr


# ----------------------------------------------------------------------------------------------------------
# Specs that are not models, or that name a local path that is not there


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A real (tiny, random-init) bit finetune run folder."""
    root = tmp_path_factory.mktemp("finetune")
    write_folder(root / "data", {"red": 8, "green": 8, "blue": 8})
    tiny = '{"depths": [1, 1], "hidden_sizes": [32, 64], "embedding_size": 16, "num_groups": 8}'
    code, _, err = run_main("finetune", root / "data", "--output", root / "run", "--steps", "4", "--batch-size", "4",
                            "--eval-every", "0", "--random-init", "--model", tiny, "--resolution", "16", "--workers", "0")  # fmt: skip
    assert code == 0, err
    return root / "run"


def _error(*args) -> str:
    code, out, err = run_main(*args)
    assert (code, out) == (1, ""), err
    assert err.startswith("Error: ") and err.count("\n") == 1, err
    return err.removeprefix("Error: ").rstrip("\n")


def test_training_state_is_not_a_model_and_the_message_names_the_model(finished_run, photos):
    state = finished_run / "checkpoint.safetensors"
    assert _error("predict", photos["chelsea.png"], "--model", state) == (
        f"{state}: is the resumable training state of a bit finetune run, not a model; "
        f"use {finished_run / 'model.safetensors'} (or the run folder {finished_run})"
    )
    # The weights file of the run's transformers folder is read with the folder's config.json.
    by_file = run_main(
        "predict", photos["chelsea.png"], "--model", finished_run / "model.safetensors", "--format", "json"
    )
    by_folder = run_main("predict", photos["chelsea.png"], "--model", finished_run, "--format", "json")
    assert by_file[0] == 0 and by_file == by_folder, by_file[2]


def test_unfinished_run_says_it_has_no_model_yet(finished_run, photos, tmp_path):
    run = tmp_path / "run"  # what a run killed before its end holds (besides metrics.jsonl and .lock)
    run.mkdir()
    for name in ("checkpoint.safetensors", "finetune_config.json"):
        shutil.copy(finished_run / name, run / name)
    assert _error("predict", photos["chelsea.png"], "--model", run / "checkpoint.safetensors") == (
        f"{run / 'checkpoint.safetensors'}: is the resumable training state of a bit finetune run, not a model; the run "
        f"has not written its model ({run / 'model.safetensors'}) yet: finish it with `bit finetune DATA --output {run} --resume`"
    )
    assert _error("predict", photos["chelsea.png"], "--model", run) == (
        f"{run}: this bit finetune run has not written its model yet (config.json, model.safetensors); "
        f"finish it with `bit finetune DATA --output {run} --resume`"
    )


@pytest.mark.parametrize("spec", ["./typo", "~/no-such-bitcli-model", "runs/X/model.safetensors", "runs/typo.safetensors",
                                  "typo.npz", "runs\\typo"])  # fmt: skip
def test_local_looking_spec_that_does_not_exist_is_no_such_file(spec, photos, tmp_path, monkeypatch):
    (tmp_path / "runs" / "X").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert _error("predict", photos["chelsea.png"], "--model", spec) == f"model {spec!r}: no such file or folder"


def test_owner_name_spec_that_is_neither_local_nor_cached_says_both(_predict, hf_home, photos, tmp_path, monkeypatch):
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    result = _predict(hf_home, photos["chelsea.png"], "--model", "runs/typo")
    assert result.returncode == 1 and result.stdout == "" and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(
        "Error: model 'runs/typo': no such file or folder, and as a Hub repo id: model 'runs/typo' is not in the Hugging Face cache"
    ), result.stderr
    assert "HF_HUB_OFFLINE=1" in result.stderr
