"""timm's layout: a hub folder (config.json with "architecture", model.safetensors or pytorch_model.bin), or a
bare state dict (.safetensors without bitcli metadata, .bin, .pth, .pt). timm's head is a 1x1 convolution.
Its pretrained_cfg, to and from bitcli's Preprocess, is here too."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch

from bitcli.architectures import TIMM_LAYOUTS, from_name, timm_name
from bitcli.config import BitConfig
from bitcli.errors import BitError
from bitcli.formats.checkpoint import (
    WS_EPS_KEY,
    Checkpoint,
    check_tensors,
    checked_labels,
    infer_config,
    stored_ws_eps,
)
from bitcli.formats.raw import folder_weights, read_json, read_safetensors, read_torch_bin, write_safetensors
from bitcli.formats.tensors import Layout, TensorRef, renaming
from bitcli.preprocess import Preprocess
from bitcli.writes import atomic_folder

NAME = "timm"
# The exact preprocessing of a model whose pretrained_cfg cannot say it (e.g. transformers' floor-rounded
# centre crop, a resize without a crop): bitcli reads it in preference to pretrained_cfg; timm ignores it.
PREPROCESS_KEY = "bitcli_preprocess"
PREPROCESS_NOTE_KEY = "bitcli_preprocess_note"
_TO_BITCLI, _FROM_BITCLI = renaming(
    [
        (r"^stem\.conv\.", "stem.conv."),
        (r"^stem\.norm\.", "stem.norm."),
        (r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.units.\2."),
        (r"^norm\.", "norm."),
        (r"^head\.fc\.", "head."),
    ]
)
LAYOUT = Layout(
    "timm's BiT layout (stem.conv.weight, stages.N.blocks.N.*, head.fc.*)",
    source_key=_FROM_BITCLI,
    bitcli_key=_TO_BITCLI,
    conv_head=True,
)


def claims(config: dict[str, Any]) -> bool:
    """Whether a folder's config.json is a timm config."""
    return "architecture" in config


def read(path: Path) -> Checkpoint:
    """A timm folder, or a bare state dict (.safetensors, .bin, .pth, .pt)."""
    if path.is_dir():
        return read_weights(path, folder_weights(path), read_json(path / "config.json"))
    if path.suffix.lower() == ".safetensors":
        return read_weights(path, read_safetensors(path)[0])
    return read_weights(path, read_torch_bin(path))


def read_weights(path: Path, refs: dict[str, TensorRef], timm_cfg: dict[str, Any] | None = None) -> Checkpoint:
    """timm weights (bare file, or with its config.json): architecture from the shapes, checked against the name."""
    tensors = LAYOUT.refs_to_bitcli(str(path), refs)
    cfg = timm_cfg or {}
    shapes = {k: r.shape for k, r in tensors.items()}
    config = infer_config(shapes, str(path), LAYOUT, ws_eps=stored_ws_eps(cfg, 1e-8, path / "config.json"))
    _check_config(path, cfg, config)
    preprocess = _preprocess(path, cfg)
    check_tensors(config, tensors, str(path), LAYOUT)
    labels = checked_labels(cfg.get("label_names"), config.num_classes, str(path))
    return Checkpoint(
        config=config,
        labels=labels,
        preprocess=preprocess,
        tensors=tensors,
        source=str(path),
        format=NAME,
        layout=LAYOUT,
    )


def _preprocess(path: Path, cfg: dict[str, Any]) -> Preprocess:
    """bitcli's own record if present, else timm's pretrained_cfg, else timm's default for its BiT weights."""
    own, pretrained = cfg.get(PREPROCESS_KEY), cfg.get("pretrained_cfg")
    try:
        if own is not None:
            return Preprocess.from_dict(own)
        return preprocess_from_timm(pretrained) if pretrained else TIMM_DEFAULT_PREPROCESS
    except BitError as exc:
        raise BitError(f"{path / 'config.json'}: {exc}") from None
    except (TypeError, ValueError, AttributeError) as exc:
        key = PREPROCESS_KEY if own is not None else "pretrained_cfg"
        raise BitError(f"{path / 'config.json'}: {key} is damaged ({exc}); convert the source again") from None


def _check_config(path: Path, cfg: dict[str, Any], config: BitConfig) -> None:
    """config.json's architecture and class count must describe the weights' shapes."""
    arch = cfg.get("architecture")
    if arch is None:
        return
    try:
        named = dataclasses.replace(from_name(arch, num_classes=config.num_classes), ws_eps=config.ws_eps)
    except BitError:
        raise BitError(f"{path}: timm architecture {arch!r} is not a BiT model (resnetv2_*_bit)") from None
    if named != config:
        raise BitError(f"{path}: config.json says {arch} but the weights have another shape; the config lies")
    if int(cfg.get("num_classes", config.num_classes)) != config.num_classes:
        raise BitError(f"{path}: config.json says {cfg['num_classes']} classes but the head has {config.num_classes}")


def write(ckpt: Checkpoint, folder: Path, dtype: torch.dtype | None = None) -> None:
    """timm's hub layout (config.json + model.safetensors); only for the layouts timm has a name for."""
    try:
        arch = timm_name(dataclasses.replace(ckpt.config, ws_eps=1e-8))  # the eps travels in WS_EPS_KEY
    except BitError:
        config = ckpt.config
        raise BitError(
            f"{ckpt.source}: depths {list(config.depths)} and widths {list(config.hidden_sizes)} have no timm name "
            f"(timm's BiT models are {TIMM_LAYOUTS}); convert to --format bitcli or hf instead"
        ) from None
    tensors = LAYOUT.refs_from_bitcli(ckpt.source, ckpt.tensors)
    pretrained = {"architecture": arch, **preprocess_to_timm(ckpt.preprocess), "num_classes": ckpt.config.num_classes}
    cfg = {
        "architecture": arch,
        "num_classes": ckpt.config.num_classes,
        "num_features": ckpt.config.num_features,
        "global_pool": "avg",
        "label_names": ckpt.labels,
        "pretrained_cfg": pretrained,
        WS_EPS_KEY: ckpt.config.ws_eps,  # timm builds BiT with 1e-8 and ignores this key; bitcli reads it back
        **_preprocess_record(ckpt.preprocess, pretrained),
    }

    def fill(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        write_safetensors(tmp / "model.safetensors", tensors, {"format": "pt"}, dtype)

    atomic_folder(folder, fill)


def _preprocess_record(preprocess: Preprocess, pretrained: dict[str, Any]) -> dict[str, Any]:
    """Where timm's transform for `pretrained` would give other pixels than the model's own preprocessing,
    the exact one (read back by bitcli) and a note saying what timm does differently; else nothing."""
    timm_view = preprocess_from_timm(pretrained)
    if timm_view.same_pixels(preprocess):
        return {}
    ours, theirs = preprocess.to_dict(), timm_view.to_dict()
    fields = ", ".join(f"{k} {theirs[k]!r} instead of {ours[k]!r}" for k in ours if ours[k] != theirs[k])
    note = (
        f"bit preprocesses with {PREPROCESS_KEY} (the source model's own transform); timm's create_transform "
        f"follows pretrained_cfg, which differs: {fields}"
    )
    return {PREPROCESS_KEY: ours, PREPROCESS_NOTE_KEY: note}


# timm's pretrained_cfg --------------------------------------------------------------------------------------


def preprocess_from_timm(cfg: dict[str, Any]) -> Preprocess:
    """timm's pretrained_cfg: resize shortest edge to input/crop_pct, centre crop input_size."""
    _, h, w = cfg.get("input_size", (3, 224, 224))
    crop_pct = float(cfg.get("crop_pct", 0.875))
    mode = cfg.get("crop_mode", "center")
    if mode == "squash":
        resize: Any = (math.floor(h / crop_pct), math.floor(w / crop_pct))
    elif mode == "center":
        resize = math.floor(h / crop_pct) if h == w else (math.floor(h / crop_pct), math.floor(w / crop_pct))
    else:
        raise BitError(f"timm pretrained_cfg: crop_mode {mode!r} is not supported")
    return Preprocess(
        resize=resize,
        crop=(int(h), int(w)),
        interpolation=cfg.get("interpolation", "bilinear"),
        mean=tuple(cfg.get("mean", (0.5,) * 3)),
        std=tuple(cfg.get("std", (0.5,) * 3)),
        crop_rounding="round",  # timm's eval transform crops with torchvision's CenterCrop
    )


def preprocess_to_timm(pre: Preprocess) -> dict[str, Any]:
    """The closest pretrained_cfg; write records the exact transform beside it where timm differs."""
    crop = pre.crop or (pre.resize if isinstance(pre.resize, tuple) else (224, 224))
    short = pre.resize if isinstance(pre.resize, int) else crop[0]
    squash = isinstance(pre.resize, tuple)  # a resize to an exact size is timm's "squash" mode
    scale = pre.resize[0] if isinstance(pre.resize, tuple) else short  # squash: the exact height
    crop_pct = crop[0] / scale
    if math.floor(crop[0] / crop_pct) < scale:  # timm floors crop / crop_pct: keep it from landing a pixel short
        crop_pct = math.nextafter(crop_pct, 0.0)
    return {
        "input_size": [3, crop[0], crop[1]],
        "interpolation": pre.interpolation,
        "mean": list(pre.mean),
        "std": list(pre.std),
        "crop_pct": crop_pct,
        "crop_mode": "squash" if squash else "center",
    }


# timm's own pretrained_cfg for its BiT weights (resnetv2_*_bit.goog_in21k_ft_in1k: 448, crop_pct 1.0,
# bilinear), for bare timm state dicts that carry no config: timm crops them with torchvision's rounding.
TIMM_DEFAULT_PREPROCESS = preprocess_from_timm(
    {"input_size": (3, 448, 448), "crop_pct": 1.0, "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.5,) * 3}
)
