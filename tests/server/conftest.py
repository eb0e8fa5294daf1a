"""Fixtures of the `bit serve` tests: the tiny model as an engine, a model whose labels are HTML, and small
images as bytes and as files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BIT50_PREPROCESSOR, save_hf_model
from PIL import Image

HOSTILE_LABELS = [
    '<img src=x onerror="window.__pwned=1">',
    "<script>window.__pwned=2</script>",
    "a & b",
    "plain",
    "[red]rich[/red]",
]


@pytest.fixture(scope="session")
def engine(tiny_dir):
    from bitcli.engine import load_engine
    from bitcli.hub import load_checkpoint

    return load_engine(load_checkpoint(str(tiny_dir)), torch.device("cpu"), torch.float32)


@pytest.fixture(scope="session")
def hostile_dir(tmp_path_factory) -> Path:
    """A tiny model with five classes named by HTML and markup: the page must show them as text."""
    return save_hf_model(
        tmp_path_factory.mktemp("hostile") / "hostile",
        {**BIT50_PREPROCESSOR, "size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}},
        head_scale=20.0, embedding_size=8, hidden_sizes=[16, 16], depths=[1, 1], num_groups=4,
        id2label=dict(enumerate(HOSTILE_LABELS)), label2id={n: i for i, n in enumerate(HOSTILE_LABELS)},
    )  # fmt: skip


def encode(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="session")
def pictures(tmp_path_factory) -> dict[str, Path]:
    """Small images of three sizes and formats, and a text file, as files (their bytes are what clients send)."""
    rng = np.random.default_rng(7)
    out = tmp_path_factory.mktemp("pictures")
    files = {
        "a.png": encode(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8), "PNG"),
        "b.jpg": encode(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "JPEG"),
        "c.png": encode(rng.integers(0, 256, (90, 30, 3), dtype=np.uint8), "PNG"),
        "notes.txt": b"not an image at all",
    }
    for name, data in files.items():
        (out / name).write_bytes(data)
    return {name: out / name for name in files}
