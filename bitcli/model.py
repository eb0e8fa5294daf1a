"""The BiT network: weight-standardised convs, GroupNorm, (pre-activation) bottleneck units, stem and head."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bitcli.config import BitConfig


def same_padding(size: int, kernel: int, stride: int, dilation: int) -> int:
    """Total padding TF's "SAME" needs along one axis of length `size`."""
    return max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)


def pad_same(x: torch.Tensor, kernel: int, stride: int, dilation: int, value: float = 0.0) -> torch.Tensor:
    pad_h = same_padding(x.shape[-2], kernel, stride, dilation)
    pad_w = same_padding(x.shape[-1], kernel, stride, dilation)
    if pad_h or pad_w:  # TF puts the odd pixel at the bottom/right
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2], value=value)
    return x


def standardize(weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Per output channel: (w - mean) / sqrt(biased var + eps) over (in, kh, kw), in the weight's memory layout."""
    flat = weight.reshape(1, weight.shape[0], -1)
    out = F.batch_norm(flat, None, None, training=True, momentum=0.0, eps=eps).reshape_as(weight)
    # A channels_last model needs a channels_last kernel: otherwise every conv call copies a 3x3 kernel into
    # that layout (about 0.2 s per R50 forward on a 2-core CPU, whatever the batch size).
    if weight.is_contiguous(memory_format=torch.channels_last):
        out = out.contiguous(memory_format=torch.channels_last)
    return out


class StdConv2d(nn.Conv2d):
    """Conv2d whose kernel is weight-standardised on the fly.

    Standardising costs a reduction over every kernel per forward. When no gradient is recorded the
    standardised kernel is cached and reused until the parameter changes (tracked by its version counter),
    so inference pays it once per load and training once per optimizer step.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        dilation: int = 1,
        padding: str | None = None,
        eps: float = 1e-8,
    ) -> None:
        self.dynamic_same = False
        if padding == "SAME":
            if stride == 1 and (dilation * (kernel_size - 1)) % 2 == 0:
                pad = dilation * (kernel_size - 1) // 2
            else:
                pad, self.dynamic_same = 0, True
        elif padding == "VALID":
            pad = 0
        else:
            pad = ((stride - 1) + dilation * (kernel_size - 1)) // 2
        super().__init__(in_channels, out_channels, kernel_size, stride, pad, dilation, bias=False)
        self.eps = eps
        self._cache: tuple[tuple[int, int, torch.dtype, torch.device], torch.Tensor] | None = None

    def standardized_weight(self) -> torch.Tensor:
        if torch.is_grad_enabled() and self.weight.requires_grad:
            self._cache = None
            return standardize(self.weight, self.eps)
        key = (self.weight._version, self.weight.data_ptr(), self.weight.dtype, self.weight.device)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, standardize(self.weight.detach(), self.eps))
        return self._cache[1]

    def _apply(self, fn, recurse=True):  # .to()/.half() replace the parameter: drop the stale kernel
        self._cache = None
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic_same:
            x = pad_same(x, self.kernel_size[0], self.stride[0], self.dilation[0])
        return F.conv2d(x, self.standardized_weight(), None, self.stride, self.padding, self.dilation)


class GroupNormAct(nn.GroupNorm):
    """GroupNorm, optionally followed by ReLU."""

    def __init__(self, num_groups: int, channels: int, eps: float, act: bool = True) -> None:
        super().__init__(num_groups, channels, eps=eps)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return F.relu(x, inplace=True) if self.act else x


class Stem(nn.Module):
    """7x7/2 conv, then a 3x3/2 max-pool over a zero-padded map (not MaxPool2d(padding=1): zeros, not -inf)."""

    def __init__(self, cfg: BitConfig) -> None:
        super().__init__()
        self.conv = StdConv2d(cfg.in_channels, cfg.embedding_size, 7, 2, padding=cfg.global_padding, eps=cfg.ws_eps)
        self.zero_pad = cfg.global_padding != "SAME"
        self.dynamic_pool_pad = cfg.embedding_dynamic_padding
        self.norm = (
            GroupNormAct(cfg.num_groups, cfg.embedding_size, cfg.gn_eps) if cfg.layer_type == "bottleneck" else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.zero_pad:
            x = F.pad(x, [1, 1, 1, 1])
        if self.norm is not None:
            x = self.norm(x)
        if self.dynamic_pool_pad:
            x = pad_same(x, 3, 2, 1)
        return F.max_pool2d(x, 3, 2)


class Downsample(nn.Module):
    """1x1 strided projection on the shortcut of a stage's first unit (GroupNorm after it in v1.5 units)."""

    def __init__(self, cfg: BitConfig, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv = StdConv2d(in_ch, out_ch, 1, stride, padding=cfg.global_padding, eps=cfg.ws_eps)
        self.norm = (
            GroupNormAct(cfg.num_groups, out_ch, cfg.gn_eps, act=False) if cfg.layer_type == "bottleneck" else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return self.norm(x) if self.norm is not None else x


class PreActBottleneck(nn.Module):
    """ResNetV2 unit: norm+ReLU first, the shortcut projection taken from that pre-activation."""

    def __init__(
        self, cfg: BitConfig, in_ch: int, mid_ch: int, out_ch: int, stride: int, dilation: int, project: bool
    ) -> None:
        super().__init__()
        del dilation  # transformers and timm's BiT apply no dilation inside pre-activation units
        g, eps, pad = cfg.num_groups, cfg.ws_eps, cfg.global_padding
        self.downsample = Downsample(cfg, in_ch, out_ch, stride) if project else None
        self.norm1 = GroupNormAct(g, in_ch, cfg.gn_eps)
        self.conv1 = StdConv2d(in_ch, mid_ch, 1, padding=pad, eps=eps)
        self.norm2 = GroupNormAct(g, mid_ch, cfg.gn_eps)
        self.conv2 = StdConv2d(mid_ch, mid_ch, 3, stride, padding=pad, eps=eps)
        self.norm3 = GroupNormAct(g, mid_ch, cfg.gn_eps)
        self.conv3 = StdConv2d(mid_ch, out_ch, 1, padding=pad, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_pre = self.norm1(x)
        shortcut = self.downsample(x_pre) if self.downsample is not None else x
        x = self.conv1(x_pre)
        x = self.conv2(self.norm2(x))
        x = self.conv3(self.norm3(x))
        return x.add_(shortcut)  # in place: conv3's output is fresh; a new full-size map per unit costs page faults


class Bottleneck(nn.Module):
    """Non-pre-activation (v1.5) unit, as in transformers' "bottleneck" layer type (DPT-hybrid's backbone)."""

    def __init__(
        self, cfg: BitConfig, in_ch: int, mid_ch: int, out_ch: int, stride: int, dilation: int, project: bool
    ) -> None:
        super().__init__()
        g, eps, pad = cfg.num_groups, cfg.ws_eps, cfg.global_padding
        self.downsample = Downsample(cfg, in_ch, out_ch, stride) if project else None
        self.conv1 = StdConv2d(in_ch, mid_ch, 1, padding=pad, eps=eps)
        self.norm1 = GroupNormAct(g, mid_ch, cfg.gn_eps)
        self.conv2 = StdConv2d(mid_ch, mid_ch, 3, stride, dilation, padding=pad, eps=eps)
        self.norm2 = GroupNormAct(g, mid_ch, cfg.gn_eps)
        self.conv3 = StdConv2d(mid_ch, out_ch, 1, padding=pad, eps=eps)
        self.norm3 = GroupNormAct(g, out_ch, cfg.gn_eps, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.downsample(x) if self.downsample is not None else x
        x = self.norm1(self.conv1(x))
        x = self.norm2(self.conv2(x))
        x = self.norm3(self.conv3(x))
        return F.relu(x + shortcut, inplace=True)


class Stage(nn.Module):
    def __init__(self, cfg: BitConfig, index: int, in_ch: int, stride: int, dilation: int) -> None:
        super().__init__()
        unit = PreActBottleneck if cfg.layer_type == "preactivation" else Bottleneck
        out_ch, mid_ch = cfg.hidden_sizes[index], cfg.mid_sizes[index]
        # The first unit keeps the previous stage's dilation for its 3x3 conv (timm/transformers rule) and
        # always carries the shortcut projection (as in Google's unit01/a/proj).
        first_dilation = 1 if dilation in (1, 2) else 2
        units = []
        for i in range(cfg.depths[index]):
            first = i == 0
            units.append(
                unit(cfg, in_ch, mid_ch, out_ch, stride if first else 1, first_dilation if first else dilation, first)
            )
            in_ch = out_ch
        self.units = nn.Sequential(*units)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.units(x)


class BitModel(nn.Module):
    """ResNetV2 as used by BiT. forward() gives logits; forward_features()/pre_logits() give the features."""

    def __init__(self, cfg: BitConfig) -> None:
        super().__init__()
        self.config = cfg
        self.stem = Stem(cfg)
        stages, in_ch, reduction, dilation = [], cfg.embedding_size, 4, 1
        for index in range(len(cfg.depths)):
            stride = 1 if index == 0 else 2
            if reduction >= cfg.output_stride:
                dilation, stride = dilation * stride, 1
            stages.append(Stage(cfg, index, in_ch, stride, dilation))
            in_ch, reduction = cfg.hidden_sizes[index], reduction * stride
        self.stages = nn.Sequential(*stages)
        preact = cfg.layer_type == "preactivation"
        self.norm = GroupNormAct(cfg.num_groups, cfg.num_features, cfg.gn_eps) if preact else None
        self.head = nn.Linear(cfg.num_features, cfg.num_classes) if cfg.num_classes else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.stem.conv.weight.is_meta:  # shape-only models (checkpoint checks, loading) need no init: ~2 s saved
            return
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.head is not None:  # BiT transfers start from a zero head
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a zero-initialised one for `num_classes` classes."""
        self.config = BitConfig.from_dict({**self.config.to_dict(), "num_classes": num_classes})
        self.head = None
        if num_classes:
            ref = self.norm.weight if self.norm is not None else next(self.parameters())
            self.head = nn.Linear(self.config.num_features, num_classes, device=ref.device, dtype=ref.dtype)
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.norm(x) if self.norm is not None else x  # [B, C, H/32, W/32]

    def pre_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).mean(dim=(2, 3))  # [B, C]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.pre_logits(x)
        return self.head(features) if self.head is not None else features
