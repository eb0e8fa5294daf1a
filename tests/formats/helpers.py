"""Google's .npz layout written by hand, and what the format tests share.

The .npz files here are written with numpy straight into Google's key names and HWIO layout (the names and the
layout as BIT_FACTS.md and Google's code describe them), never with bitcli's writer, so a test cannot agree
with itself; timm's own npz reader (`timm_from_npz`) is the peer.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import torch
from conftest import run_main
from safetensors import safe_open

R50 = (3, 4, 6, 3)
BIT_WIDTHS = (256, 512, 1024, 2048)


# ----------------------------------------------------------------------------------------------------------
# Google's layout, written by hand


def google_arrays(
    depths: tuple[int, ...] = R50,
    width: int = 1,
    num_classes: int = 1000,
    *,
    widths: tuple[int, ...] | None = None,
    stem: int | None = None,
    seed: int = 0,
    kernel_std: float | None = None,
    head_std: float = 0.05,
) -> dict[str, np.ndarray]:
    """Known random weights under Google's names: HWIO kernels, `resnet/` prefix, norm1 under `a`."""
    rng = np.random.default_rng(seed)
    widths = widths or tuple(w * width for w in BIT_WIDTHS)
    stem = stem or 64 * width
    out: dict[str, np.ndarray] = {}

    def normal(shape: tuple[int, ...], std: float, mean: float = 0.0) -> np.ndarray:
        a = rng.standard_normal(shape, dtype=np.float32)
        a *= np.float32(std)
        a += np.float32(mean)
        return a

    def kernel(name: str, kh: int, kw: int, cin: int, cout: int) -> None:
        std = kernel_std if kernel_std is not None else np.sqrt(2.0 / (kh * kw * cin))
        out[f"resnet/{name}standardized_conv2d/kernel"] = normal((kh, kw, cin, cout), std)

    def norm(name: str, c: int) -> None:
        out[f"resnet/{name}group_norm/gamma"] = normal((c,), 0.1, 1.0)
        out[f"resnet/{name}group_norm/beta"] = normal((c,), 0.1)

    kernel("root_block/", 7, 7, 3, stem)
    cin = stem
    for s, (depth, cout) in enumerate(zip(depths, widths)):
        mid = cout // 4
        for u in range(depth):
            unit = f"block{s + 1}/unit{u + 1:02d}/"
            norm(unit + "a/", cin)
            if u == 0:
                kernel(unit + "a/proj/", 1, 1, cin, cout)
            kernel(unit + "a/", 1, 1, cin, mid)
            norm(unit + "b/", mid)
            kernel(unit + "b/", 3, 3, mid, mid)
            norm(unit + "c/", mid)
            kernel(unit + "c/", 1, 1, mid, cout)
            cin = cout
    norm("", cin)
    if num_classes:
        out["resnet/head/conv2d/kernel"] = normal((1, 1, cin, num_classes), head_std)
        out["resnet/head/conv2d/bias"] = normal((num_classes,), 0.1)
    return out


def google_to_torch_names(key: str) -> tuple[str, str]:
    """Google's name -> (transformers name, timm name), written out from the peers' documented layouts."""
    name = key.removeprefix("resnet/")
    fixed = {
        "root_block/standardized_conv2d/kernel": ("bit.embedder.convolution.weight", "stem.conv.weight"),
        "group_norm/gamma": ("bit.norm.weight", "norm.weight"),
        "group_norm/beta": ("bit.norm.bias", "norm.bias"),
        "head/conv2d/kernel": ("classifier.1.weight", "head.fc.weight"),
        "head/conv2d/bias": ("classifier.1.bias", "head.fc.bias"),
    }
    if name in fixed:
        return fixed[name]
    block, unit, rest = name.split("/", 2)
    s, u = int(block.removeprefix("block")) - 1, int(unit.removeprefix("unit")) - 1
    leaf = {
        "a/proj/standardized_conv2d/kernel": "downsample.conv.weight",
        **{f"{p}/standardized_conv2d/kernel": f"conv{n}.weight" for p, n in zip("abc", "123")},
        **{f"{p}/group_norm/gamma": f"norm{n}.weight" for p, n in zip("abc", "123")},
        **{f"{p}/group_norm/beta": f"norm{n}.bias" for p, n in zip("abc", "123")},
    }[rest]
    return f"bit.encoder.stages.{s}.layers.{u}.{leaf}", f"stages.{s}.blocks.{u}.{leaf}"


def google_to_oihw(key: str, array: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(array)
    if key.endswith("head/conv2d/kernel"):
        return t[0, 0].t().contiguous()  # [1, 1, C, N] -> Linear [N, C]
    return t.permute(3, 2, 0, 1).contiguous() if t.ndim == 4 else t


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    np.savez(path, **arrays)
    return path


def timm_from_npz(npz: Path, depths, width: int, num_classes: int, eps: float = 1e-10, **kw) -> torch.nn.Module:
    """timm's ResNetV2 with Google's standardisation eps, filled by timm's own npz reader."""
    from timm.layers import StdConv2d
    from timm.models.resnetv2 import ResNetV2, _load_weights

    with torch.device("meta"):  # no random init: every parameter must come from the file
        model = ResNetV2(
            layers=list(depths), width_factor=width, stem_type="fixed", conv_layer=partial(StdConv2d, eps=eps),
            num_classes=num_classes, **kw,
        )  # fmt: skip
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
        _load_weights(model, str(npz))
    assert all(torch.isfinite(p).all() for p in model.parameters()), "timm left a parameter unloaded"
    return model.eval()


def bitcli_model(path: Path) -> torch.nn.Module:
    from bitcli.hub import load_checkpoint

    return load_checkpoint(str(path)).build_model()


def read_st(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}  # noqa: SIM118 -- safe_open is not iterable


def inputs(size: int, n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


TINY = dict(depths=(1, 1, 1, 1), widths=(128, 128, 128, 128), stem=32)


def tiny_npz(path: Path, num_classes: int = 3, seed: int = 0) -> Path:
    return save_npz(
        path,
        google_arrays(TINY["depths"], widths=TINY["widths"], stem=TINY["stem"], num_classes=num_classes, seed=seed),
    )


def convert_ok(*args: object) -> None:
    """`bit convert SRC DST ...` in this process: exit 0, nothing on stdout, the summary naming DST on stderr."""
    code, out, err = run_main("convert", *args)
    assert code == 0, err
    assert out == ""  # stdout carries data only; the summary goes to stderr
    assert err.splitlines()[-1].startswith(f"wrote {args[1]} ("), err


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())
