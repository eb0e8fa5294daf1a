"""The BiT network: weight-standardised convs, GroupNorm, (pre-activation) bottleneck units, stem and head."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from bitcli.config import BitConfig


def same_padding(size: int, kernel: int, stride: int, dilation: int) -> int:
    """Total padding TF's "SAME" needs along one axis of length `size`."""
    return max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)


def pad_same(x: torch.Tensor, kernel: int, stride: int, dilation: int, *, value: float = 0.0) -> torch.Tensor:
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
        *,
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
        super().__init__(
            in_channels, out_channels, kernel_size, stride=stride, padding=pad, dilation=dilation, bias=False
        )
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
        w = self.standardized_weight()
        return F.conv2d(x, w, bias=None, stride=self.stride, padding=self.padding, dilation=self.dilation)


class GroupNormAct(nn.GroupNorm):
    """GroupNorm, then ReLU (or nothing where the unit adds the shortcut first)."""

    def __init__(self, channels: int, *, num_groups: int, eps: float, apply_act: bool = True) -> None:
        super().__init__(num_groups, channels, eps=eps)
        self.act = nn.ReLU(inplace=True) if apply_act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(F.group_norm(x, self.num_groups, weight=self.weight, bias=self.bias, eps=self.eps))


class PadSame(nn.Module):
    """TF "SAME" padding for a `kernel`/`stride` window, computed from each input's size."""

    def __init__(self, kernel: int, stride: int) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pad_same(x, self.kernel, self.stride, dilation=1)


class Stem(nn.Module):
    """7x7/2 conv, then a 3x3/2 max-pool (GroupNorm+ReLU between them in v1.5 models)."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        *,
        preact: bool,
        fixed_pad: bool,
        dynamic_pool_pad: bool,
        conv_layer: Callable[..., nn.Module],
        norm_layer: Callable[..., nn.Module],
    ) -> None:
        super().__init__()
        self.conv = conv_layer(in_chs, out_chs, kernel_size=7, stride=2)
        # BiT's fixed approximation of SAME before the pool: zeros, not MaxPool2d(padding=1)'s -inf
        self.pad = nn.ConstantPad2d(1, 0.0) if fixed_pad else nn.Identity()
        self.norm = nn.Identity() if preact else norm_layer(out_chs)
        self.pool_pad = PadSame(kernel=3, stride=2) if dynamic_pool_pad else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool_pad(self.norm(self.pad(self.conv(x))))
        return F.max_pool2d(x, 3, 2)


class Downsample(nn.Module):
    """1x1 strided projection on the shortcut of a stage's first unit (GroupNorm after it in v1.5 units)."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        *,
        stride: int,
        preact: bool,
        conv_layer: Callable[..., nn.Module],
        norm_layer: Callable[..., nn.Module],
    ) -> None:
        super().__init__()
        self.conv = conv_layer(in_chs, out_chs, kernel_size=1, stride=stride)
        self.norm = nn.Identity() if preact else norm_layer(out_chs, apply_act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class PreActBottleneck(nn.Module):
    """ResNetV2 unit: norm+ReLU first, the shortcut projection taken from that pre-activation. No dilation:
    transformers' and timm's BiT apply none inside pre-activation units."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        *,
        mid_chs: int,
        stride: int,
        project: bool,
        conv_layer: Callable[..., nn.Module],
        norm_layer: Callable[..., nn.Module],
    ) -> None:
        super().__init__()
        self.project = project  # Google's unit: the projection reads the pre-activation, the identity the input
        self.downsample = (
            Downsample(in_chs, out_chs, stride=stride, preact=True, conv_layer=conv_layer, norm_layer=norm_layer)
            if project
            else nn.Identity()
        )
        self.norm1 = norm_layer(in_chs)
        self.conv1 = conv_layer(in_chs, mid_chs, kernel_size=1)
        self.norm2 = norm_layer(mid_chs)
        self.conv2 = conv_layer(mid_chs, mid_chs, kernel_size=3, stride=stride)
        self.norm3 = norm_layer(mid_chs)
        self.conv3 = conv_layer(mid_chs, out_chs, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_pre = self.norm1(x)
        shortcut = self.downsample(x_pre if self.project else x)
        x = self.conv1(x_pre)
        x = self.conv2(self.norm2(x))
        x = self.conv3(self.norm3(x))
        return x.add_(shortcut)  # in place: conv3's output is fresh; a new full-size map per unit costs page faults


class Bottleneck(nn.Module):
    """Non-pre-activation (v1.5) unit, as in transformers' "bottleneck" layer type (DPT-hybrid's backbone)."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        *,
        mid_chs: int,
        stride: int,
        dilation: int,
        project: bool,
        conv_layer: Callable[..., nn.Module],
        norm_layer: Callable[..., nn.Module],
    ) -> None:
        super().__init__()
        self.downsample = (
            Downsample(in_chs, out_chs, stride=stride, preact=False, conv_layer=conv_layer, norm_layer=norm_layer)
            if project
            else nn.Identity()
        )
        self.conv1 = conv_layer(in_chs, mid_chs, kernel_size=1)
        self.norm1 = norm_layer(mid_chs)
        self.conv2 = conv_layer(mid_chs, mid_chs, kernel_size=3, stride=stride, dilation=dilation)
        self.norm2 = norm_layer(mid_chs)
        self.conv3 = conv_layer(mid_chs, out_chs, kernel_size=1)
        self.norm3 = norm_layer(out_chs, apply_act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.downsample(x)
        x = self.norm1(self.conv1(x))
        x = self.norm2(self.conv2(x))
        x = self.norm3(self.conv3(x))
        return F.relu(x + shortcut, inplace=True)


class Stage(nn.Module):
    """`depth` units; the first changes the width and stride and always carries the shortcut projection (as
    Google's unit01/a/proj). unit_layer(in_chs, out_chs, stride=, project=) builds one unit."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        *,
        depth: int,
        stride: int,
        first_unit_layer: Callable[..., nn.Module],
        unit_layer: Callable[..., nn.Module],
    ) -> None:
        super().__init__()
        first = first_unit_layer(in_chs, out_chs, stride=stride, project=True)
        rest = [unit_layer(out_chs, out_chs, stride=1, project=False) for _ in range(depth - 1)]
        self.units = nn.Sequential(first, *rest)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.units(x)


def unit_layers(
    preact: bool,
    *,
    mid_chs: int,
    dilation: int,
    conv_layer: Callable[..., nn.Module],
    norm_layer: Callable[..., nn.Module],
) -> tuple[Callable[..., nn.Module], Callable[..., nn.Module]]:
    """(the builder of a stage's first unit, of its other units) for a stage dilated by `dilation`."""
    if preact:
        unit = partial(PreActBottleneck, mid_chs=mid_chs, conv_layer=conv_layer, norm_layer=norm_layer)
        return unit, unit
    # The first unit keeps the previous stage's dilation for its 3x3 conv (timm/transformers rule).
    first_dilation = 1 if dilation in (1, 2) else 2
    first = partial(Bottleneck, mid_chs=mid_chs, dilation=first_dilation, conv_layer=conv_layer, norm_layer=norm_layer)
    rest = partial(Bottleneck, mid_chs=mid_chs, dilation=dilation, conv_layer=conv_layer, norm_layer=norm_layer)
    return first, rest


class BitModel(nn.Module):
    """ResNetV2 as used by BiT. forward() gives logits; forward_features()/pre_logits() give the features.
    A model with num_classes 0 has no head (an nn.Identity): forward() then gives the pre-logits."""

    def __init__(self, cfg: BitConfig) -> None:
        super().__init__()
        self.config = cfg
        conv_layer = partial(StdConv2d, padding=cfg.global_padding, eps=cfg.ws_eps)
        norm_layer = partial(GroupNormAct, num_groups=cfg.num_groups, eps=cfg.gn_eps)
        preact = cfg.layer_type == "preactivation"
        self.stem = Stem(
            cfg.in_channels,
            cfg.embedding_size,
            preact=preact,
            fixed_pad=cfg.global_padding != "SAME",
            dynamic_pool_pad=cfg.embedding_dynamic_padding,
            conv_layer=conv_layer,
            norm_layer=norm_layer,
        )
        stages, in_chs, reduction, dilation = [], cfg.embedding_size, 4, 1
        for index, (depth, out_chs, mid_chs) in enumerate(zip(cfg.depths, cfg.hidden_sizes, cfg.mid_sizes)):
            stride = 1 if index == 0 else 2
            if reduction >= cfg.output_stride:
                dilation, stride = dilation * stride, 1
            first_unit_layer, unit_layer = unit_layers(
                preact, mid_chs=mid_chs, dilation=dilation, conv_layer=conv_layer, norm_layer=norm_layer
            )
            stages.append(
                Stage(
                    in_chs,
                    out_chs,
                    depth=depth,
                    stride=stride,
                    first_unit_layer=first_unit_layer,
                    unit_layer=unit_layer,
                )
            )
            in_chs, reduction = out_chs, reduction * stride
        self.stages = nn.Sequential(*stages)
        self.norm = norm_layer(cfg.num_features) if preact else nn.Identity()
        self.head = nn.Linear(cfg.num_features, cfg.num_classes) if cfg.num_classes else nn.Identity()
        self.reset_parameters()

    @property
    def has_head(self) -> bool:
        """False for a features-only model (num_classes 0): forward() gives pre-logits, not logits."""
        return isinstance(self.head, nn.Linear)

    def reset_parameters(self) -> None:
        if self.stem.conv.weight.is_meta:  # shape-only models (checkpoint checks, loading) need no init: ~2 s saved
            return
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if isinstance(self.head, nn.Linear):  # has_head; BiT transfers start from a zero head
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a zero-initialised one for `num_classes` classes (none for 0)."""
        self.config = dataclasses.replace(self.config, num_classes=num_classes)
        self.head = nn.Identity()
        if num_classes:
            ref = self.stem.conv.weight
            self.head = nn.Linear(self.config.num_features, num_classes, device=ref.device, dtype=ref.dtype)
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.stages(self.stem(x)))  # [B, C, H/32, W/32]

    def pre_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).mean(dim=(2, 3))  # [B, C]

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from forward_features' output: global average pooling, then the head (Grad-CAM
        differentiates this part alone)."""
        return self.head(features.mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pre_logits(x))
