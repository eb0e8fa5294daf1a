"""The throughput table of gpu_check.py: bitcli against timm (channels_last + AMP) and transformers (AMP) on the
same weights, one after the other in this process, at the check's batch and resolutions:

- model only: a uint8 batch already on the device; bitcli's engine normalises it there (what `bit predict`
  runs after GPU decoding), the peers get it normalised. Top-1 of the peers against bitcli's is recorded.
- end to end: images/s over a folder of realistic JPEGs (up to 1600 px): `bit predict` in this process (with
  GPU decoding, and with it switched off), and each peer as its documentation shows: a torch DataLoader with the
  same number of worker processes decoding with PIL and the peer's own transform, then the model. Start-up
  cancels out: each contender's rate is (N - batch) / (time for N - time for its first batch).

A peer that is not installed, or cannot build the architecture, is a row with a note instead of a rate.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPEATS = {"gpu": 10, "cpu": 1}
CONTENDERS = ("bitcli", "timm", "transformers")  # (end to end on a GPU: bitcli with CPU decoding too)


def throughput(run, models) -> None:
    import torch

    from bitcli.hub import load_checkpoint

    m = run.mode
    device = torch.device(m.device)
    dtype = _dtype(m.device)
    for name, path in (("R50x1" if m.name == "gpu" else "tiny", models.agree), (m.big, models.big)):
        if run.left() <= 0:  # not even loaded (an R101x3 takes seconds)
            for res in m.resolutions:
                _not_measured(run, list(CONTENDERS), name, res, what="model only")
            continue
        ckpt = load_checkpoint(str(path))
        contenders = {"bitcli": _bitcli(ckpt, device, dtype)}
        for peer, build in (("timm", _timm), ("transformers", _transformers)):
            try:
                contenders[peer] = build(ckpt, device, dtype)
            except Exception as exc:  # noqa: BLE001 -- a missing or failing peer is a note in its row
                contenders[peer] = f"{type(exc).__name__}: {str(exc).strip()[:120]}"
        for res in m.resolutions:
            if run.left() <= 0:
                _not_measured(run, list(contenders), name, res, what="model only")
                continue
            _model_only(run, name, res, contenders, device)
        del contenders
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for res in m.resolutions:
        if run.left() > 0:
            _end_to_end(run, models, res, dtype)
        else:
            _not_measured(run, list(CONTENDERS), "R50x1" if m.name == "gpu" else "tiny", res, what="end to end")
    ran = [r for r in run.throughput if r.get("images_per_s") is not None]
    notes = sorted({r["note"] for r in run.throughput if r.get("images_per_s") is None})
    # nothing measured: a FAIL, unless only because the time ran out (a SKIP, as elsewhere)
    status = "PASS" if ran else ("SKIP" if all(n.startswith("not measured") for n in notes) else "FAIL")
    run.add("throughput", status, "; ".join(notes)[:300], rows=len(run.throughput), measured=len(ran))


def _not_measured(run, contenders: list[str], model: str, res: int, what: str) -> None:
    """The rows that the spent budget left out, each saying so (a table with rows missing would not)."""
    for contender in contenders:
        run.throughput.append({"contender": contender, "model": model, "resolution": res, "batch": run.mode.batch,
                               "what": what, "images_per_s": None, "note": f"not measured: {run.spent()}"})  # fmt: skip


def _dtype(device: str):
    import torch

    if device != "cuda":
        return torch.float32  # bitcli's auto on a CPU
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _autocast(device, dtype):
    import torch

    return contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)


def _bitcli(ckpt, device, dtype) -> Callable:
    from bitcli.engine import load_engine

    engine = load_engine(ckpt, device, dtype)
    return lambda batch_uint8, pixels: engine.logits(batch_uint8)


def _state(layout, ckpt) -> dict:
    return {k: ref.load() for k, ref in layout.refs_from_bitcli(ckpt.source, ckpt.tensors).items()}


def _timm(ckpt, device, dtype) -> Callable:
    import timm
    import torch
    from timm.layers import GroupNormAct, StdConv2d
    from timm.models.resnetv2 import ResNetV2

    from bitcli.architectures import timm_name
    from bitcli.errors import BitError
    from bitcli.formats.timm import LAYOUT

    cfg = ckpt.config
    try:
        model = timm.create_model(timm_name(cfg), pretrained=False, num_classes=cfg.num_classes)
    except BitError:  # a small preset: the same ResNetV2, built by hand
        model = ResNetV2(layers=list(cfg.depths), channels=tuple(cfg.hidden_sizes), num_classes=cfg.num_classes,
                         stem_chs=cfg.embedding_size, stem_type="fixed", conv_layer=functools.partial(StdConv2d, eps=1e-8),
                         norm_layer=functools.partial(GroupNormAct, num_groups=cfg.num_groups))  # fmt: skip
    model.load_state_dict(_state(LAYOUT, ckpt))
    model = model.to(device).eval().to(memory_format=torch.channels_last)

    def forward(batch_uint8, pixels):
        with torch.inference_mode(), _autocast(device, dtype):
            return model(pixels.contiguous(memory_format=torch.channels_last))

    return forward


def _transformers(ckpt, device, dtype) -> Callable:
    import torch
    import transformers

    from bitcli.formats.hf import LAYOUT, config_to_hf

    config = {k: v for k, v in config_to_hf(ckpt.config).items() if k not in ("model_type", "architectures")}
    model = transformers.BitForImageClassification(transformers.BitConfig(**config, num_labels=ckpt.config.num_classes))
    model.load_state_dict(_state(LAYOUT, ckpt))
    model = model.to(device).eval()

    def forward(batch_uint8, pixels):
        with torch.inference_mode(), _autocast(device, dtype):
            return model(pixel_values=pixels).logits

    return forward


def _model_only(run, name: str, res: int, contenders: dict, device) -> None:
    import torch

    m = run.mode
    batch = np.stack([np.asarray(im.convert("RGB").resize((res, res))) for im in _batch_images(m.batch)])
    on_device = torch.from_numpy(batch).to(device)
    pixels = ((on_device.permute(0, 3, 1, 2).float() / 255) - 0.5) / 0.5  # the checkpoints' mean = std = 0.5
    top1 = {}
    for contender, forward in contenders.items():
        row = {"contender": contender, "model": name, "resolution": res, "batch": m.batch, "what": "model only"}
        if isinstance(forward, str):
            run.throughput.append({**row, "images_per_s": None, "note": forward})
            continue
        rate, logits = _rate(forward, on_device, pixels, REPEATS[m.name], device)
        top1[contender] = logits.float().argmax(1).cpu()
        agree = float((top1[contender] == top1["bitcli"]).float().mean())
        run.throughput.append({**row, "images_per_s": rate, "note": f"top-1 = bitcli's on {agree:.0%}"})


@functools.cache
def _batch_images(n: int) -> list:
    from common import realistic_images

    return realistic_images(n, seed=4)


def _rate(forward: Callable, batch_uint8, pixels, repeats: int, device) -> tuple[float, object]:
    import torch

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    logits = forward(batch_uint8, pixels)  # warm-up: kernels chosen, memory allocated
    forward(batch_uint8, pixels)
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        forward(batch_uint8, pixels)
    sync()
    return len(batch_uint8) * repeats / (time.perf_counter() - t0), logits


# ----------------------------------------------------------------------------------------------------------
# End to end from JPEG files


def _end_to_end(run, models, res: int, dtype) -> None:
    from gpu_check import write_jpegs

    from bitcli.hub import load_checkpoint

    m = run.mode
    folder = run.workdir / "e2e"
    files = write_jpegs(folder / "all", m.e2e_images, seed=1, max_side=None if m.name == "gpu" else 320)
    first = folder / f"first{m.batch}"
    if not first.exists():
        first.mkdir()
        for f in files[: m.batch]:
            (first / f.name).symlink_to(f)
    model = _at_resolution(models.agree, res, run.workdir / "models")
    ckpt = load_checkpoint(str(model))
    name = "R50x1" if m.name == "gpu" else "tiny"
    cases: dict[str, Callable[[Path], None]] = {"bitcli": functools.partial(_bit_predict, run, model, gpu=True)}
    if m.device == "cuda":
        cases["bitcli (CPU decoding)"] = functools.partial(_bit_predict, run, model, gpu=False)
    for peer, build in (("timm", _timm), ("transformers", _transformers)):
        try:
            cases[peer] = _peer_loop(run, peer, build(ckpt, _device(m.device), dtype), res)
        except Exception as exc:  # noqa: BLE001 -- a missing or failing peer is a note in its row
            run.throughput.append({"contender": peer, "model": name, "resolution": res, "batch": m.batch,
                                   "what": "end to end", "images_per_s": None, "note": f"{type(exc).__name__}: {str(exc)[:120]}"})  # fmt: skip
    for contender, go in cases.items():
        if run.left() <= 0:
            _not_measured(run, [contender], name, res, what="end to end")
            continue
        row = {"contender": contender, "model": name, "resolution": res, "batch": m.batch, "what": "end to end"}
        try:
            t0 = time.perf_counter()
            go(first)
            t_first = time.perf_counter() - t0
            t0 = time.perf_counter()
            go(folder / "all")
            t_all = time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001 -- one contender failing is its row's note, the others go on
            run.throughput.append({**row, "images_per_s": None, "note": f"{type(exc).__name__}: {str(exc)[:120]}"})
            continue
        if t_all <= t_first:  # too few images to see the steady rate through the noise
            run.throughput.append({**row, "images_per_s": None, "note": f"{len(files)} JPEGs: too few to measure"})
            continue
        note = f"{len(files)} JPEGs, {m.workers} decoding workers"
        run.throughput.append({**row, "images_per_s": (len(files) - m.batch) / (t_all - t_first), "note": note})


def _device(kind: str):
    import torch

    return torch.device(kind)


def _at_resolution(model: Path, res: int, folder: Path) -> Path:
    """The agreement model with a shortest-edge `res` resize and a `res` centre crop (its own transform)."""
    import dataclasses

    from bitcli.formats import bitcli as bitcli_format
    from bitcli.hub import load_checkpoint

    out = folder / f"agree-{res}.safetensors"
    if not out.exists():
        ckpt = load_checkpoint(str(model))
        ckpt.preprocess = dataclasses.replace(ckpt.preprocess, resize=res, crop=(res, res))
        bitcli_format.write(ckpt, out)
    return out


def _bit_predict(run, model: Path, folder: Path, gpu: bool) -> None:
    from gpu_check import bit

    from bitcli import gpu_decode

    m = run.mode
    real = gpu_decode.decodes_on
    if not gpu:
        gpu_decode.decodes_on = lambda device: False
    try:
        bit("predict", folder, "--model", model, "--device", m.device, "--batch-size", m.batch, "--workers",
            m.workers, "--format", "jsonl", "--output", run.workdir / "e2e.jsonl")  # fmt: skip
    finally:
        gpu_decode.decodes_on = real


def _peer_loop(run, peer: str, forward: Callable, res: int) -> Callable[[Path], None]:
    """The peer's documented inference loop over a folder: DataLoader workers decode with PIL and apply the
    peer's transform, the model runs on the device."""
    import torch
    from torch.utils.data import DataLoader

    m = run.mode
    transform = _peer_transform(peer, res)

    def go(folder: Path) -> None:
        files = sorted(str(p) for p in folder.glob("*.jpg"))
        loader = DataLoader(_Files(files, transform), batch_size=m.batch, num_workers=m.workers,
                            pin_memory=m.device == "cuda")  # fmt: skip
        for pixels in loader:
            forward(None, pixels.to(m.device, non_blocking=True))
        if m.device == "cuda":
            torch.cuda.synchronize()

    return go


def _peer_transform(peer: str, res: int) -> Callable:
    if peer == "timm":
        from timm.data import create_transform

        return create_transform(
            input_size=(3, res, res), interpolation="bilinear", crop_pct=1.0, mean=(0.5,) * 3, std=(0.5,) * 3
        )
    import transformers

    processor = transformers.BitImageProcessor(size={"shortest_edge": res}, crop_size={"height": res, "width": res},
                                               image_mean=[0.5] * 3, image_std=[0.5] * 3)  # fmt: skip
    return lambda image: processor(image, return_tensors="pt")["pixel_values"][0]


class _Files:
    """A map-style data set of image files through a transform (picklable for worker processes)."""

    def __init__(self, files: list[str], transform: Callable) -> None:
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.files[i]) as im:
            return self.transform(im.convert("RGB"))
