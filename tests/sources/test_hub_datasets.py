"""hf://datasets/OWNER/NAME: read from a pre-populated Hugging Face cache with HF_HUB_OFFLINE=1, and downloaded
from the loopback Hub of tests/fakehub.py (processes: huggingface_hub reads HF_ENDPOINT at import); `bit audit`
of a served data set names each finding by the rows the source gives."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_bit, run_main
from fakehub import FakeHub, git_blob_sha1
from finetune.helpers import FAST, PROCESS_ENV, read_weights
from PIL import Image

from .conftest import CLASSES, folder_rows, image_dataset, interleave

COMMIT = "5e" * 20
REPO = "org/colors"
ARGS = ["--steps", "4", "--batch-size", "8", "--eval-every", "0", *FAST]


class DatasetHub(FakeHub):
    """FakeHub serving data set repos: /api/datasets/... and /datasets/... are its model routes."""

    def handle(self, h, method: str) -> None:
        if h.path.startswith("/api/datasets/"):
            h.path = "/api/models/" + h.path.removeprefix("/api/datasets/")
        elif h.path.startswith("/datasets/"):
            h.path = h.path.removeprefix("/datasets")
        super().handle(h, method)


@pytest.fixture(scope="module")
def repo_files(sources: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The parquet shards as a Hub data set repo holds them (flat: train-*.parquet, validation-*.parquet)."""
    folder = tmp_path_factory.mktemp("colors")
    for shard in (sources["parquet"] / "data").iterdir():
        shutil.copy(shard, folder / shard.name)
    return folder


@pytest.fixture(scope="module")
def reference(sources: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The folder's run (in a process, as the Hub runs are) and `bit eval` of its validation split."""
    out = tmp_path_factory.mktemp("ref") / "run"
    run = bit(out.parent / "hf", "finetune", sources["folder"], "--output", out, *ARGS)
    assert run.returncode == 0, run.stderr
    code, stdout, err = run_main("eval", sources["folder"], "--model", out, "--format", "json")
    assert code == 0, err
    return out, json.loads(stdout)


def assert_same_evaluation(got: dict, want: dict) -> None:
    """`bit eval`'s JSON, equal to the reference's: exactly, but for the calibration figures (ece, nll and the
    reliability bins' mean scores), which are float64 sums of each image's score and show the last-bit
    differences of float32 logits computed with another thread count (the Hub runs are processes with
    OMP_NUM_THREADS=1); those agree to 1e-6."""
    got, want = json.loads(json.dumps(got)), json.loads(json.dumps(want))
    for key in ("ece", "nll"):
        assert got.pop(key) == pytest.approx(want.pop(key), rel=1e-6), key
    mine, theirs = got.pop("reliability"), want.pop("reliability")
    for a, b in zip(mine.pop("confidence"), theirs.pop("confidence"), strict=True):
        assert a == b if b is None else a == pytest.approx(b, rel=1e-6)
    assert (mine, got) == (theirs, want)


def populate_dataset_cache(hub_cache: Path, repo_id: str, files_from: Path, commit: str) -> None:
    """huggingface_hub's cache layout for a data set repo: blobs, snapshots/<commit>/ links, refs/main."""
    repo = hub_cache / ("datasets--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit / "data"
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in sorted(files_from.iterdir()):
        blob = repo / "blobs" / git_blob_sha1(f.read_bytes())
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def bit(home: Path, *args: object, endpoint: str = "http://127.0.0.1:9", offline: bool = True):
    env = {**PROCESS_ENV, "HF_HOME": str(home), "HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "1" if offline else "0",
           "HF_HUB_DISABLE_TELEMETRY": "1"}  # fmt: skip
    return run_bit(*map(str, args), env=env)


def test_cached_dataset_offline_trains_and_evaluates_as_the_folder(
    repo_files, reference, sources, tmp_path: Path
) -> None:
    populate_dataset_cache(tmp_path / "hf" / "hub", REPO, repo_files, COMMIT)
    run = bit(tmp_path / "hf", "finetune", f"hf://datasets/{REPO}", "--output", tmp_path / "run", *ARGS)
    assert run.returncode == 0, run.stderr
    assert f"train       24 images from hf://datasets/{REPO}:train" in run.stderr
    a, b = read_weights(reference[0] / "model.safetensors"), read_weights(tmp_path / "run" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    result = bit(tmp_path / "hf", "eval", f"hf://datasets/{REPO}:validation", "--model", reference[0], "--format",
                 "json", "--report", tmp_path / "report")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert_same_evaluation(json.loads(result.stdout), reference[1])
    # --report: the folder's report, each image named by its row
    code, _, err = run_main("eval", sources["folder"], "--model", reference[0], "--report", tmp_path / "folder")
    assert code == 0, err
    ours, theirs = (
        list(csv.DictReader(open(r / "predictions.csv", encoding="utf-8")))
        for r in (tmp_path / "report", tmp_path / "folder")
    )
    # predictions.csv is in the data set's row order (the classes interleaved), the folder's grouped by class
    by_path = {r["path"]: r for r in theirs}
    listed = [by_path[str(sources["folder"].parent / p)] for p, _ in interleave(folder_rows(sources["folder"].parent,
                                                                                            "val"))]  # fmt: skip
    assert [{k: v for k, v in r.items() if k != "path"} for r in ours] == [
        {k: v for k, v in r.items() if k != "path"} for r in listed
    ]
    assert [r["path"].rpartition(" row ")[2] for r in ours] == [str(i) for i in range(len(listed))]
    assert ours[0]["path"].endswith("validation-00000-of-00001.parquet row 0")


def test_uncached_dataset_offline_is_one_line_with_the_fix(tmp_path: Path) -> None:
    result = bit(tmp_path / "hf", "eval", "hf://datasets/org/nope@v2", "--model", "x")
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("Error: dataset 'org/nope@v2' is not in the Hugging Face cache (")
    assert (
        "HF_HUB_OFFLINE=1 forbids downloading; run `hf download --repo-type dataset org/nope` on a connected machine"
        in result.stderr
    )


@pytest.fixture(scope="module")
def hub(repo_files):
    server = DatasetHub()
    server.add(REPO, repo_files, COMMIT)
    server.thread.start()
    yield server
    server.server.shutdown()
    server.server.server_close()


def test_loopback_hub_downloads_only_the_split_evaluated_then_works_offline(hub, reference, tmp_path: Path) -> None:
    home = tmp_path / "hf"
    result = bit(home, "eval", f"hf://datasets/{REPO}:validation", "--model", reference[0], "--format", "json",
                 endpoint=hub.url, offline=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert_same_evaluation(json.loads(result.stdout), reference[1])
    fetched = {
        path.rsplit("/", 1)[-1] for method, path in hub.model_requests() if method == "GET" and "/resolve/" in path
    }
    assert fetched == {"validation-00000-of-00001.parquet"}  # not the training shards
    snapshot = home / "hub" / "datasets--org--colors" / "snapshots" / COMMIT
    assert sorted(p.name for p in snapshot.iterdir()) == ["validation-00000-of-00001.parquet"]

    hub.reset()
    again = bit(home, "eval", f"hf://datasets/{REPO}:validation", "--model", reference[0], "--format", "json")
    assert again.returncode == 0, again.stderr
    assert_same_evaluation(json.loads(again.stdout), reference[1])
    assert hub.requests == []
    missing = bit(home, "eval", f"hf://datasets/{REPO}:test", "--model", reference[0])
    assert (
        missing.returncode == 1
        and "split 'test' of dataset 'org/colors' is not in the Hugging Face cache" in missing.stderr
    )


def test_loopback_hub_unknown_dataset_and_split(hub, reference, tmp_path: Path) -> None:
    result = bit(tmp_path, "eval", "hf://datasets/org/nope", "--model", reference[0], endpoint=hub.url, offline=False)
    assert (
        result.returncode == 1
        and result.stderr
        == "Error: no Hub dataset 'org/nope' (check the spelling; private repos need `hf auth login`)\n"
    )
    result = bit(
        tmp_path, "eval", f"hf://datasets/{REPO}:extra", "--model", reference[0], endpoint=hub.url, offline=False
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr == f"Error: hf://datasets/{REPO}: has no split 'extra' (splits: train, validation)\n"


LEAKY = "org/leaky"


@pytest.fixture(scope="module")
def leaky_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hub data set repo (flat parquet shards) of distinct pictures (test_audit's: the tiny random-weight
    model's copies are >= 0.9997 similar, its distinct images <= 0.993), 8 a class in train and 3 in
    validation, with two planted findings: train row 24 is train row 3's picture re-saved as another PNG (an
    exact duplicate: same pixels, other bytes), and validation row 9 is train row 7's file (a leak); both keep
    their original's label."""
    from test_audit import pattern

    folder = tmp_path_factory.mktemp("leaky")
    rows: dict[str, list[tuple[str, str]]] = {"train": [], "validation": []}
    for split, per_class, seed in (("train", 8, 0), ("validation", 3, 5000)):
        for c, name in enumerate(CLASSES):
            for i in range(per_class):
                path = f"{split}-{name}-{i}.png"
                pattern(seed + 100 * c + i, c).save(folder / path)
                rows[split].append((path, name))
    train, val = interleave(rows["train"]), interleave(rows["validation"])
    Image.open(folder / train[3][0]).save(folder / "resaved.png", compress_level=1)
    assert (folder / "resaved.png").read_bytes() != (folder / train[3][0]).read_bytes()
    image_dataset(folder, [*train, ("resaved.png", train[3][1])]).to_parquet(folder / "train-00000-of-00001.parquet")
    image_dataset(folder, [*val, train[7]]).to_parquet(folder / "validation-00000-of-00001.parquet")
    for png in folder.glob("*.png"):
        png.unlink()
    return folder


def test_audit_of_a_hub_dataset_finds_the_planted_duplicate_and_leak(leaky_files, tiny_dir, tmp_path: Path) -> None:
    with DatasetHub() as server:
        server.add(LEAKY, leaky_files, COMMIT)
        env = {**PROCESS_ENV, "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": server.url, "HF_HUB_OFFLINE": "0",
               "HF_HUB_DISABLE_TELEMETRY": "1", "BITCLI_CACHE": str(tmp_path / "cache")}  # fmt: skip
        result = run_bit("audit", f"hf://datasets/{LEAKY}", "--model", str(tiny_dir), "--output", str(tmp_path / "out"),
                         "--threshold", "0.999", "--workers", "0", env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "audit.json").read_text())
    train = f"hf://datasets/{LEAKY}/train-00000-of-00001.parquet"
    validation = f"hf://datasets/{LEAKY}/validation-00000-of-00001.parquet"
    assert [(d["a"], d["b"], d["split_a"], d["split_b"], d["exact"], d["leak"]) for d in report["duplicates"]] == [
        (f"{train} row 3", f"{train} row 24", "train", "train", True, False),
        (f"{train} row 7", f"{validation} row 9", "train", "validation", True, True),
    ]
    assert {k: report["counts"][k] for k in ("duplicates", "exact", "near", "leaks", "conflicts", "undecodable")} == {
        "duplicates": 2, "exact": 2, "near": 0, "leaks": 1, "conflicts": 0, "undecodable": 0,
    }  # fmt: skip
    splits = report["inventory"]["splits"]
    assert {name: s["images"] for name, s in splits.items()} == {"train": 25, "validation": 10}
    with open(tmp_path / "out" / "duplicates.csv", encoding="utf-8") as f:
        assert [(r["a"], r["b"]) for r in csv.DictReader(f)] == [
            (f"{train} row 3", f"{train} row 24"), (f"{train} row 7", f"{validation} row 9"),
        ]  # fmt: skip
