"""The architecture of a BiT model as one typed, serialisable dataclass. Named architectures (R50x1,
BiT-M-R50x1, resnetv2_50x1_bit) are in bitcli.architectures; transformers' config.json for it is in
bitcli.formats.hf."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from bitcli.errors import BitError

LayerType = Literal["preactivation", "bottleneck"]
Padding = Literal["SAME", "VALID"] | None

BASE_WIDTHS = (256, 512, 1024, 2048)  # stage widths of a x1 BiT (transformers' default hidden_sizes)


def make_div(value: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of 8 the way timm and transformers do (never below 90%)."""
    new_value = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


@dataclass(frozen=True)
class BitConfig:
    depths: tuple[int, ...] = (3, 4, 6, 3)  # units per stage
    hidden_sizes: tuple[int, ...] = BASE_WIDTHS  # output channels of each stage (width factor applied)
    embedding_size: int = 64  # stem output channels
    num_classes: int = 1000  # 0 builds no head: the model returns pre-logits features
    layer_type: LayerType = "preactivation"  # "bottleneck" is the non-pre-activation (v1.5) unit
    global_padding: Padding = None  # None: symmetric PyTorch padding; "SAME": TF padding, dynamic when strided
    embedding_dynamic_padding: bool = False  # TF "SAME" padding before the stem max-pool
    num_groups: int = 32  # GroupNorm groups
    output_stride: int = 32  # < 32 trades later strides for dilation (bottleneck units)
    ws_eps: float = 1e-8  # weight-standardisation eps: timm/transformers 1e-8, Google's original 1e-10
    gn_eps: float = 1e-5
    in_channels: int = 3

    def __post_init__(self) -> None:
        if len(self.depths) != len(self.hidden_sizes) or not self.depths:
            raise BitError(f"config: depths {self.depths} and hidden_sizes {self.hidden_sizes} differ in length")
        if self.layer_type not in ("preactivation", "bottleneck"):
            raise BitError(f"config: layer_type {self.layer_type!r} is not 'preactivation' or 'bottleneck'")
        if self.global_padding not in (None, "SAME", "VALID"):
            raise BitError(f"config: global_padding {self.global_padding!r} is not null, 'SAME' or 'VALID'")
        if self.num_classes < 0:
            raise BitError(f"config: num_classes must be >= 0, got {self.num_classes}")
        for width in (self.embedding_size, *self.hidden_sizes, *self.mid_sizes):
            if width % self.num_groups:
                raise BitError(f"config: {width} channels do not split into {self.num_groups} groups")

    @property
    def mid_sizes(self) -> tuple[int, ...]:
        return tuple(make_div(h * 0.25) for h in self.hidden_sizes)

    @property
    def num_features(self) -> int:
        return self.hidden_sizes[-1]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BitConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise BitError(f"config: unknown field(s) {sorted(unknown)}")
        values = dict(data)
        for key in ("depths", "hidden_sizes"):
            if key in values:
                values[key] = tuple(int(v) for v in values[key])
        return cls(**values)
