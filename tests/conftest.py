"""Shared fixtures: checkpoints the tests build themselves with the peers (transformers, timm), real photos
that scikit-image and scikit-learn ship, a pre-populated Hugging Face cache, and a runner for the real CLI.

The suite runs alone (`pytest tests/test_model.py`) or on several cores with pytest-xdist (.ci/run: `-n auto
--dist loadfile`, a whole file per worker, so a module's fixtures are built once). Each worker is a process with
its own session fixtures and tmp_path root; tests share nothing else: free ports (port 0), no fixed paths, the
caches a test writes ($BITCLI_CACHE, HF_HOME) under its tmp_path (BITCLI_CACHE in the session's own folder at
least: private_bitcli_cache), env changes through monkeypatch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

SKIMAGE_PHOTOS = ["chelsea.png", "astronaut.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "retina.jpg"]
SKLEARN_PHOTOS = ["china.jpg", "flower.jpg"]

# google/bit-50's preprocessor_config.json (the values that matter).
BIT50_PREPROCESSOR = {
    "do_resize": True,
    "size": {"shortest_edge": 448},
    "resample": 2,
    "do_center_crop": True,
    "crop_size": {"height": 448, "width": 448},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "do_convert_rgb": True,
}


def worker_threads(cores: int, workers: int) -> int:
    """Intra-op threads for one of `workers` pytest-xdist workers on `cores` cores: an even share, at least one."""
    return max(1, cores // workers)


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (`-n N`, what .ci/run passes), each worker takes an even share of the cores for torch,
    and so do the processes it starts (OMP_NUM_THREADS, MKL_NUM_THREADS), unless the caller chose a count: N
    workers each spinning as many OpenMP threads as there are cores are several times slower than N x 1."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if "PYTEST_XDIST_WORKER" not in os.environ or workers < 2:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = str(worker_threads(cores, workers))
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, threads)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session", autouse=True)
def private_bitcli_cache(tmp_path_factory):
    """$BITCLI_CACHE (published .npz files, bit audit's and --cache-features' embeddings) in this session's own
    folder for every test and the processes it starts: a test that does not name one must neither read entries
    another run or another xdist worker left in ~/.cache/bitcli nor leave its own there."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BITCLI_CACHE", str(tmp_path_factory.mktemp("bitcli-cache")))
        yield


def perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights with non-trivial norms and a non-zero head, so that any mismatch shows in the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 1:
                p.add_(0.1 * noise)
            else:
                p.copy_(0.05 * noise)


def save_hf_model(
    folder: Path, preprocessor: dict | None = None, seed: int = 0, head_scale: float = 1.0, **config
) -> Path:
    """head_scale > 1 spreads the logits the way a trained model's are spread (no near-ties in the top-k)."""
    import transformers

    cfg = transformers.BitConfig(**config)
    model = transformers.BitForImageClassification(cfg).eval()
    perturb(model, seed)
    if cfg.num_labels:
        with torch.no_grad():
            model.classifier[1].weight.mul_(head_scale)
    model.save_pretrained(folder)
    if preprocessor is not None:
        transformers.BitImageProcessorPil(**preprocessor).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> dict[str, Path]:
    """Real photographs (cat, astronaut, coffee, rocket, ...) copied out of the packages that ship them."""
    import skimage.data
    import sklearn.datasets

    out = tmp_path_factory.mktemp("photos")
    found = {}
    for name in SKIMAGE_PHOTOS:
        found[name] = Path(shutil.copy(Path(skimage.data.__file__).parent / name, out / name))
    for name in SKLEARN_PHOTOS:
        found[name] = Path(shutil.copy(Path(sklearn.datasets.__file__).parent / "images" / name, out / name))
    return found


@pytest.fixture()
def album(tmp_path, photos, monkeypatch) -> Path:
    """The working folder for a predict test, holding first.png (a cat) and last.jpg (a rocket)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "250")  # the table is as wide as the terminal: keep names unfolded
    shutil.copy(photos["chelsea.png"], tmp_path / "first.png")
    shutil.copy(photos["rocket.jpg"], tmp_path / "last.jpg")
    return tmp_path


@pytest.fixture(scope="session")
def bit50_dir(tmp_path_factory) -> Path:
    """A random-weight model in google/bit-50's exact layout, labels and preprocessing, saved by transformers."""
    from bitcli.labels import imagenet_labels

    labels = imagenet_labels()
    return save_hf_model(
        tmp_path_factory.mktemp("bit50") / "bit-50",
        BIT50_PREPROCESSOR,
        head_scale=20.0,
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )


TINY_LABELS = ["apple", "banana", "cherry", "date", "elderberry", "fig", "grape", "honeydew", "kiwi", "lemon"]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny BiT (two stages) with 10 named classes and 64-px preprocessing: fast CLI tests."""
    return save_hf_model(
        tmp_path_factory.mktemp("tiny") / "tiny",
        {**BIT50_PREPROCESSOR, "size": {"shortest_edge": 64}, "crop_size": {"height": 64, "width": 64}},
        embedding_size=16,
        hidden_sizes=[32, 64],
        depths=[1, 1],
        num_groups=8,
        id2label=dict(enumerate(TINY_LABELS)),
        label2id={n: i for i, n in enumerate(TINY_LABELS)},
    )


@pytest.fixture(scope="session")
def tiny_onnx(tiny_dir: Path, tmp_path_factory) -> Path:
    """tiny_dir exported by `bit convert` to ONNX (float32)."""
    path = tmp_path_factory.mktemp("tiny-onnx") / "tiny.onnx"
    code, _, err = run_main("convert", tiny_dir, path)
    assert code == 0, err
    return path


def write_folder(root: Path, counts: dict[str, int], size: int = 16, seed: int = 0) -> None:
    """Classes that a small network can tell apart: each has its own dominant colour channel."""
    rng = np.random.default_rng(seed)
    for c, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            array = rng.integers(0, 90, (size, size, 3), dtype=np.uint8)
            array[..., c % 3] += 120
            Image.fromarray(array).save(root / name / f"{i:03d}.png")


def populate_hf_cache(
    hub_cache: Path, repo_id: str, files_from: Path, commit: str, refs: tuple[str, ...] = ("main",)
) -> None:
    """Lay out a model the way huggingface_hub's cache does: blobs, snapshots/<commit>/ links, refs/<name>."""
    repo = hub_cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(sorted(p for p in files_from.iterdir() if p.is_file())):
        blob = repo / "blobs" / f"{commit[:8]}{i:04d}{f.name.encode().hex()[:24]}"
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)


def run_main(*args: object) -> tuple[int, str, str]:
    """The console-script entry point (`bitcli.cli:main`, what `bit` runs) in this process: (exit code, stdout,
    stderr). A fresh interpreter per call costs seconds; tests that need a real process use run_bit."""
    import contextlib
    import io

    from bitcli.cli import main

    out, err, argv = io.StringIO(), io.StringIO(), sys.argv
    sys.argv = ["bit", *map(str, args)]
    code: object = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as exc:
                code = exc.code
    finally:
        sys.argv = argv
    return (code if isinstance(code, int) else (0 if code is None else 1)), out.getvalue(), err.getvalue()


def run_bit(
    *args: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess (`python -m bitcli`), as a user runs it."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "bitcli", *map(str, args)],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=timeout,
    )


# ----------------------------------------------------------------------------------------------------------
# A real browser for the pages bitcli writes (Debian's chromium, driven by Playwright's Python package).

CHROMIUM = os.environ.get("BITCLI_CHROMIUM", "/usr/bin/chromium")
# Headless, and quiet on a machine without a network: no background requests, updates, sync or QUIC probes.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
]


@pytest.fixture(scope="session")
def browser():
    """One headless Chromium for the whole session (it starts in about a second). A missing chromium is a
    failure, not a skip: `.ci/run` installs Debian's package when it is absent."""
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"{CHROMIUM} not found: install Debian's chromium package (bash .ci/run does) or set BITCLI_CHROMIUM"
        )
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


class BrowserPage:
    """A fresh page that records every console error, uncaught exception and failed request, so that a test
    can assert a page loaded cleanly. `page` is Playwright's Page."""

    def __init__(self, browser) -> None:
        self.context = browser.new_context(viewport={"width": 1280, "height": 800})
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on(
            "console", lambda m: self.errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None
        )
        self.page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        self.page.on("requestfailed", lambda r: self.errors.append(f"request failed: {r.url} ({r.failure})"))

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def browser_page(browser):
    """A BrowserPage, closed after the test."""
    page = BrowserPage(browser)
    try:
        yield page
    finally:
        page.close()
