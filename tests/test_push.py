"""`bit push RUN OWNER/NAME` against the loopback Hub (tests/fakehub.py), through the real huggingface_hub: the repo
gets exactly the transformers folder, the card, the pictures and model.onnx in one commit; downloaded back, it
predicts what the run folder predicts, in `bit predict` and in transformers' pipeline; errors are one line with
the fix, and a push that fails midway leaves no revision holding part of it.

The pushes that succeed run in processes, as a user runs them: huggingface_hub reads HF_ENDPOINT (and HF_TOKEN's
file, HF_HUB_OFFLINE) at import. The failing ones run in this process (push_here), with those constants patched:
a fresh interpreter per error would cost seconds each.
HF_HUB_DISABLE_XET=1: the fake speaks git LFS, not the Xet storage protocol hf_xet would use against the Hub.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import run_bit, run_main
from fakehub import FakeHub, closed_port_url
from PIL import Image

from bitcli.modelcard import PNG_SIGNATURE, CardInput, RunRecord, model_card
from bitcli.tool_options import PushOptions
from bitcli.ui import human_size

TINY = '{"depths": [1, 1], "hidden_sizes": [32, 64], "embedding_size": 16, "num_groups": 8}'
COLOURS = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200), "yellow": (200, 200, 40),
           "magenta": (200, 40, 200), "cyan": (40, 200, 200)}  # fmt: skip
ALICE, BOB = "tok-alice", "tok-bob"
REPO = "alice/bit-colors"
LISTED = {"README.md", "config.json", "model.safetensors", "preprocessor_config.json", "model.onnx", "curves.png",
          "confusion.png"}  # fmt: skip
UNCHANGED = ("model.safetensors", "preprocessor_config.json", "curves.png", "confusion.png")  # as in the run folder
GITATTRIBUTES = ".gitattributes"  # the Hub's own initial commit of every new repo
PHOTOS = ["chelsea.png", "rocket.jpg", "coffee.png"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 10-step run of a tiny random-init BiT on six colours (top-5 is a real cut), with validation."""
    root = tmp_path_factory.mktemp("push")
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("val", 2)):
        for name, colour in COLOURS.items():
            (root / "colours" / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(colour) + rng.integers(-40, 40, (16, 16, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / "colours" / split / name / f"{i}.png")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code, _, err = run_main("finetune", root / "colours", "--output", root / "run", "--steps", "10", "--batch-size",
                                "8", "--lr", "0.03", "--eval-every", "5", "--random-init", "--model", TINY,
                                "--resolution", "16", "--workers", "1",
                                "--no-calibrate")  # fmt: skip  # transformers ignores a fitted temperature (push.md)
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    assert {"checkpoint.safetensors", "metrics.jsonl", "curves.png", "confusion.png"} <= {
        p.name for p in (root / "run").iterdir()
    }
    return root / "run"


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory, run_dir: Path):
    server = FakeHub(storage=tmp_path_factory.mktemp("hubstore"))
    server.tokens = {ALICE: "alice", BOB: "bob"}
    server.orgs = {"alice": {"lab"}}
    bobs = tmp_path_factory.mktemp("bobs")
    (bobs / "README.md").write_text("# bob's model\n")
    server.add("bob/taken", bobs, "5f" * 20)  # bob's public repo
    with server:
        yield server


@pytest.fixture(autouse=True)
def _fresh_log(request):
    if "hub" in request.fixturenames:
        request.getfixturevalue("hub").reset()


def push_env(home: Path, endpoint: str, token: str = "", offline: bool = False) -> dict[str, str]:
    """A clean HF_HOME (no stored login), the fake's endpoint and HF_TOKEN (empty: none)."""
    return {"HF_HOME": str(home), "HF_ENDPOINT": endpoint, "HF_TOKEN": token, "HUGGING_FACE_HUB_TOKEN": "",
            "HF_HUB_OFFLINE": "1" if offline else "0", "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
            "OMP_NUM_THREADS": "1"}  # fmt: skip


def push(home: Path, endpoint: str, *args: object, token: str = ALICE, offline: bool = False):
    return run_bit("push", *args, env=push_env(home, endpoint, token, offline))


def push_here(home: Path, endpoint: str, *args: object, token: str = ALICE, offline: bool = False,
              timeout: int | None = None) -> tuple[int, str, str]:  # fmt: skip
    """A push in this process (a fresh interpreter costs seconds): what push_env sets, as the huggingface_hub
    constants it read at import, for the time of the call. The pushes that must succeed run in processes."""
    from huggingface_hub import constants

    with pytest.MonkeyPatch.context() as patch:
        for name, value in {"ENDPOINT": endpoint, "HF_TOKEN_PATH": str(home / "token"), "HF_HUB_OFFLINE": offline,
                            "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"), "HF_HUB_DISABLE_XET": True,
                            "HF_HUB_DISABLE_TELEMETRY": True}.items():  # fmt: skip
            patch.setattr(constants, name, value)
        if timeout is not None:
            patch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", timeout)
        patch.setenv("HF_TOKEN", token)
        patch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
        return run_main("push", *args)


def one_error_line(result) -> str:
    if isinstance(result, tuple):  # push_here's
        code, out, err = result
    else:
        code, out, err = result.returncode, result.stdout, result.stderr
    assert code == 1 and out == "", (code, out, err)
    assert err.count("\n") == 1 and err.startswith("Error: "), err
    return err


@pytest.fixture(scope="module")
def pushed(hub: FakeHub, run_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The run pushed with --onnx --license apache-2.0: (the process, the requests it made)."""
    hub.reset()
    result = push(tmp_path_factory.mktemp("home"), hub.url, run_dir, REPO, "--onnx", "--license", "apache-2.0")
    assert result.returncode == 0, result.stderr
    return result, list(hub.requests)


FIRST_TRY = "first try\n\nlr 0.03, 10 steps\nsix colours"  # a summary line, then the description
BRANCH_PUSH = ("lab/colours", "--private", "--revision", "try-1", "--commit-message", FIRST_TRY)


@pytest.fixture(scope="module")
def branch_pushed(hub: FakeHub, run_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The run pushed (no --onnx) to a new private repo of alice's organisation, on a new branch."""
    result = push(tmp_path_factory.mktemp("home"), hub.url, run_dir, *BRANCH_PUSH)
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def downloaded(hub: FakeHub, pushed, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The whole pushed repo, downloaded back by huggingface_hub's snapshot_download."""
    from huggingface_hub import constants, snapshot_download

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)  # no request to the real Hub's endpoint
        folder = snapshot_download(REPO, endpoint=hub.url, cache_dir=tmp_path_factory.mktemp("cache"), token=False)
    return Path(folder)


@pytest.fixture(scope="module")
def run_predictions(run_dir: Path, photos: dict[str, Path]) -> list[list[dict]]:
    code, out, err = run_main("predict", *(photos[p] for p in PHOTOS), "--model", run_dir, "--format", "json")
    assert code == 0, err
    return [row["predictions"] for row in json.loads(out)]


def card_metadata(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text[4:].split("\n---\n", 1)[0])


# ----------------------------------------------------------------------------------------------------------
# What is pushed


def test_push_commits_exactly_the_listed_files_once(pushed, hub: FakeHub, run_dir: Path, downloaded: Path) -> None:
    result, requests = pushed
    files = hub.files(REPO)
    assert set(files) == LISTED | {GITATTRIBUTES}
    assert sorted(p.name for p in downloaded.iterdir()) == sorted(LISTED | {GITATTRIBUTES})
    assert hub.history(REPO) == ["Upload bit-colors with bit push", "initial commit"]  # one commit on the Hub's
    assert [r for r in requests if "/commit/" in r[1]] == [("POST", f"/api/models/{REPO}/commit/main")]
    commit = hub.repos[REPO]["refs"]["main"]
    assert result.stdout == f"{hub.url}/{REPO}/commit/{commit}\n"
    assert result.stderr.endswith(f"pushed 7 files to {REPO} (main) in one commit: {', '.join(sorted(LISTED))}\n")
    for name in UNCHANGED:
        assert (downloaded / name).read_bytes() == (run_dir / name).read_bytes(), name
    config = json.loads((downloaded / "config.json").read_text())
    assert config["id2label"] == {str(i): name for i, name in enumerate(sorted(COLOURS))}


def test_card_metadata_and_text(downloaded: Path, run_dir: Path) -> None:
    from huggingface_hub import ModelCard

    text = (downloaded / "README.md").read_text()
    meta = card_metadata(text)
    validation = json.loads((run_dir / "validation.json").read_text())
    plan = json.loads((run_dir / "finetune_config.json").read_text())
    assert meta["pipeline_tag"] == "image-classification" and meta["library_name"] == "transformers"
    assert meta["tags"] == ["bit", "bitcli", "image-classification"] and meta["license"] == "apache-2.0"
    assert "base_model" not in meta and "datasets" not in meta  # random weights, a local folder
    [index] = meta["model-index"]
    assert index["name"] == "bit-colors"
    [result] = index["results"]
    assert result["task"]["type"] == "image-classification"
    assert result["dataset"] == {"name": "colours", "type": "imagefolder", "split": "validation"}
    assert {m["type"]: m["value"] for m in result["metrics"]} == {
        "accuracy": round(validation["top1"], 4),
        "top_5_accuracy": round(validation["top5"], 4),
        "f1": round(validation["macro_f1"], 4),
    }
    card = ModelCard(text)  # what the Hub and huggingface_hub read back
    assert card.data.eval_results[0].metric_value == round(validation["top1"], 4)
    assert f'pipeline("image-classification", model="{REPO}")' in text
    assert "| Start model | random weights (architecture `" in text
    assert f"| Steps | 10 (schedule boundaries {', '.join(map(str, plan['boundaries']))}) |" in text
    assert (f"| Learning rate | 0.03, momentum {plan['momentum']:g}: linear warm-up, then ÷10 at each boundary |"
            in text and "| Batch size | 8 |" in text and "| Few-shot | all training examples |" in text)  # fmt: skip
    assert f"- mixup: {plan['why']['mixup']}" in text  # where each automatic value came from
    assert "| Resolution | train: resize to 20 px, random crop 16 px and flip; eval: resize to 16 x 16 px |" in text
    assert f"`{plan['train_fingerprint']}`" in text
    assert "6 classes, in the model's order: 0: blue, 1: cyan, 2: green, 3: magenta, 4: red, 5: yellow" in text
    assert f"| top-1 accuracy | {validation['top1']:.4f} |" in text
    assert "![Training curves](curves.png)" in text and "![Confusion matrix (validation)](confusion.png)" in text
    assert str(run_dir.parent) not in text  # local paths are not published, only a folder's last part


def test_pushed_repo_predicts_as_the_run_in_bit_predict(hub: FakeHub, pushed, run_predictions, photos,
                                                        tmp_path: Path) -> None:  # fmt: skip
    result = run_bit("predict", *(photos[p] for p in PHOTOS), "--model", REPO, "--format", "json",
                     env=push_env(tmp_path, hub.url, token=""))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert [row["predictions"] for row in json.loads(result.stdout)] == run_predictions
    assert len(run_predictions[0]) == 5


def test_transformers_pipeline_and_onnx_give_the_runs_top5(downloaded: Path, run_predictions, photos) -> None:
    """transformers alone (no bitcli) on the downloaded folder: the run's preprocessor_config.json makes its
    BitImageProcessor resize to the run's square without cropping, as bitcli does, so the scores agree."""
    import huggingface_hub.constants
    import transformers

    with pytest.MonkeyPatch.context() as patch:  # offline: transformers reads only the folder
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        classifier = transformers.pipeline("image-classification", model=str(downloaded), device="cpu")
    assert type(classifier.model) is transformers.BitForImageClassification  # transformers' own class, no remote code
    code, out, err = run_main("predict", *(photos[p] for p in PHOTOS), "--model", downloaded / "model.onnx",
                              "--format", "json")  # fmt: skip
    assert code == 0, err
    for photo, expected, onnx in zip(PHOTOS, run_predictions, json.loads(out)):
        got = classifier(str(photos[photo]), top_k=5)
        assert [g["label"] for g in got] == [e["label"] for e in expected], photo
        assert max(abs(g["score"] - e["score"]) for g, e in zip(got, expected)) < 1e-4, photo
        assert [p["label"] for p in onnx["predictions"]] == [e["label"] for e in expected], photo
        assert max(abs(p["score"] - e["score"]) for p, e in zip(onnx["predictions"], expected)) < 1e-4, photo


def test_dry_run_prints_the_files_and_card_and_sends_nothing(hub: FakeHub, branch_pushed, run_dir: Path,
                                                             tmp_path: Path) -> None:  # fmt: skip
    """No token, no request: the fake Hub is HF_ENDPOINT and hears nothing. The card is the one the same push
    uploaded (branch_pushed)."""
    result = push(tmp_path, hub.url, run_dir, *BRANCH_PUSH, "--dry-run", token="")
    assert result.returncode == 0, result.stderr
    assert hub.requests == []
    listing, card = result.stdout.split("\n\nREADME.md:\n\n", 1)
    lines = listing.splitlines()
    assert lines[0] == "bit push would upload 6 files to lab/colours (try-1) in one commit:"
    uploaded = hub.files("lab/colours", "try-1")
    sizes = {
        name: f"{len(data)} B" if len(data) < 1024 else f"{len(data) / 1024:.1f} KiB" for name, data in uploaded.items()
    }
    assert [line.split(maxsplit=1) for line in lines[1:]] == [
        [name, sizes[name]] for name in sorted(LISTED - {"model.onnx"})
    ]
    assert card.encode() == uploaded["README.md"]


def test_a_model_that_is_not_a_run_gets_a_card_without_metrics(tiny_dir: Path) -> None:
    code, out, err = run_main("push", tiny_dir, "alice/tiny", "--dry-run")
    assert code == 0, err
    listing, card = out.split("\n\nREADME.md:\n\n", 1)
    assert [line.split()[0] for line in listing.splitlines()[1:]] == [
        "README.md", "config.json", "model.safetensors", "preprocessor_config.json"]  # fmt: skip
    meta = card_metadata(card)
    assert (
        "model-index" not in meta
        and "license" not in meta
        and meta["tags"] == ["bit", "bitcli", "image-classification"]
    )
    assert "10 classes, in the model's order: 0: apple, 1: banana" in card
    assert "License: not stated by the publisher." in card


def test_an_onnx_export_is_refused_in_one_line(downloaded: Path) -> None:
    """An .onnx file has no weights to write as a transformers folder: refused before any request (dry run)."""
    onnx = downloaded / "model.onnx"
    code, out, err = run_main("push", onnx, "alice/from-onnx", "--dry-run")
    assert (code, out) == (1, "") and err.count("\n") == 1, err
    assert err.startswith(f"Error: {onnx}: an ONNX export cannot be pushed (its weights are compiled into the graph")
    assert err.endswith(
        "push the checkpoint or run folder it was exported from, with --onnx to upload its ONNX export too\n"
    )


def _symlink_out(run: Path, outside: Path) -> str:
    Image.new("RGB", (4, 4), (1, 2, 3)).save(outside / "secret.png")  # a real PNG, anywhere on disk
    (run / "curves.png").unlink()
    (run / "curves.png").symlink_to(outside / "secret.png")
    return f"{run}/curves.png: is a symlink to {(outside / 'secret.png').resolve()}, outside {run}; copy the file into"


def _fifo(run: Path, outside: Path) -> str:
    (run / "curves.png").unlink()
    os.mkfifo(run / "curves.png")  # read without care, it would block the push until some writer came
    return f"{run}/curves.png: is a FIFO (named pipe), not a regular file"


def _not_png(run: Path, outside: Path) -> str:
    (run / "curves.png").write_bytes(b"GIF89a" + bytes(64))
    return f"{run}/curves.png: is not a PNG picture"


def _too_large(run: Path, outside: Path) -> str:
    with open(run / "curves.png", "wb") as f:  # sparse: 20 MiB and a byte, without writing them
        f.write(PNG_SIGNATURE)
        f.truncate(20 * 2**20 + 1)
    return f"{run}/curves.png: is over 20.0 MiB"


@pytest.mark.parametrize("spoil", [_symlink_out, _fifo, _not_png, _too_large], ids=lambda f: f.__name__.strip("_"))
def test_a_picture_that_is_no_regular_png_of_the_run_is_left_out(run_dir: Path, tmp_path: Path, spoil) -> None:
    """curves.png must be a regular PNG file inside the run folder, of at most 20 MiB: else the push goes on
    without it, with a warning naming it (and the card does not show it)."""
    run, outside = tmp_path / "run", tmp_path / "elsewhere"
    shutil.copytree(run_dir, run)
    outside.mkdir()
    reason = spoil(run, outside)
    code, out, err = run_main("push", run, "alice/x", "--dry-run")
    assert code == 0, err
    warning, done = err.splitlines()
    assert warning.startswith(f"warning: pushing without curves.png: {reason}"), warning
    assert done.startswith("dry run: nothing uploaded")
    listing, card = out.split("\n\nREADME.md:\n\n", 1)
    assert [line.split()[0] for line in listing.splitlines()[1:]] == sorted(LISTED - {"model.onnx", "curves.png"})
    assert "![Training curves]" not in card and "![Confusion matrix (validation)](confusion.png)" in card


def test_a_picture_linked_within_the_run_is_pushed(run_dir: Path, tmp_path: Path) -> None:
    """A symlink to another file of the run folder stays inside it: that picture goes up, without a warning."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "pictures").mkdir()
    (run / "curves.png").rename(run / "pictures" / "curves.png")
    (run / "curves.png").symlink_to(Path("pictures") / "curves.png")
    code, out, err = run_main("push", run, "alice/x", "--dry-run")
    assert code == 0 and err.startswith("dry run: nothing uploaded"), err
    size = human_size((run_dir / "curves.png").stat().st_size)
    assert f"\n  curves.png                {size:>9}\n" in out and "![Training curves](curves.png)" in out


def test_a_run_file_linked_from_outside_the_run_is_refused(run_dir: Path, tmp_path: Path) -> None:
    """validation.json (what the card's metrics say) is read by the same rule: a symlink out of the run folder is
    an error, as a malformed file is, before anything is uploaded."""
    run, outside = tmp_path / "run", tmp_path / "elsewhere"
    shutil.copytree(run_dir, run)
    outside.mkdir()
    (run / "validation.json").rename(outside / "validation.json")
    (run / "validation.json").symlink_to(outside / "validation.json")
    code, out, err = run_main("push", run, "alice/x", "--dry-run")
    assert (code, out) == (1, "") and err.count("\n") == 1, err
    assert err == (f"Error: {run}/validation.json: is a symlink to {(outside / 'validation.json').resolve()}, "
                   f"outside {run}; copy the file into the folder instead\n")  # fmt: skip


def test_card_names_a_hub_start_model_and_data_set_and_escapes_names(run_dir: Path) -> None:
    from bitcli.hub import load_checkpoint

    record = RunRecord.read(run_dir)
    hostile = "<img src=x onerror=alert(1)>|*x*"
    plan = {**record.plan, "model": "google/bit-50", "random_init": False, "data": "hf://datasets/org/flowers",
            "validation": "hf://datasets/org/flowers:test", "classes": [hostile, *record.plan["classes"][1:]],
            "shots": 2}  # fmt: skip
    validation = {**record.validation, "labels": [hostile, *record.validation["labels"][1:]]}
    record = RunRecord(plan=plan, summary=record.summary, validation=validation, pictures=record.pictures)
    ckpt = load_checkpoint(str(run_dir))
    text = model_card(CardInput(repo_id=REPO, ckpt=ckpt, src=str(run_dir), run=record, license=None, files=()))
    meta = card_metadata(text)
    assert meta["base_model"] == "google/bit-50" and meta["datasets"] == ["org/flowers"]
    assert meta["model-index"][0]["results"][0]["dataset"] == {"name": "org/flowers", "type": "org/flowers",
                                                                "split": "test"}  # fmt: skip
    assert "Fine-tuned with bitcli (`bit finetune`) from [google/bit-50](https://huggingface.co/google/bit-50)." in text
    assert "<img" not in text and "| &lt;img src=x onerror=alert\\(1\\)&gt;\\|\\*x\\* | " in text
    assert "- validation: 12 images from hf://datasets/org/flowers:test" in text
    assert "| Few-shot | 2 examples per class |" in text


# ----------------------------------------------------------------------------------------------------------
# Where it goes: a branch, a private repo, the stored login


def test_private_push_to_a_new_branch(hub: FakeHub, branch_pushed) -> None:
    """--commit-message's first line is the commit's summary, the lines after the blank one its description."""
    assert hub.repos["lab/colours"]["private"] is True
    assert hub.history("lab/colours", "try-1") == ["first try", "initial commit"]
    repo = hub.repos["lab/colours"]
    assert repo["descriptions"][repo["refs"]["try-1"]] == "lr 0.03, 10 steps\nsix colours"
    assert hub.history("lab/colours", "main") == ["initial commit"]
    assert set(hub.files("lab/colours", "try-1")) == LISTED - {"model.onnx"} | {GITATTRIBUTES}
    assert "(try-1) in one commit" in branch_pushed.stderr


def test_push_onto_a_repo_replaces_its_files_and_removes_a_stale_onnx(hub: FakeHub, run_dir: Path,
                                                                     tmp_path: Path) -> None:  # fmt: skip
    """An earlier push's model.onnx would be another model's: without --onnx it goes, in the same commit (the
    history keeps it); a file bit push never writes stays. The token is the one `hf auth login` stored."""
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    for name, data in {"model.onnx": b"old", "curves.png": b"old", "README.md": b"# old", "notes.txt": b"mine"}.items():
        (earlier / name).write_bytes(data)
    hub.add("alice/again", earlier, "6a" * 20)
    (tmp_path / "token").write_text(ALICE)  # what `hf auth login` stores in HF_HOME; HF_TOKEN is empty
    result = push(tmp_path, hub.url, run_dir, "alice/again", token="")
    assert result.returncode == 0, result.stderr
    files = hub.files("alice/again")
    assert set(files) == LISTED - {"model.onnx"} | {"notes.txt"}
    assert files["notes.txt"] == b"mine" and files["curves.png"] == (run_dir / "curves.png").read_bytes()
    assert hub.history("alice/again") == ["Upload again with bit push", ""]
    assert "removed model.onnx: an earlier push's, not part of this model (the history keeps them)" in result.stderr


def test_private_push_to_an_existing_public_repo_is_refused(hub: FakeHub, pushed, run_dir: Path,
                                                            tmp_path: Path) -> None:  # fmt: skip
    before = hub.history(REPO)
    error = one_error_line(push_here(tmp_path, hub.url, run_dir, REPO, "--private"))
    assert f"Error: {REPO} exists and is public; --private does not change an existing repo's visibility" in error
    assert hub.history(REPO) == before


# ----------------------------------------------------------------------------------------------------------
# Errors: one line with the fix, and nothing half-written


def test_no_token_and_offline_are_refused_before_any_request(hub: FakeHub, run_dir: Path, tmp_path: Path) -> None:
    error = one_error_line(push_here(tmp_path, hub.url, run_dir, REPO, token=""))
    assert "pushing needs a Hugging Face token with write access: set HF_TOKEN or run `hf auth login`" in error
    error = one_error_line(push_here(tmp_path, hub.url, run_dir, REPO, offline=True))
    assert error == "Error: pushing needs the network, and HF_HUB_OFFLINE=1 forbids it; unset HF_HUB_OFFLINE\n"
    assert hub.requests == []


def test_invalid_token_is_401_with_the_fix(hub: FakeHub, run_dir: Path, tmp_path: Path) -> None:
    error = one_error_line(push_here(tmp_path, hub.url, run_dir, "alice/new", token="hf_expired"))
    assert "Error: the Hub refused the token (401: Invalid credentials in Authorization header)" in error
    assert "set HF_TOKEN to a token with write access or run `hf auth login`" in error
    assert "alice/new" not in hub.repos


def test_someone_elses_repo_is_403_with_the_fix(hub: FakeHub, run_dir: Path, tmp_path: Path) -> None:
    before = hub.history("bob/taken")
    error = one_error_line(push_here(tmp_path, hub.url, run_dir, "bob/taken"))
    assert (
        "Error: no write access to bob/taken (403: You don't have write access to bob/taken): it belongs to " in error
    )
    assert "(this token is alice's)" in error and "push to a repo of your own" in error
    assert hub.history("bob/taken") == before


@pytest.mark.parametrize(
    ("kind", "failure", "expected"),
    [
        ("lfs-upload", 413, "Error: the Hub refused the upload as too large (413: "),
        ("commit", "drop", "Error: cannot reach the Hub at http://127.0.0.1:"),
    ],
    ids=["413-at-the-upload", "connection-lost-at-the-commit"],
)
def test_a_push_failing_midway_leaves_no_revision(hub: FakeHub, run_dir: Path, tmp_path: Path, kind, failure,
                                                 expected) -> None:  # fmt: skip
    repo = f"alice/midway-{kind}"
    hub.lfs.clear()  # the Hub skips uploading objects it holds: make it hold none (earlier tests pushed these)
    hub.fail_on[kind] = failure
    error = one_error_line(push_here(tmp_path, hub.url, run_dir, repo))
    assert error.startswith(expected) and "a push is one commit: the repo holds all of it or none of it" in error
    assert hub.history(repo) == ["initial commit"] and set(hub.files(repo)) == {GITATTRIBUTES}
    if failure == 413:  # the largest file is tens of KiB: said so, not as "0.0 MiB"
        size, name = max((p.stat().st_size, p.name) for p in run_dir.iterdir() if p.name in UNCHANGED)
        assert f"; the largest file is {name}, {human_size(size)}): " in error and human_size(size).endswith(" KiB")


def test_hub_out_of_reach(run_dir: Path, tmp_path: Path) -> None:
    endpoint = closed_port_url()
    error = one_error_line(push_here(tmp_path, endpoint, run_dir, REPO))
    assert error.startswith(f"Error: cannot reach the Hub at {endpoint} (")
    assert "check the network or HF_ENDPOINT" in error


def test_silent_hub_times_out(run_dir: Path, tmp_path: Path) -> None:
    """A Hub (or proxy) that accepts connections and never answers: huggingface_hub's requests have no timeout;
    bitcli's first one gives up after HF_HUB_DOWNLOAD_TIMEOUT seconds, before anything is created."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)  # the kernel completes the handshakes; nobody ever reads or replies
        endpoint = f"http://127.0.0.1:{listener.getsockname()[1]}"
        result = push_here(tmp_path, endpoint, run_dir, REPO, timeout=1)
    error = one_error_line(result)
    assert error.startswith(f"Error: the Hub at {endpoint} did not answer in time (ReadTimeout); check the network")


@pytest.mark.parametrize("kind", ["info", "create", "commit"])
def test_a_hub_gone_silent_at_any_request_times_out(hub: FakeHub, run_dir: Path, tmp_path: Path, kind: str) -> None:
    """The Hub answers until one request, then never answers it: that request too gives up after
    HF_HUB_DOWNLOAD_TIMEOUT seconds (1 here), whether huggingface_hub sends it with no timeout (create_repo,
    create_commit) or with timeout=None (repo_info); nothing is committed. (The requests huggingface_hub retries,
    preupload and the LFS uploads, are bounded the same way, 6 tries: too slow to test here.)"""
    repo = f"alice/silent-{kind}"
    hub.fail_on[kind] = "hang"
    start = time.monotonic()
    error = one_error_line(push_here(tmp_path, hub.url, run_dir, repo, timeout=1))
    assert time.monotonic() - start < 10
    assert error.startswith(f"Error: the Hub at {hub.url} did not answer in time (ReadTimeout); check the network")
    assert "(HF_HUB_DOWNLOAD_TIMEOUT sets the wait)" in error
    if kind == "commit":
        assert ("POST", f"/api/models/{repo}/commit/main") in hub.requests
        assert hub.history(repo) == ["initial commit"]
    else:
        assert repo not in hub.repos


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["noslash"], "noslash: name the Hub repo OWNER/NAME"),
        (["a/b/c"], "a/b/c: name the Hub repo OWNER/NAME"),
        (["/x"], "/x: name the Hub repo OWNER/NAME"),
        (["alice/-x"], "alice/-x: the name '-x' must not start with '-' or '.'"),
        ([".alice/x"], ".alice/x: the owner '.alice' must not start with '-' or '.'"),
        (["alice/x-"], "alice/x-: the name 'x-' must not end with '-' or '.'"),
        (["alice/a--b"], "alice/a--b: the name 'a--b' must not hold '--' or '..'"),
        (["alice/a..b"], "alice/a..b: the name 'a..b' must not hold '--' or '..'"),
        (["alice/x.git"], "alice/x.git: the name 'x.git' must not end with '.git'"),
        (
            ["alice/caf\u00e9"],
            "alice/caf\u00e9: the name 'caf\u00e9' may hold only letters, digits, '-', '_' and '.' (ASCII)",
        ),
        ([f"alice/{'x' * 97}"], f"alice/{'x' * 97}: the name '{'x' * 97}' is 97 characters long, over the Hub's 96"),
        (["alice/x", "--license", "Apache 2.0"], "--license 'Apache 2.0': a Hub license id in lower case"),
        (["alice/x", "--commit-message", " "], "--commit-message: give a message"),
        (["alice/x", "--commit-message", " \nthe body"], "--commit-message: the first line is the commit's summary"),
        *(
            (["alice/x", "--revision", name], f"--revision {name!r}: {rule}")
            for name, rule in [
                ("a..b", "a branch name cannot hold '..'"),
                ("-x", "a branch name cannot start with '-'"),
                ("x/", "a branch name cannot start or end with '/' or hold '//'"),
                ("/x", "a branch name cannot start or end with '/' or hold '//'"),
                ("x//y", "a branch name cannot start or end with '/' or hold '//'"),
                ("x.lock", "no part of a branch name can end with '.lock' ('x.lock')"),
                ("a/b.lock/c", "no part of a branch name can end with '.lock' ('b.lock')"),
                (".x", "no part of a branch name can start with '.' ('.x')"),
                ("a/.x", "no part of a branch name can start with '.' ('.x')"),
                ("x.", "a branch name cannot end with '.'"),
                ("HEAD", "HEAD is not a branch name"),
                ("@", "'@' alone is not a branch name"),
                ("a@{1}", "a branch name cannot hold '@{'"),
                ("a b", "a branch name cannot hold a space or control character"),
                ("a~1", "a branch name cannot hold '~'"),
                ("a:b", "a branch name cannot hold ':'"),
                ("a\\b", "a branch name cannot hold '\\\\'"),
                ("x" * 300, "a branch name of 300 characters is over 255"),
                ("refs/heads/try-1", "give the branch's name alone: --revision try-1"),
                ("refs/pr/3", "a pull request's ref: bit push commits to a branch, and opens no pull request"),
                ("refs/tags/v1", "a full ref, not a branch name"),
                ("0123456789abcdef0123456789abcdef01234567", "40 hex digits read as a commit id on the Hub"),
            ]
        ),
    ],
)
def test_bad_flags_exit_2(run_dir: Path, args: list[str], message: str) -> None:
    """Refused at flag-check time, with the rule broken (a branch name: `git check-ref-format --branch`'s
    rules, then the Hub's reading of it), before the source is read."""
    code, out, err = run_main("push", run_dir, *args)
    assert (code, out) == (2, "") and err.startswith(f"Error: {message}"), err
    assert err.count("\n") == 1


@pytest.mark.parametrize("name", ["try-1", "feature/lr-0.01", "v1.0", "a@b", "caf\u00e9", "HEADS", "refs", "x" * 255,
                                  "0123456789abcdef0123456789abcdef0123456"])  # fmt: skip
def test_branch_names_git_accepts_pass(name: str) -> None:
    assert PushOptions(src="run", repo="alice/x", revision=name).revision == name
