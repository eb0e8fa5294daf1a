"""transformers' folders (bitcli.formats.hf): class names from id2label, and transformers' placeholder names
(LABEL_0, LABEL_1, ...) replaced by the names a head of that size has (ImageNet-1k, -21k, else class_N)."""

from __future__ import annotations

import json

import pytest
from conftest import TINY_LABELS, save_hf_model

from bitcli.formats import hf
from bitcli.labels import imagenet21k_labels, imagenet_labels

TINY = dict(embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1], num_groups=8)


def test_id2label_names_are_kept(tiny_dir):
    assert hf.read(tiny_dir).labels == TINY_LABELS


@pytest.mark.parametrize(
    "num_labels, expected",
    [
        (10, [f"class_{i}" for i in range(10)]),
        (1000, imagenet_labels()),
        (21843, imagenet21k_labels()),
    ],
    ids=["10", "1000", "21843"],
)
def test_transformers_placeholder_names_become_the_defaults_for_any_head_size(tmp_path, num_labels, expected):
    folder = save_hf_model(tmp_path / "m", num_labels=num_labels, **TINY)
    id2label = json.loads((folder / "config.json").read_text())["id2label"]
    assert id2label["0"] == "LABEL_0" and len(id2label) == num_labels  # what transformers wrote
    ckpt = hf.read(folder)
    assert ckpt.labels == expected
    assert ckpt.labels[0] == {10: "class_0", 1000: "tench, Tinca tinca", 21843: "organism, being"}[num_labels]


def test_a_name_that_only_looks_like_a_placeholder_is_kept(tmp_path):
    names = ["LABEL_0", "cat", "dog"]
    folder = save_hf_model(
        tmp_path / "m", id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)}, **TINY
    )
    assert hf.read(folder).labels == names
