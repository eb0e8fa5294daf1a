"""transformers' folder layout (google/bit-50): config.json (its BitConfig), model.safetensors or
pytorch_model.bin, and preprocessor_config.json (its BitImageProcessor), to and from bitcli's BitConfig and
Preprocess."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, cast

import torch

from bitcli.config import BASE_WIDTHS, BitConfig, Padding, make_div
from bitcli.errors import BitError
from bitcli.formats.checkpoint import (
    BIT_DEFAULT_PREPROCESS,
    MULTI_LABEL_PROBLEM,
    TEMPERATURE_KEY,
    THRESHOLDS_KEY,
    WS_EPS_KEY,
    Checkpoint,
    check_tensors,
    checked_labels,
    stored_temperature,
    stored_thresholds,
    stored_ws_eps,
    temperature_record,
    thresholds_record,
)
from bitcli.formats.raw import folder_weights, read_json, write_safetensors
from bitcli.formats.tensors import Layout, renaming
from bitcli.preprocess import PIL_FILTERS, Preprocess
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
# preprocessor_config.json key for torchvision's centre-crop rounding (a timm model's), which transformers'
# BitImageProcessor cannot express: transformers ignores it and floors, bit reads it back.
HF_ROUNDING_KEY = "bitcli_crop_rounding"
_PIL_CODES = {int(v): k for k, v in PIL_FILTERS.items()}  # transformers stores PIL's resampling enum values


def claims(config: dict[str, Any]) -> bool:
    """Whether a folder's config.json is a transformers BiT config."""
    return config.get("model_type") == "bit" or "BitForImageClassification" in config.get("architectures", [])


def read(folder: Path) -> Checkpoint:
    hf = read_json(folder / "config.json")
    refs = folder_weights(folder)
    head = refs.get("classifier.1.weight")
    num_classes = head.shape[0] if head is not None else 0
    try:
        config = config_from_hf(hf, num_classes)
    except BitError as exc:
        raise BitError(f"{folder / 'config.json'}: {exc}") from None
    config = dataclasses.replace(config, ws_eps=stored_ws_eps(hf, 1e-8, folder / "config.json"))
    pre_path = folder / "preprocessor_config.json"
    preprocess = preprocess_from_hf(read_json(pre_path)) if os.path.lexists(pre_path) else BIT_DEFAULT_PREPROCESS
    tensors = LAYOUT.refs_to_bitcli(str(folder), refs)
    check_tensors(config, tensors, str(folder), LAYOUT)
    labels = checked_labels(_labels(hf, num_classes), num_classes, str(folder))
    return Checkpoint(
        config=config,
        labels=labels,
        preprocess=preprocess,
        tensors=tensors,
        source=str(folder),
        format=NAME,
        layout=LAYOUT,
        temperature=stored_temperature(hf.get(TEMPERATURE_KEY), folder / "config.json"),
        thresholds=_thresholds(hf, num_classes, folder / "config.json"),
    )


def _thresholds(hf: dict[str, Any], num_classes: int, source: Path) -> list[float] | None:
    """bitcli's thresholds; a folder that transformers marks multi-label without them: 0.5 for every class."""
    stored = stored_thresholds(hf.get(THRESHOLDS_KEY), num_classes, source)
    if stored is None and hf.get("problem_type") == MULTI_LABEL_PROBLEM and num_classes:
        return [0.5] * num_classes
    return stored


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
    hf = config_to_hf(ckpt.config)
    hf["id2label"] = {str(i): name for i, name in enumerate(ckpt.labels)}
    hf["label2id"] = {name: i for i, name in enumerate(ckpt.labels)}
    hf[WS_EPS_KEY] = ckpt.config.ws_eps  # transformers ignores it (its eps is fixed at 1e-8); bitcli reads it back
    hf.update(temperature_record(ckpt))  # transformers ignores it too: its softmax stays at temperature 1
    if ckpt.multi_label:  # transformers' marker (its loss: BCE on the logits), and bitcli's thresholds
        hf["problem_type"] = MULTI_LABEL_PROBLEM
        hf.update(thresholds_record(ckpt))
    if dtype is not None:
        hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    tensors = LAYOUT.refs_from_bitcli(ckpt.source, ckpt.tensors)

    def fill(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        (tmp / "preprocessor_config.json").write_text(json.dumps(preprocess_to_hf(ckpt.preprocess), indent=2) + "\n")
        write_safetensors(tmp / "model.safetensors", tensors, {"format": "pt"}, dtype)

    atomic_folder(folder, fill)


# transformers' BitConfig --------------------------------------------------------------------------------


def config_from_hf(hf: dict[str, Any], num_classes: int) -> BitConfig:
    """A transformers config.json (defaults are transformers' BitConfig's) as bitcli's BitConfig."""
    if hf.get("model_type", "bit") != "bit":
        raise BitError(f"config.json describes a {hf.get('model_type')!r} model, not BiT ('bit')")
    if hf.get("hidden_act", "relu") != "relu":
        raise BitError(f"config.json: hidden_act {hf['hidden_act']!r} is not supported (only relu)")
    width = int(hf.get("width_factor", 1))
    padding = hf.get("global_padding")
    return BitConfig(
        depths=tuple(hf.get("depths", (3, 4, 6, 3))),
        hidden_sizes=tuple(make_div(h * width) for h in hf.get("hidden_sizes", BASE_WIDTHS)),
        embedding_size=int(hf.get("embedding_size", 64)),
        num_classes=num_classes,
        layer_type=hf.get("layer_type", "preactivation"),
        global_padding=cast(Padding, padding.upper()) if isinstance(padding, str) else None,  # BitConfig checks it
        embedding_dynamic_padding=bool(hf.get("embedding_dynamic_padding", False)),
        num_groups=int(hf.get("num_groups", 32)),
        output_stride=int(hf.get("output_stride", 32)),
        in_channels=int(hf.get("num_channels", 3)),
    )


def config_to_hf(cfg: BitConfig) -> dict[str, Any]:
    """transformers' config.json for `cfg` (widths pre-multiplied: its width_factor > 1 does not work)."""
    return {
        "model_type": "bit",
        "architectures": ["BitForImageClassification"],
        "num_channels": cfg.in_channels,
        "embedding_size": cfg.embedding_size,
        "hidden_sizes": list(cfg.hidden_sizes),
        "depths": list(cfg.depths),
        "layer_type": cfg.layer_type,
        "hidden_act": "relu",
        "global_padding": cfg.global_padding,
        "num_groups": cfg.num_groups,
        "drop_path_rate": 0.0,
        "embedding_dynamic_padding": cfg.embedding_dynamic_padding,
        "output_stride": cfg.output_stride,
        "width_factor": 1,
    }


# transformers' BitImageProcessor (preprocessor_config.json) ------------------------------------------------


def preprocess_from_hf(p: dict[str, Any]) -> Preprocess:
    """A transformers preprocessor_config.json (defaults are BitImageProcessor's)."""
    size = p.get("size", {"shortest_edge": 224})
    if isinstance(size, int):
        size = {"shortest_edge": size}
    if "shortest_edge" in size:
        resize: Any = int(size["shortest_edge"])
    elif "height" in size and "width" in size:
        resize = (int(size["height"]), int(size["width"]))
    else:
        raise BitError(f"preprocessor_config.json: unsupported size {size}")
    crop = p.get("crop_size", {"height": 224, "width": 224})
    if isinstance(crop, int):
        crop = {"height": crop, "width": crop}
    if p.get("do_rescale", True) and abs(float(p.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-9:
        raise BitError("preprocessor_config.json: only rescale_factor 1/255 is supported")
    normalize = p.get("do_normalize", True)
    return Preprocess(
        resize=resize if p.get("do_resize", True) else None,
        crop=(int(crop["height"]), int(crop["width"])) if p.get("do_center_crop", True) else None,
        interpolation=_PIL_CODES.get(int(p.get("resample", 3)), "bicubic"),
        mean=tuple(p.get("image_mean", (0.48145466, 0.4578275, 0.40821073))) if normalize else (0.0,) * 3,
        std=tuple(p.get("image_std", (0.26862954, 0.26130258, 0.27577711))) if normalize else (1.0,) * 3,
        crop_rounding=p.get(HF_ROUNDING_KEY, "floor"),  # written by preprocess_to_hf for a timm model
    )


def preprocess_to_hf(pre: Preprocess) -> dict[str, Any]:
    """preprocessor_config.json for `pre` (BitImageProcessor's keys, and HF_ROUNDING_KEY for timm's crop)."""
    if isinstance(pre.resize, int):
        size: dict[str, int] = {"shortest_edge": pre.resize}
    elif pre.resize is not None:
        size = {"height": pre.resize[0], "width": pre.resize[1]}
    else:
        size = {"shortest_edge": 224}
    crop = pre.crop or (224, 224)
    return {
        "image_processor_type": "BitImageProcessor",
        "do_resize": pre.resize is not None,
        "size": size,
        "resample": int(PIL_FILTERS[pre.interpolation]),
        "do_center_crop": pre.crop is not None,
        "crop_size": {"height": crop[0], "width": crop[1]},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(pre.mean),
        "image_std": list(pre.std),
        "do_convert_rgb": True,
        # transformers ignores this key and floors; bit reads it back and keeps the source's (timm's) crop.
        **({HF_ROUNDING_KEY: pre.crop_rounding} if pre.crop_rounding != "floor" and pre.crop else {}),
    }
