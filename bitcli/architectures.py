"""Every BiT architecture bitcli knows by name, in one table: bitcli's name (R50x1, or a preset such as tiny),
Google's published checkpoint names (BiT-M-R50x1) and timm's model name (resnetv2_50x1_bit). Torch-free: the
CLI reads it while it parses flags.

bitcli names every R{50,101,152}x{1,2,3,4} layout (for --random-init), but Google published, and timm builds,
only six of them (PUBLISHED_LAYOUTS): only those have published and timm names."""

from __future__ import annotations

import re
from dataclasses import dataclass

from bitcli.config import BASE_WIDTHS, BitConfig
from bitcli.errors import BitError

DEFAULT_MODEL = "google/bit-50"  # --model's default: transformers' R50x1 (BiT-M fine-tuned on ImageNet-1k)

DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}  # units per stage of each ResNet depth
WIDTHS = (1, 2, 3, 4)  # width factors: channels of every stage (and the stem) times this
# (depth, width) of the layouts Google published (bit_models/BiT-{S,M}-R50x1.npz ...) and timm builds
# (resnetv2_50x1_bit ...): R50x1, R50x3, R101x1, R101x3, R152x2, R152x4. No R50x2 exists in either.
PUBLISHED_LAYOUTS = ((50, 1), (50, 3), (101, 1), (101, 3), (152, 2), (152, 4))


@dataclass(frozen=True)
class Architecture:
    name: str  # bitcli's name: R50x1 ... R152x4, or a small preset for demos and tests
    depths: tuple[int, ...]  # units per stage
    hidden_sizes: tuple[int, ...]  # output channels of each stage
    embedding_size: int  # stem output channels
    num_groups: int = 32  # GroupNorm groups
    published: tuple[str, ...] = ()  # Google's checkpoint names: storage.googleapis.com/bit_models/NAME.npz
    timm: str | None = None  # timm's model name (resnetv2_50x1_bit); None: timm builds no such model

    def config(self, num_classes: int = 1000) -> BitConfig:
        return BitConfig(
            depths=self.depths,
            hidden_sizes=self.hidden_sizes,
            embedding_size=self.embedding_size,
            num_groups=self.num_groups,
            num_classes=num_classes,
        )


def _resnet(depth: int, width: int) -> Architecture:
    """R{depth}x{width}. A published layout has BiT-S (ImageNet-1k) and BiT-M (ImageNet-21k) upstream weights,
    the same fine-tuned on ILSVRC-2012, and a timm model; the others only bitcli's name."""
    name = f"R{depth}x{width}"
    published = (depth, width) in PUBLISHED_LAYOUTS
    return Architecture(
        name=name,
        depths=DEPTHS[depth],
        hidden_sizes=tuple(w * width for w in BASE_WIDTHS),
        embedding_size=64 * width,
        published=tuple(f"BiT-{up}-{name}{tuned}" for up in "SM" for tuned in ("", "-ILSVRC2012")) if published else (),
        timm=f"resnetv2_{depth}x{width}_bit" if published else None,
    )


_PRESETS = (
    Architecture("tiny", depths=(1, 1), hidden_sizes=(32, 64), embedding_size=16, num_groups=8),
    Architecture("small", depths=(1, 1, 1, 1), hidden_sizes=(32, 64, 128, 256), embedding_size=16, num_groups=8),
)
ARCHITECTURES = (*(_resnet(depth, width) for depth in DEPTHS for width in WIDTHS), *_PRESETS)
PRESETS = tuple(a.name for a in _PRESETS)  # small layouts for demos and tests (--random-init)
TIMM_LAYOUTS = ", ".join(a.name for a in ARCHITECTURES if a.timm)  # for messages: R50x1, R50x3, ...

_BY_OWN_NAME = {a.name.lower(): a for a in ARCHITECTURES}  # bitcli's names in any case: r50x1, R50X1
_BY_PUBLISHED_NAME = {p: a for a in ARCHITECTURES for p in a.published}
_BY_TIMM_NAME = {a.timm: a for a in ARCHITECTURES if a.timm}
# timm names a set of weights with a tag after the model name: resnetv2_50x1_bit.goog_in21k_ft_in1k.
_TIMM_TAGGED = re.compile(r"^(\w+)(?:\.\w+)?$")


def find(name: str) -> Architecture | None:
    """The architecture `name` names in any of the three schemes, or None."""
    timm = _TIMM_TAGGED.match(name)
    return (
        _BY_OWN_NAME.get(name.lower())
        or _BY_PUBLISHED_NAME.get(name)
        or (_BY_TIMM_NAME.get(timm.group(1)) if timm else None)
    )


def known_names() -> str:
    return ", ".join(a.name for a in ARCHITECTURES)


def from_name(name: str, num_classes: int = 1000) -> BitConfig:
    """`R50x1`, `tiny`, `BiT-M-R101x3`, `resnetv2_152x2_bit.goog_in21k` -> the config of that architecture."""
    arch = find(name)
    if arch is None:
        raise BitError(
            f"unknown architecture {name!r}; known: {known_names()} "
            "(or Google's name, e.g. BiT-M-R50x1, or timm's, e.g. resnetv2_50x1_bit)"
        )
    return arch.config(num_classes)


def is_published_name(name: str) -> bool:
    """Whether `name` is one of Google's checkpoint names (BiT-M-R50x1, BiT-S-R101x3-ILSVRC2012)."""
    return name in _BY_PUBLISHED_NAME


def timm_name(config: BitConfig) -> str:
    """The timm model name that builds `config` (weight-standardisation eps 1e-8, as timm), or a BitError."""
    for arch in ARCHITECTURES:
        if arch.timm and arch.config(config.num_classes) == config:
            return arch.timm
    raise BitError(f"this layout has no timm name (timm's BiT models are {TIMM_LAYOUTS}, eps 1e-8)")
