"""The model a run starts from: a checkpoint (its head replaced by a zero one, as BiT does) or, with
--random-init, an architecture with random weights. Read before any weight is built, so that the flags
are checked against the architecture first."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from bitcli.architectures import from_name, known_names
from bitcli.config import BitConfig
from bitcli.errors import BitError, UsageError
from bitcli.hub import load_checkpoint
from bitcli.hyperrule import Resolution
from bitcli.model import BitModel

RANDOM_INIT_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # BiT's normalisation: pixels to [-1, 1]


def random_init_config(spec: str, num_classes: int) -> BitConfig:
    """`--random-init --model`: a named architecture (a preset such as tiny, R50x1 ... R152x4, or a published
    name; bitcli.architectures), or a JSON object of BitConfig fields such as '{"depths": [1, 1],
    "hidden_sizes": [32, 64], "embedding_size": 16, "num_groups": 8}'."""
    if spec.lstrip().startswith("{"):
        try:
            fields = json.loads(spec)
        except json.JSONDecodeError as exc:
            raise BitError(
                f'--model: not valid JSON ({exc.msg}); e.g. \'{{"depths": [1, 1], "hidden_sizes": [32, 64]}}\''
            ) from None
        if not isinstance(fields, dict):
            raise BitError("--model: the JSON architecture must be an object of BitConfig fields")
        return BitConfig.from_dict({**fields, "num_classes": num_classes})
    try:
        return from_name(spec, num_classes=num_classes)
    except BitError:
        raise BitError(
            f"--random-init --model {spec!r}: use a preset or architecture ({known_names()}) "
            "or a JSON object of BitConfig fields"
        ) from None


@dataclass(frozen=True)
class Start:
    """What the run starts from, read before any weight is built (so that flags are checked against it)."""

    config: BitConfig  # the architecture (a checkpoint's own head size until reset_classifier)
    ckpt: Any = None  # the Checkpoint; None: --random-init


def start_point(model: str, random_init: bool, revision: str | None, num_classes: int) -> Start:
    if random_init:
        return Start(random_init_config(model, num_classes))
    ckpt = load_checkpoint(model, revision)  # tensors are read later, by build_start_model
    return Start(ckpt.config, ckpt)


def build_start_model(start: Start, num_classes: int, seed: int) -> tuple[BitModel, tuple, tuple]:
    """(model on the CPU in fp32 with a zero head of `num_classes`, normalisation mean, std)."""
    if start.ckpt is None:
        torch.manual_seed(seed)  # the same random weights for the same --seed
        return BitModel(start.config), *RANDOM_INIT_MEAN_STD
    model = start.ckpt.build_model(device="cpu")
    model.reset_classifier(num_classes)  # BiT's new head starts at zero
    return model, start.ckpt.preprocess.mean, start.ckpt.preprocess.std


def freeze_backbone(model: BitModel) -> None:
    """--head-only: every parameter outside the head stops requiring gradients. Autograd then records nothing
    before the head (no input of a backbone op requires a gradient: the forward is a no_grad forward, keeping
    no activations for a backward), StdConv2d standardises each kernel once for the whole run, the optimizer
    gets the head's parameters only (trainable_parameters) and DDP reduces only those. The backbone has no
    train/eval-dependent layer (GroupNorm, no BatchNorm or dropout), so its mode changes nothing."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("head."))


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """What the optimizer updates: every parameter, or with --head-only the head's."""
    return [p for p in model.parameters() if p.requires_grad]


def total_stride(config: BitConfig) -> int:
    """Input pixels per pixel of the last feature map: 4 in the stem, then 2 in every stage after the first
    until output_stride, where dilation takes over (as BitModel builds it)."""
    reduction = 4
    for _ in config.depths[1:]:
        if reduction < config.output_stride:
            reduction *= 2
    return reduction


def check_resolution(res: Resolution | None, config: BitConfig) -> None:
    """An explicit --resolution must give the model at least one pixel of feature map per stride: below that
    the last stages see 1x1 maps, and GroupNorm over a single value fails mid-run (--resolution 4)."""
    smallest = total_stride(config)
    if res is not None and res.crop < smallest:
        raise UsageError(
            f"--resolution: a {res.crop}-px crop is below this model's total stride of {smallest} px "
            f"(its feature maps would shrink below one pixel); use a crop of at least {smallest}"
        )
