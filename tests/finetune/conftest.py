"""Fixtures of the fine-tuning tests: a small three-class data set with a validation split, one thread."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import write_folder


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_folder(root / "train", {"red": 12, "green": 12, "blue": 12})
    write_folder(root / "val", {"red": 4, "green": 4, "blue": 4}, seed=1)
    return root


@pytest.fixture(autouse=True)
def one_thread():
    """In-process runs use one intra-op thread: tiny models gain nothing from more, and on a shared 2-core
    machine two spinning OpenMP threads can be several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
