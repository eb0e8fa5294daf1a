"""transformers' folder layout (google/bit-50): config.json, model.safetensors or pytorch_model.bin, and
preprocessor_config.json."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import torch

from bitcli.config import BitConfig
from bitcli.errors import BitError
from bitcli.formats.checkpoint import (
    BIT_DEFAULT_PREPROCESS,
    WS_EPS_KEY,
    Checkpoint,
    check_tensors,
    checked_labels,
    stored_ws_eps,
)
from bitcli.formats.raw import folder_weights, read_json, write_safetensors
from bitcli.formats.tensors import Layout, renaming
from bitcli.preprocess import Preprocess
from bitcli.writes import atomic_folder

NAME = "hf"
_TO_BITCLI, _FROM_BITCLI = renaming(
    [
        (r"^bit\.embedder\.convolution\.", "stem.conv."),
        (r"^bit\.embedder\.norm\.", "stem.norm."),
        (r"^bit\.encoder\.stages\.(\d+)\.layers\.(\d+)\.", r"stages.\1.units.\2."),
        (r"^bit\.norm\.", "norm."),
        (r"^classifier\.1\.", "head."),
    ]
)
LAYOUT = Layout(
    "transformers' BiT layout (bit.embedder.*, bit.encoder.stages.N.layers.N.*, classifier.1.*)",
    source_key=_FROM_BITCLI,
    bitcli_key=_TO_BITCLI,
)
_PLACEHOLDER = re.compile(r"LABEL_\d+")  # what transformers names classes nobody named


def claims(config: dict[str, Any]) -> bool:
    """Whether a folder's config.json is a transformers BiT config."""
    return config.get("model_type") == "bit" or "BitForImageClassification" in config.get("architectures", [])


def read(folder: Path) -> Checkpoint:
    hf = read_json(folder / "config.json")
    refs = folder_weights(folder)
    head = refs.get("classifier.1.weight")
    num_classes = head.shape[0] if head is not None else 0
    try:
        config = BitConfig.from_hf(hf, num_classes)
    except BitError as exc:
        raise BitError(f"{folder / 'config.json'}: {exc}") from None
    config = dataclasses.replace(config, ws_eps=stored_ws_eps(hf, 1e-8, folder / "config.json"))
    pre_path = folder / "preprocessor_config.json"
    preprocess = Preprocess.from_hf(read_json(pre_path)) if pre_path.is_file() else BIT_DEFAULT_PREPROCESS
    tensors = LAYOUT.refs_to_bitcli(str(folder), refs)
    check_tensors(config, tensors, str(folder), LAYOUT)
    labels = checked_labels(_labels(hf, num_classes), num_classes, str(folder))
    return Checkpoint(config, labels, preprocess, tensors, str(folder), NAME, LAYOUT)


def _labels(hf: dict[str, Any], num_classes: int) -> list[str] | None:
    """id2label's names in class order; None (the defaults for the head's size) for none or placeholders."""
    id2label = hf.get("id2label") or {}
    if not id2label or len(id2label) != num_classes:
        return None
    labels = [str(id2label.get(str(i), id2label.get(i, f"class_{i}"))) for i in range(num_classes)]
    if all(_PLACEHOLDER.fullmatch(x) for x in labels):
        return None  # transformers' LABEL_0, LABEL_1, ...: ImageNet names for a 1k or 21k head, else class_N
    return labels


def write(ckpt: Checkpoint, folder: Path, dtype: torch.dtype | None = None) -> None:
    """transformers layout, through atomic_folder: a new folder appears complete or not at all, an existing one
    has its model files replaced (and must hold nothing else)."""
    hf = ckpt.config.to_hf()
    hf["id2label"] = {str(i): name for i, name in enumerate(ckpt.labels)}
    hf["label2id"] = {name: i for i, name in enumerate(ckpt.labels)}
    hf[WS_EPS_KEY] = ckpt.config.ws_eps  # transformers ignores it (its eps is fixed at 1e-8); bitcli reads it back
    if dtype is not None:
        hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    tensors = LAYOUT.refs_from_bitcli(ckpt.source, ckpt.tensors)

    def fill(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        (tmp / "preprocessor_config.json").write_text(json.dumps(ckpt.preprocess.to_hf(), indent=2) + "\n")
        write_safetensors(tmp / "model.safetensors", tensors, {"format": "pt"}, dtype)

    atomic_folder(folder, fill)
