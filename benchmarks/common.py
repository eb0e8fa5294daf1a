"""Shared pieces of the benchmarks: the test suite's random-weight R50x1 checkpoint, realistic images made from
the photos scikit-image and scikit-learn ship, the machine description, and contenders that each run in their
own process (so that one's allocator or thread settings cannot help or hurt another) and take turns."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the checkpoint recipe and photo list are the tests' own

from conftest import BIT50_PREPROCESSOR, SKIMAGE_PHOTOS, SKLEARN_PHOTOS, save_hf_model  # noqa: E402
from rss import own_peak_mib  # noqa: E402


def median(values: list[float]) -> float:
    return statistics.median(values)


def load() -> float:
    return os.getloadavg()[0]


def machine() -> dict:
    import PIL
    import timm
    import torch
    import torchvision
    import transformers

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
        platform.processor(),
    )
    flags = set(next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), []))
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else "MemTotal: 0 kB"
    mem_kb = int(meminfo.split("MemTotal:")[1].split()[0])
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "ram_gib": round(mem_kb / 2**20, 1),
        "simd": sorted(f for f in flags if f in {"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "avx_vnni"}),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "transformers": transformers.__version__,
        "timm": timm.__version__,
        "pillow": PIL.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def r50_checkpoint(workdir: Path) -> Path:
    """google/bit-50's layout, labels and preprocessing with the tests' perturbed random weights, saved by
    transformers; the head is scaled so that logits are spread like a trained model's (no near-ties in top-5)."""
    from bitcli.labels import imagenet_labels

    folder = workdir / "bit-50-random"
    if not (folder / "model.safetensors").is_file():
        labels = imagenet_labels()
        save_hf_model(
            folder, BIT50_PREPROCESSOR, head_scale=20.0,
            id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)},
        )  # fmt: skip
    return folder


def timm_copy(hf_folder: Path, workdir: Path) -> Path:
    """The same weights in timm's hub layout (bitcli's converter; the top-5 check in each run confirms it)."""
    from bitcli.formats.hf import read as read_hf
    from bitcli.formats.timm import write as write_timm

    folder = workdir / "bit-50-random-timm"
    if not (folder / "model.safetensors").is_file():
        write_timm(read_hf(hf_folder), folder)
    return folder


def photos() -> list:
    """The real photographs the tests use (cat, astronaut, coffee, rocket, motorcycle, retina, china, flower)."""
    import skimage.data
    import sklearn.datasets
    from PIL import Image

    paths = [Path(skimage.data.__file__).parent / n for n in SKIMAGE_PHOTOS]
    paths += [Path(sklearn.datasets.__file__).parent / "images" / n for n in SKLEARN_PHOTOS]
    return [Image.open(p).convert("RGB") for p in paths]


def realistic_images(n: int, seed: int = 0) -> list:
    """n variants of the photos: random crops (30-100% of the side), mirror images, some upscaled to phone-camera
    sizes. Distinct images with natural statistics, so agreement checks are not run on noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = photos()
    out = []
    for i in range(n):
        im = base[i % len(base)]
        w, h = im.size
        s = rng.uniform(0.3, 1.0) if i >= len(base) else 1.0
        cw, ch = max(32, int(w * s)), max(32, int(h * s))
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        im = im.crop((left, top, left + cw, top + ch))
        if rng.random() < 0.5:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if rng.random() < 0.5:  # many real inputs are large camera images; decoding them is part of the cost
            scale = 1600 / max(im.size)
            im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.BICUBIC)
        out.append(im)
    return out


def jpeg_folders(workdir: Path, n: int, batch_size: int) -> tuple[Path, Path]:
    """(a folder of n realistic JPEGs, a folder of its first batch_size), made once under workdir: end-to-end
    runs time both, so that the difference is n - batch_size images at the steady rate (start-up, model load
    and first-call costs cancel)."""
    import shutil

    full, first = workdir / f"jpegs-{n}", workdir / f"jpegs-{n}-first{batch_size}"
    if not full.is_dir():
        tmp = workdir / "jpegs.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for i, im in enumerate(realistic_images(n, seed=1)):
            im.save(tmp / f"img{i:03d}.jpg", quality=90)
        tmp.rename(full)
    if not first.is_dir():
        first.mkdir()
        for p in sorted(full.iterdir())[:batch_size]:
            shutil.copy(p, first / p.name)
    return full, first


def uint8_batch(images: list, preprocess) -> np.ndarray:
    """[B, H, W, 3] uint8 after the checkpoint's resize and crop: what `bit predict` feeds its model."""
    return np.stack([preprocess.to_uint8(im) for im in images])


class Contender:
    """One contender in its own Python process, answering JSON requests on a pipe. Only the one asked works;
    the others wait on a read, so taking turns gives each the whole machine."""

    def __init__(self, script: Path, role: str, args: dict) -> None:
        cmd = [sys.executable, str(script), "--serve", role, "--serve-args", json.dumps(args)]
        self.role = role
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        self.ready = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"contender {self.role} died (exit {self.proc.wait()}); see its stderr above")
        return json.loads(line)

    def ask(self, request: dict) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> dict:
        if self.proc.poll() is not None:  # already dead: its error is the one to see
            return {"peak_rss_mib": float("nan")}
        reply = self.ask({"cmd": "quit"})
        self.proc.wait()
        return reply


def matmul_server() -> None:
    """Contender role "matmul": the peak GEMM rate of this machine with torch's BLAS, median of torch.mm calls."""
    import time

    import torch

    def handle(request: dict) -> dict:
        n, dtype = request["n"], getattr(torch, request["dtype"])
        x, y = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        torch.mm(x, y)
        times = []
        for _ in range(request["repeats"]):
            t0 = time.perf_counter()
            torch.mm(x, y)
            times.append(time.perf_counter() - t0)
        return {"gflops": 2 * n**3 / median(times) / 1e9}

    serve(handle)


def matmul_peaks(script: Path, precision: str = "fp32") -> dict[str, float]:
    """fp32 GEMM peak at 4096^2, in a process of its own (`script --serve matmul` runs matmul_server); bf16 too
    for a bf16 run, at 1024^2 because a CPU without bf16 instructions runs bf16 matmuls about 60x slower."""
    peak = Contender(script.resolve(), "matmul", {})
    try:
        sizes = {"float32": 4096, **({"bfloat16": 1024} if precision == "bf16" else {})}
        return {d: peak.ask({"cmd": "mm", "n": n, "dtype": d, "repeats": 5})["gflops"] for d, n in sizes.items()}
    finally:
        peak.close()


def flops(hf: Path, resolution: int, train: bool = False) -> float:
    """FLOPs (multiply-adds x 2, convolutions and the head) of one image's forward, or forward and backward with
    train=True, counted by torch on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from bitcli.hub import load_checkpoint
    from bitcli.model import BitModel

    cfg = load_checkpoint(str(hf)).config
    with torch.device("meta"):
        model = BitModel(cfg).train(train)
        x = torch.empty(1, 3, resolution, resolution)
    with FlopCounterMode(display=False) as counter, torch.set_grad_enabled(train):
        out = model(x)
        if train:
            out.sum().backward()
    return counter.get_total_flops()


def serve(handler) -> None:
    """The contender side: `handler(request) -> reply` for each request line until "quit"; replies with peak RSS."""
    out = sys.stdout
    sys.stdout = sys.stderr  # stray prints from libraries must not corrupt the reply channel
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        request = json.loads(line)
        if request["cmd"] == "quit":
            out.write(json.dumps({"peak_rss_mib": own_peak_mib()}) + "\n")
            out.flush()
            return
        out.write(json.dumps(handler(request)) + "\n")
        out.flush()
