"""Hub repo ids downloaded for real: a loopback HTTP server (tests/fakehub.py) plays the Hugging Face Hub for
huggingface_hub.

`bit predict --model org/name` first asks for the repo's info itself, with a timeout, then runs
`huggingface_hub.snapshot_download` (see bitcli.hub.hub_snapshot): the requests fakehub.py lists under
"Downloads". FakeHub answers them from folders on disk and records every request, so the tests can say which
files were fetched, and how often a failing Hub was asked, not just that the CLI printed something.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import timm
import torch
from conftest import perturb, run_bit
from fakehub import FakeHub, closed_port_url, etag_of

COMMIT_MAIN = "1a" * 20  # 40 hex digits: huggingface_hub treats such a revision as a commit hash
COMMIT_V1 = "2b" * 20
COMMIT_BIN = "3c" * 20
COMMIT_TIMM = "4d" * 20

REPO = "org/bit-tiny"  # main: safetensors *and* pytorch_model.bin; tag v1: upper-case labels
BIN_REPO = "org/bit-tiny-bin"  # pytorch_model.bin only
TIMM_REPO = "org/timm-r50"  # timm layout: config.json with "architecture", model.safetensors, no preprocessor

# ----------------------------------------------------------------------------------------------------------
# Fixtures


def copy_folder(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.name not in skip:
            shutil.copy(f, dst / f.name)
    return dst


@pytest.fixture(scope="module")
def hub(tmp_path_factory, tiny_dir):
    root = tmp_path_factory.mktemp("fakehub")
    from safetensors.torch import load_file

    # transformers' own key names, pickled: what older Hub repos hold instead of (or beside) safetensors.
    state = load_file(tiny_dir / "model.safetensors")
    main = copy_folder(tiny_dir, root / "bit-tiny-main")
    torch.save(state, main / "pytorch_model.bin")
    (main / "README.md").write_text("# bit-tiny\n")

    v1 = copy_folder(tiny_dir, root / "bit-tiny-v1")
    config = json.loads((tiny_dir / "config.json").read_text())
    config["id2label"] = {k: v.upper() for k, v in config["id2label"].items()}
    config["label2id"] = {v: int(k) for k, v in config["id2label"].items()}
    (v1 / "config.json").write_text(json.dumps(config))

    bin_only = copy_folder(tiny_dir, root / "bit-tiny-bin", skip=("model.safetensors",))
    torch.save(state, bin_only / "pytorch_model.bin")

    from timm.models._hub import save_for_hf

    model = timm.create_model(
        "resnetv2_50x1_bit", num_classes=10, pretrained_cfg_overlay=dict(input_size=(3, 64, 64), crop_pct=1.0)
    )
    perturb(model)
    timm_dir = root / "timm-r50"
    save_for_hf(model, timm_dir, safe_serialization=True)
    assert sorted(p.name for p in timm_dir.iterdir()) == ["config.json", "model.safetensors"]

    server = FakeHub()
    server.add(REPO, main, COMMIT_MAIN)
    server.add(REPO, v1, COMMIT_V1, refs=("v1",))
    server.add(BIN_REPO, bin_only, COMMIT_BIN)
    server.add(TIMM_REPO, timm_dir, COMMIT_TIMM)
    server.thread.start()
    yield server
    server.server.shutdown()
    server.server.server_close()


@pytest.fixture(autouse=True)
def _fresh_log(request):
    """Each test starts with an empty request log and a Hub that answers (tests may set fail_with)."""
    if "hub" in request.fixturenames:
        request.getfixturevalue("hub").reset()


def env_for(home: Path, endpoint: str, offline: bool = False) -> dict[str, str]:
    return {"HF_HOME": str(home), "HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "1" if offline else "0"}


def predict(home: Path, endpoint: str, image: Path, model: str, *flags: str, offline: bool = False):
    return run_bit("predict", image, "--model", model, "--format", "json", *flags, env=env_for(home, endpoint, offline))


def predictions(result) -> list[dict]:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)[0]["predictions"]


def repo_cache(home: Path, repo_id: str) -> Path:
    return home / "hub" / ("models--" + repo_id.replace("/", "--"))


def snapshot_files(home: Path, repo_id: str, commit: str) -> dict[str, str]:
    """{file name: name of the blob it links to} for one cached snapshot."""
    snap = repo_cache(home, repo_id) / "snapshots" / commit
    return {p.name: Path(os.readlink(p)).name for p in sorted(snap.iterdir())}


def repo_info(repo_id: str, rev: str = "main") -> list[tuple[str, str]]:
    """What every online run asks first: bitcli's repo-info call (it has a timeout, see
    test_silent_hub_times_out_to_the_cache), then snapshot_download's own."""
    return [("GET", f"/api/models/{repo_id}/revision/{rev}")] * 2


@pytest.fixture(scope="module")
def local_preds(tiny_dir, photos) -> list[dict]:
    """What the tiny model predicts from its local folder: the reference for every download."""
    return predictions(run_bit("predict", photos["chelsea.png"], "--model", tiny_dir, "--format", "json"))


@pytest.fixture(scope="module")
def downloaded(hub, tmp_path_factory, photos):
    """REPO downloaded once into an empty HF_HOME: (HF_HOME, the run, the requests it made)."""
    home = tmp_path_factory.mktemp("hf_home_downloaded")
    hub.reset()
    result = predict(home, hub.url, photos["chelsea.png"], REPO)
    requests = hub.model_requests()
    hub.reset()  # the test that first asks for this fixture starts with an empty log too
    return home, result, requests


# ----------------------------------------------------------------------------------------------------------
# 1. First use downloads exactly what is needed; later runs use the cache


def test_first_use_downloads_config_preprocessor_and_safetensors_only(downloaded, hub, local_preds):
    home, result, requests = downloaded
    assert predictions(result) == local_preds

    resolve = f"/{REPO}/resolve/{COMMIT_MAIN}"
    needed = ["config.json", "model.safetensors", "preprocessor_config.json"]
    assert sorted(requests) == sorted(
        [
            *repo_info(REPO),
            ("GET", f"/api/models/{REPO}/tree/{COMMIT_MAIN}?recursive=true&expand=false"),
            *[("HEAD", f"{resolve}/{name}") for name in needed],
            *[("GET", f"{resolve}/{name}") for name in needed],
        ]
    )  # one listing; no request at all for pytorch_model.bin or README.md

    main = hub.repos[REPO]["commits"][COMMIT_MAIN]
    assert snapshot_files(home, REPO, COMMIT_MAIN) == {name: etag_of(main / name) for name in needed}
    cache = repo_cache(home, REPO)
    assert sorted(p.name for p in (cache / "blobs").iterdir()) == sorted(etag_of(main / name) for name in needed)
    for name in needed:  # the blobs are the served bytes
        assert (cache / "snapshots" / COMMIT_MAIN / name).read_bytes() == (main / name).read_bytes()
    assert (cache / "refs" / "main").read_text() == COMMIT_MAIN


def test_cached_repo_works_offline_without_any_request(downloaded, hub, photos, local_preds):
    home = downloaded[0]
    assert predictions(predict(home, hub.url, photos["chelsea.png"], REPO, offline=True)) == local_preds
    assert hub.requests == []


def test_cached_repo_online_only_resolves_the_branch(downloaded, hub, photos, local_preds):
    """Online again: one repo-info call (main may have moved); the listing and the files come from the cache."""
    home = downloaded[0]
    assert predictions(predict(home, hub.url, photos["chelsea.png"], REPO)) == local_preds
    assert hub.model_requests() == repo_info(REPO)


# ----------------------------------------------------------------------------------------------------------
# 2. A repo with pytorch_model.bin only


def test_bin_only_repo_downloads_pytorch_model_bin(hub, tmp_path, photos, local_preds):
    result = predict(tmp_path, hub.url, photos["chelsea.png"], BIN_REPO)
    assert predictions(result) == local_preds

    resolve = f"/{BIN_REPO}/resolve/{COMMIT_BIN}"
    first = ["config.json", "preprocessor_config.json"]
    assert sorted(hub.model_requests()) == sorted(
        [
            *repo_info(BIN_REPO),  # the first snapshot_download: safetensors & co
            ("GET", f"/api/models/{BIN_REPO}/tree/{COMMIT_BIN}?recursive=true&expand=false"),
            *[(method, f"{resolve}/{name}") for name in first for method in ("HEAD", "GET")],
            ("GET", f"/api/models/{BIN_REPO}/revision/main"),  # the second: the listing is cached, no tree call
            *[(method, f"{resolve}/pytorch_model.bin") for method in ("HEAD", "GET")],
        ]
    )
    bin_only = hub.repos[BIN_REPO]["commits"][COMMIT_BIN]
    assert snapshot_files(tmp_path, BIN_REPO, COMMIT_BIN) == {
        name: etag_of(bin_only / name) for name in ["config.json", "preprocessor_config.json", "pytorch_model.bin"]
    }

    hub.reset()
    assert predictions(predict(tmp_path, hub.url, photos["chelsea.png"], BIN_REPO, offline=True)) == local_preds
    assert hub.requests == []


# ----------------------------------------------------------------------------------------------------------
# 3. Repos and revisions the Hub does not have


@pytest.mark.parametrize(
    "model, flags, message, offline_message",
    [
        ("org/nope", [], "no Hub repo 'org/nope'", "'org/nope' is not in the Hugging Face cache"),
        (
            REPO,
            ["--revision", "v2"],
            "Hub repo 'org/bit-tiny' has no revision 'v2'",
            "'org/bit-tiny@v2' is not in the Hugging Face cache",
        ),
    ],
    ids=["unknown repo", "unknown revision"],
)
def test_unknown_repo_or_revision_is_one_line_and_leaves_no_cache(
    hub, tmp_path, photos, model, flags, message, offline_message
):
    result = predict(tmp_path, hub.url, photos["chelsea.png"], model, *flags)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    rev = flags[1] if flags else "main"
    assert hub.model_requests() == repo_info(model, rev)  # a 404 is not retried

    cache = repo_cache(tmp_path, model)  # nothing that an offline run could take for a cached snapshot
    assert not (cache / "refs").exists() and not (cache / "snapshots").exists()

    hub.reset()
    again = predict(tmp_path, hub.url, photos["chelsea.png"], model, *flags, offline=True)
    assert again.returncode == 1 and offline_message in again.stderr and "HF_HUB_OFFLINE=1" in again.stderr
    assert hub.requests == []


# ----------------------------------------------------------------------------------------------------------
# 4. The Hub failing: a cached repo still works, quickly


def test_hub_answering_503_falls_back_to_the_cache_at_once(downloaded, hub, photos, local_preds):
    home = downloaded[0]
    hub.fail_with = 503
    result = predict(home, hub.url, photos["chelsea.png"], REPO)
    assert predictions(result) == local_preds
    # Repo info (bitcli's and snapshot_download's) and straight to the cache: no backoff (which would retry a 503 5 times over ~23 s),
    # no per-file HEADs (the old per-file hf_hub_download code made ~18 tries over ~75 s).
    assert hub.model_requests() == repo_info(REPO)
    assert len(hub.requests) <= 3


def test_uncached_repo_with_the_hub_down_is_one_clear_line(hub, tmp_path, photos):
    hub.fail_with = 503
    result = predict(tmp_path, hub.url, photos["chelsea.png"], REPO)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.count("\n") == 1, result.stderr
    assert f"model '{REPO}' is not in the Hugging Face cache" in result.stderr
    assert "the Hub cannot be reached" in result.stderr and f"hf download {REPO}" in result.stderr
    assert hub.model_requests() == repo_info(REPO)
    assert len(hub.requests) <= 3


def interrupt_first_download(hub: FakeHub, home: Path, image: Path) -> None:
    """The weights' download fails: config.json, preprocessor_config.json and the listing (which says the repo
    has model.safetensors) are cached, the weights are not."""
    hub.break_downloads.add("model.safetensors")
    first = predict(home, hub.url, image, REPO)
    assert (first.returncode, first.stdout) == (1, "")
    assert first.stderr.count("\n") == 1, first.stderr  # no progress bars when stderr is not a terminal
    assert f"cannot download '{REPO}' from the Hub: Server error '500" in first.stderr
    assert not (repo_cache(home, REPO) / "snapshots" / COMMIT_MAIN / "model.safetensors").exists()
    hub.reset()


def test_interrupted_download_completes_when_the_hub_is_back(hub, tmp_path, photos, local_preds):
    interrupt_first_download(hub, tmp_path, photos["chelsea.png"])
    offline = predict(tmp_path, hub.url, photos["chelsea.png"], REPO, offline=True)
    assert offline.returncode == 1 and offline.stderr.count("\n") == 1, offline.stderr

    assert predictions(predict(tmp_path, hub.url, photos["chelsea.png"], REPO)) == local_preds
    resolve = f"/{REPO}/resolve/{COMMIT_MAIN}"
    assert hub.model_requests() == [  # the listing and the two small files come from the cache
        *repo_info(REPO),
        ("HEAD", f"{resolve}/model.safetensors"),
        ("GET", f"{resolve}/model.safetensors"),
    ]


def test_interrupted_download_with_the_hub_down_says_the_cache_is_incomplete(hub, tmp_path, photos):
    """With the Hub out of reach, the error must not claim the repo has no weights: the cached listing says it
    has model.safetensors; it just never reached the cache."""
    interrupt_first_download(hub, tmp_path, photos["chelsea.png"])
    for endpoint, offline in [(closed_port_url(), False), (hub.url, True)]:
        result = predict(tmp_path, endpoint, photos["chelsea.png"], REPO, offline=offline)
        assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
        assert "has no model.safetensors or pytorch_model.bin" not in result.stderr, result.stderr
        assert "model.safetensors" in result.stderr and f"hf download {REPO}" in result.stderr


def test_hub_unreachable_falls_back_to_the_cache(downloaded, hub, photos, local_preds):
    home = downloaded[0]
    assert predictions(predict(home, closed_port_url(), photos["chelsea.png"], REPO)) == local_preds


def test_silent_hub_times_out_to_the_cache(downloaded, photos, local_preds):
    """A Hub (or proxy) that accepts connections and never answers: snapshot_download's own request has no
    timeout and would wait forever; bitcli's repo-info call gives up after HF_HUB_ETAG_TIMEOUT seconds."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)  # the kernel completes the handshakes; nobody ever reads or replies
        env = {**env_for(downloaded[0], f"http://127.0.0.1:{listener.getsockname()[1]}"),
               "HF_HUB_ETAG_TIMEOUT": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}  # fmt: skip
        result = run_bit("predict", photos["chelsea.png"], "--model", REPO, "--format", "json", env=env, timeout=120)
    assert predictions(result) == local_preds


def test_timm_repo_downloaded_then_used_with_the_hub_down(hub, tmp_path, photos):
    """No preprocessor_config.json in the repo: it is neither asked for, nor missed later when the Hub is down."""
    first = predict(tmp_path, hub.url, photos["rocket.jpg"], TIMM_REPO, "--top-k", "3")
    preds = predictions(first)
    assert [p["label"] for p in preds] == [f"class_{p['index']}" for p in preds]
    resolve = f"/{TIMM_REPO}/resolve/{COMMIT_TIMM}"
    assert sorted(hub.model_requests()) == sorted(
        [
            *repo_info(TIMM_REPO),
            ("GET", f"/api/models/{TIMM_REPO}/tree/{COMMIT_TIMM}?recursive=true&expand=false"),
            *[
                (method, f"{resolve}/{name}")
                for name in ["config.json", "model.safetensors"]
                for method in ("HEAD", "GET")
            ],
        ]
    )
    assert sorted(snapshot_files(tmp_path, TIMM_REPO, COMMIT_TIMM)) == ["config.json", "model.safetensors"]

    hub.reset()
    hub.fail_with = 503
    assert predictions(predict(tmp_path, hub.url, photos["rocket.jpg"], TIMM_REPO, "--top-k", "3")) == preds
    assert hub.model_requests() == repo_info(TIMM_REPO)
    assert len(hub.requests) <= 3
    assert predictions(predict(tmp_path, closed_port_url(), photos["rocket.jpg"], TIMM_REPO, "--top-k", "3")) == preds


# ----------------------------------------------------------------------------------------------------------
# 5. --revision with a tag


def test_revision_tag_downloads_that_commit(hub, tmp_path, photos, local_preds):
    result = predict(tmp_path, hub.url, photos["chelsea.png"], REPO, "--revision", "v1")
    tagged = predictions(result)
    assert tagged == [{**p, "label": p["label"].upper()} for p in local_preds]

    assert ("GET", f"/api/models/{REPO}/revision/v1") in hub.requests
    assert all(f"/{COMMIT_MAIN}" not in path for _, path in hub.requests)  # main's files are never asked for
    assert ("GET", f"/{REPO}/resolve/{COMMIT_V1}/config.json") in hub.requests
    cache = repo_cache(tmp_path, REPO)
    assert (cache / "refs" / "v1").read_text() == COMMIT_V1 and not (cache / "refs" / "main").exists()
    v1 = hub.repos[REPO]["commits"][COMMIT_V1]
    assert snapshot_files(tmp_path, REPO, COMMIT_V1) == {
        name: etag_of(v1 / name) for name in ["config.json", "model.safetensors", "preprocessor_config.json"]
    }
