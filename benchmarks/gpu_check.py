"""One prepared check of every GPU path of bitcli, ready for the first machine with a CUDA GPU:

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/gpu_check.py --out gpu.json   # one CUDA GPU: < 8 minutes
    python3 benchmarks/gpu_check.py --cpu --out cpu.json    # the same code on the CPU, tiny sizes: under 2 minutes

from the checkout's root, with no network and no install of bitcli (it runs the bitcli of its own checkout).

It runs the real CLI (in this process, or in its own processes where a process is what is tested: a killed
fine-tuning run, torchrun) on models and JPEGs it makes itself, and checks:
  1. predict, eval and embed at fp32, bf16 and fp16 on an R50x1 converted from transformers, its head set to
     tell the test photos apart (photo_head) (agreement: top-1 between precisions and with the CPU's fp32,
     logit error) and an R101x3 (speed; random weights);
  2. GPU JPEG decoding (bitcli.gpu_decode) against the CPU path: pixel difference and top-1 agreement;
  3. a short `bit finetune` at bf16 and at fp16 (GradScaler): the loss falls and a killed run resumes
     bit-identical (where the GPU's kernels are not deterministic: as close as two uninterrupted runs, within
     RESUME_SPREAD); `bit finetune` under torchrun on every GPU, and NCCL collectives with DDP. On one GPU
     torchrun's world is 1, which bitcli runs as one process (no init_process_group): bitcli's own NCCL code
     runs only with >= 2 GPUs;
  4. `bit convert` to ONNX and `bit predict --model m.onnx` with onnxruntime's CUDA provider, if installed;
  5. images/s of bitcli against timm (channels_last + AMP) and transformers (AMP) at batch 64, 224 and 448 px,
     model only and end to end from JPEG files (gpu_peers.py).
It prints one table (check, PASS/FAIL/SKIP and why, numbers) and the throughput table, and writes both as JSON,
after every check (a killed run keeps its rows). Phases have budgets and the run a deadline (Mode); a watchdog
ends a run that hangs.
With --cpu, fp16 is skipped (bitcli refuses it on a CPU) and bf16 runs only on a CPU with bf16 instructions.
A missing timm, transformers or onnxruntime makes its rows SKIP, with the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# bitcli itself from this checkout (a machine without an editable install: `PYTHONPATH=.` is not needed), then
# common.py and gpu_peers.py, and the tests' conftest.py
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks"), str(ROOT / "tests")]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# `python -m bitcli` (a killed run, torchrun) from this checkout too, with what PYTHONPATH already held (packages
# carried to a machine that cannot install them)
SUBPROCESS_ENV = {**os.environ, "HF_HUB_OFFLINE": "1",
                  "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}  # fmt: skip
TINY = {"embedding_size": 16, "hidden_sizes": [32, 64], "depths": [1, 1], "num_groups": 8}
AGREEMENT = 0.99  # top-1 agreement between precisions and with the CPU (the bound)
DECODE_AGREEMENT = 0.995  # top-1 agreement of GPU decoding with the CPU path on real photos
# A GPU's kernels need not be deterministic (bitcli asks for deterministic ones on the CPU only): there a resumed
# run is judged against two uninterrupted runs, and may differ from one by at most this many times their spread.
# A resume that lost state (momentum, the loss scale, the data order) differs far more.
RESUME_SPREAD = 10.0


@dataclass(frozen=True)
class Mode:
    """What a run checks, at which sizes. GPU: the issue's models and sizes; CPU: tiny stand-ins."""

    name: str
    device: str
    precisions: tuple[str, ...]  # inference precisions that run (fp32 first)
    skipped: dict[str, str]  # precisions that do not run here, and why
    agree_res: int  # the agreement model's resize and crop
    big: str  # the speed model's architecture (random weights)
    images: int  # agreement images
    batch: int
    resolutions: tuple[int, ...]  # throughput table
    e2e_images: int
    workers: int
    finetune: tuple[str, ...]  # fine-tuning precisions
    finetune_args: tuple[str, ...]
    steps: int
    budgets: dict[str, float]  # seconds per phase
    deadline: float  # seconds for the whole run: no check starts after it (each phase's budget counts too)
    watchdog: float  # seconds after which a hung run prints every thread's traceback and exits (faulthandler)


def gpu_mode() -> Mode:
    import torch

    bf16 = torch.cuda.is_bf16_supported()
    return Mode(
        name="gpu", device="cuda", precisions=("fp32", "bf16", "fp16") if bf16 else ("fp32", "fp16"),
        skipped={} if bf16 else {"bf16": "this GPU has no bf16"}, agree_res=448, big="R101x3", images=256,
        batch=64, resolutions=(224, 448), e2e_images=512, workers=min(8, os.cpu_count() or 1),
        finetune=("bf16", "fp16") if bf16 else ("fp16",),
        finetune_args=("--resolution", "128", "--batch-size", "32", "--lr", "0.01", "--workers", "4"), steps=24,
        # 430 s in all: a check that starts before its phase's budget is spent runs to its end (its processes
        # are stopped at the run's deadline), so no check starts after 450 s, and a run still going at 540 s
        # (a hang inside this process) is stopped by the watchdog: inside the device's 600 s per command
        budgets={"setup": 45, "inference": 85, "decode": 25, "finetune": 120, "onnx": 60, "throughput": 95},
        deadline=450, watchdog=540,
    )  # fmt: skip


def cpu_mode() -> Mode:
    import torch

    from bitcli.runtime import bf16_supported

    bf16 = bf16_supported(torch.device("cpu"))
    skipped = {"fp16": "bitcli refuses fp16 on a CPU (--cpu mode)"}
    if not bf16:
        skipped["bf16"] = "this CPU has no bf16 instructions (emulated bf16 is slow): --cpu mode runs fp32 only"
    return Mode(
        name="cpu", device="cpu", precisions=("fp32", "bf16") if bf16 else ("fp32",), skipped=skipped, agree_res=64,
        big="small", images=16, batch=8, resolutions=(32, 64), e2e_images=24, workers=2, finetune=("fp32",),
        finetune_args=("--random-init", "--model", json.dumps(TINY), "--resolution", "16", "--batch-size", "8",
                       "--lr", "0.03", "--workers", "1"), steps=16,
        budgets={"setup": 15, "inference": 25, "decode": 8, "finetune": 30, "onnx": 20, "throughput": 15},
        deadline=240, watchdog=285,  # tests/test_gpu_check.py gives the process 300 s
    )  # fmt: skip


@dataclass
class Check:
    check: str
    status: str  # PASS, FAIL or SKIP
    reason: str = ""
    numbers: dict = field(default_factory=dict)


class Run:
    """The checks so far, the phases' clocks, and where the files go. Every check's row is written to `out` as it
    is added (a run killed later keeps what it measured; "complete" says whether the run got to its end)."""

    def __init__(self, mode: Mode, workdir: Path, out: Path | None = None) -> None:
        self.mode, self.workdir, self.out, self.checks = mode, workdir, out, []
        self.throughput: list[dict] = []
        self.started = time.monotonic()
        self.run_deadline = self.started + mode.deadline
        self.machine = machine()  # before any check: the TF32 flags as torch set them, not as a run left them
        self.phase, self.deadline = "", float("inf")
        self.phases: dict[str, dict] = {}
        self.cpu_top1: list[int] | None = None  # the agreement model's top-1 in fp32 on the CPU

    def begin(self, phase: str) -> None:
        self.end()
        self.phase, self.deadline = phase, time.monotonic() + self.mode.budgets[phase]
        self.phase_started, self.cpu_started = time.monotonic(), _cpu_seconds()
        print(f"== {phase} (budget {self.mode.budgets[phase]:.0f} s)", flush=True)

    def end(self) -> None:
        """Records the phase's wall time and CPU time (this process and its children)."""
        if self.phase:
            self.phases[self.phase] = {"seconds": round(time.monotonic() - self.phase_started, 1),
                                       "cpu_seconds": round(_cpu_seconds() - self.cpu_started, 1)}  # fmt: skip

    def left(self) -> float:
        """Seconds left to the phase: its budget, and no later than the run's deadline."""
        return min(self.deadline, self.run_deadline) - time.monotonic()

    def spent(self) -> str:
        """Which budget is spent, in words (the SKIP's reason)."""
        if time.monotonic() >= self.run_deadline:
            return f"the run's {self.mode.deadline:.0f}-s budget is spent"
        return f"the {self.phase} phase's {self.mode.budgets[self.phase]:.0f}-s budget is spent"

    def add(self, check: str, status: str, reason: str = "", **numbers) -> None:
        self.checks.append(Check(check, status, reason, numbers))
        print(f"  {status:4s} {check}  {reason}  {_short(numbers)}", flush=True)
        self.save()

    def results(self, complete: bool = False) -> dict:
        return {"mode": self.mode.name, "complete": complete, "machine": self.machine,
                "seconds": round(time.monotonic() - self.started, 1), "phases": self.phases,
                "checks": [vars(c) for c in self.checks], "throughput": self.throughput}  # fmt: skip

    def save(self, complete: bool = False) -> dict:
        """The results so far, written to `out` (replaced whole: a reader never sees half a file)."""
        results = self.results(complete)
        if self.out is not None:
            part = self.out.with_name(self.out.name + ".part")
            part.write_text(json.dumps(results, indent=2) + "\n")
            os.replace(part, self.out)
        return results

    def guarded(self, check: str, body: Callable[[], None]) -> bool:
        """Runs one check; an exception is its FAIL (with the reason), a spent phase or run budget its SKIP.
        Whether it ran to its end without an exception."""
        if self.left() <= 0:
            self.add(check, "SKIP", self.spent())
            return False
        try:
            body()
            return True
        except subprocess.TimeoutExpired as exc:  # its processes ran out of the phase's time
            if self.mode.name == "cpu":  # a loaded CPU machine (CI): as if the budget was spent before it began
                self.add(check, "SKIP", f"{self.spent()} (stopped after {exc.timeout:.0f} s)")
            else:  # a GPU's budgets leave room: a hang (NCCL) or a budget to raise, either way worth a look
                self.add(check, "FAIL", f"timed out after {exc.timeout:.0f} s")
        except Exception as exc:  # noqa: BLE001 -- a check that breaks is a FAIL with its reason, the others go on
            self.add(
                check,
                "FAIL",
                f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else ''}",
            )
        return False


def _cpu_seconds() -> float:
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _short(numbers: dict) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in numbers.items())


def bit(*args: object) -> str:
    """`bit ARGS` in this process; its stdout. A non-zero exit is an error carrying its stderr's last line."""
    from conftest import run_main

    code, out, err = run_main(*args)
    if code != 0:
        raise RuntimeError(f"bit {args[0]} exited {code}: {err.strip().splitlines()[-1] if err.strip() else ''}")
    return out


# ----------------------------------------------------------------------------------------------------------
# Setup: models and images


@dataclass
class Models:
    agree: Path  # converted from transformers, with photo_head: top-1 is a real decision, so agreement means something
    agree_hf: Path | None  # its transformers source (None when transformers is missing)
    big: Path  # the speed model, random weights
    labels: list[str]


def make_models(run: Run) -> Models:
    m, folder = run.mode, run.workdir / "models"
    folder.mkdir(exist_ok=True)
    agree, hf = folder / "agree.safetensors", folder / "agree-hf"
    converted = folder / "agree-converted.safetensors"
    try:
        import transformers  # noqa: F401
    except ImportError:
        hf = None
    if hf is not None and not converted.exists():
        from common import BIT50_PREPROCESSOR, save_hf_model

        if m.name == "gpu":
            from bitcli.labels import imagenet_labels

            labels = imagenet_labels()
            save_hf_model(hf, BIT50_PREPROCESSOR, head_scale=20.0, id2label=dict(enumerate(labels)),
                          label2id={n: i for i, n in enumerate(labels)})  # fmt: skip
        else:
            pre = {**BIT50_PREPROCESSOR, "size": {"shortest_edge": m.agree_res},
                   "crop_size": {"height": m.agree_res, "width": m.agree_res}}  # fmt: skip
            save_hf_model(hf, pre, head_scale=20.0, num_labels=10, **TINY)
        bit("convert", hf, converted, "--overwrite")
    elif hf is None and not converted.exists():  # no transformers: bitcli's own random model
        write_random(converted, "R50x1" if m.name == "gpu" else "tiny", m.agree_res, run)
    if not agree.exists():
        photo_head(run, converted, agree)
    big = folder / f"{m.big}.safetensors"
    if not big.exists():
        write_random(big, m.big, m.agree_res, run)
    from bitcli.hub import load_checkpoint

    return Models(agree, hf, big, load_checkpoint(str(agree)).labels)


def photo_head(run: Run, source: Path, out: Path) -> None:
    """`source` with a head that tells the photos apart, written to `out`. A random network's pooled features
    differ little between images, so its head picks one class for every image (top-1 agreement would then
    mean nothing). Here class c (c < 8) is photo c: its row is the photo's centred features, the other classes'
    rows are random directions half as long (they rarely win), the bias removes the mean, and the logits are
    scaled to a trained model's spread. The agreement images are crops of these photos: a real decision, with
    margins, as a trained model's."""
    import dataclasses

    import torch
    from common import photos

    from bitcli.engine import load_engine
    from bitcli.formats import bitcli as bitcli_format
    from bitcli.formats.tensors import TensorRef
    from bitcli.hub import load_checkpoint

    ckpt = load_checkpoint(str(source))
    engine = load_engine(ckpt, torch.device(run.mode.device), torch.float32)
    batch = np.stack([ckpt.preprocess.to_uint8(im) for im in photos()])
    features = engine.features(batch).double().cpu()
    mean = features.mean(0)
    centred = features - mean
    classes = ckpt.config.num_classes
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(classes, features.shape[1], generator=gen, dtype=torch.float64)
    weight *= 0.5 * centred.norm(dim=1).mean() / weight.norm(dim=1, keepdim=True)
    kept = min(classes, len(centred))
    weight[:kept] = centred[:kept]
    weight *= 5.0 / (centred @ weight.T).std()
    head = {"head.weight": weight.float(), "head.bias": -(weight @ mean).float()}
    tensors = dict(ckpt.tensors)
    for key, value in head.items():
        tensors[key] = TensorRef(tuple(value.shape), value.dtype, lambda v=value: v)
    bitcli_format.write(dataclasses.replace(ckpt, tensors=tensors), out)


def write_random(path: Path, arch: str, res: int, run: Run) -> None:
    """A random-weight model of architecture `arch` (built on the run's device: an R101x3 has 388 M weights),
    its logits spread like a trained model's, as a bitcli file."""
    import torch

    from bitcli.architectures import from_name
    from bitcli.formats import bitcli as bitcli_format
    from bitcli.formats.checkpoint import Checkpoint
    from bitcli.formats.tensors import TensorRef
    from bitcli.model import BitModel
    from bitcli.preprocess import Preprocess

    config = from_name(arch, 1000 if run.mode.name == "gpu" else 10)
    gen = torch.Generator(run.mode.device).manual_seed(0)
    with torch.device(run.mode.device), torch.no_grad():
        model = BitModel(config)
        for _, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen, device=run.mode.device)
            p.copy_(p + 0.1 * noise if p.ndim == 1 else 0.05 * noise)
        model.head.weight.mul_(20.0)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    tensors = {k: TensorRef(tuple(v.shape), v.dtype, lambda v=v: v) for k, v in state.items()}
    labels = [f"class_{i}" for i in range(config.num_classes)]
    ckpt = Checkpoint(config, labels, Preprocess(resize=res, crop=(res, res)), tensors, source=arch)
    bitcli_format.write(ckpt, path)


def write_jpegs(folder: Path, n: int, seed: int, max_side: int | None = None) -> list[Path]:
    """n realistic JPEGs (crops, mirror images, camera sizes) from the real photos, made once."""
    from concurrent.futures import ThreadPoolExecutor

    from common import realistic_images

    done = folder / ".done"
    if not done.exists():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        images = realistic_images(n, seed=seed)

        def save(item: tuple[int, object]) -> None:
            i, im = item
            if max_side and max(im.size) > max_side:
                im = im.resize(
                    (max(1, im.width * max_side // max(im.size)), max(1, im.height * max_side // max(im.size)))
                )
            im.save(folder / f"img{i:04d}.jpg", quality=90)

        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            list(pool.map(save, enumerate(images)))
        done.touch()
    return sorted(folder.glob("*.jpg"))


def class_folder(root: Path, labels: list[str], per_class: int, side: int) -> Path:
    """Crops of one photo per class, named by the model's first labels (for bit eval) or by the photo."""
    from common import photos

    if not root.exists():
        rng = np.random.default_rng(5)
        for label, photo in zip(labels, photos()):
            (root / label).mkdir(parents=True)
            w, h = photo.size
            for i in range(per_class):
                s = rng.uniform(0.5, 1.0)
                cw, ch = int(w * s), int(h * s)
                left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
                crop = photo.crop((left, top, left + cw, top + ch)).resize((side, side))
                crop.save(root / label / f"{i:03d}.jpg", quality=90)
    return root


# ----------------------------------------------------------------------------------------------------------
# 1. predict, eval and embed at every precision


def inference(run: Run, models: Models, images: Path, evalset: Path) -> None:
    m = run.mode
    for name, model in (("agree", models.agree), (m.big, models.big)):
        top1: dict[str, list[int]] = {}
        for precision in ("fp32", "bf16", "fp16"):
            check = f"inference:{name}:{precision}"
            if precision in m.skipped:
                run.add(check, "SKIP", m.skipped[precision])
                continue
            run.guarded(check, lambda p=precision, c=check, f=model, t=top1: _infer(run, c, f, p, images, evalset, t))
        if name == "agree":
            run.guarded("agreement:agree", lambda f=model, t=top1: _agreement(run, f, images, t))


def _infer(run: Run, check: str, model: Path, precision: str, images: Path, evalset: Path, top1: dict) -> None:
    m, out = run.mode, run.workdir / "out"
    out.mkdir(exist_ok=True)
    common = ["--model", model, "--device", m.device, "--precision", precision, "--batch-size", m.batch]
    t0 = time.perf_counter()
    rows = bit("predict", images, *common, "--format", "jsonl", "-k", "1", "--workers", m.workers)
    seconds = time.perf_counter() - t0
    top1[precision] = [json.loads(line)["predictions"][0]["index"] for line in rows.splitlines()]
    accuracy = json.loads(bit("eval", evalset, *common, "--format", "json"))
    bit("embed", images, *common, "--output", out / f"{model.stem}-{precision}.npy", "--workers", m.workers)
    features = np.load(out / f"{model.stem}-{precision}.npy")
    numbers = {"images": len(top1[precision]), "predict_s": round(seconds, 2), "eval_top1": accuracy["top1"]}
    if precision != "fp32" and "fp32" in top1:
        numbers["top1_vs_fp32"] = _same(top1[precision], top1["fp32"])
        ref = np.load(out / f"{model.stem}-fp32.npy")
        numbers["embed_rel_err"] = float(np.abs(features - ref).max() / max(np.abs(ref).max(), 1e-12))
        numbers["logit_err"] = _logit_error(run, model, precision, images)
    ok = features.shape[0] == numbers["images"] and np.isfinite(features).all()
    run.add(check, "PASS" if ok else "FAIL", "" if ok else "embeddings missing or not finite", **numbers)


def _logit_error(run: Run, model: Path, precision: str, images: Path) -> float:
    """max |logit - fp32 logit| / max |fp32 logit| over the first batch, through the engine (same pixels)."""
    import torch

    from bitcli.engine import load_engine
    from bitcli.hub import load_checkpoint
    from bitcli.inputs import decode

    ckpt = load_checkpoint(str(model))
    batch = np.stack([decode(str(p), ckpt.preprocess) for p in sorted(images.glob("*.jpg"))[: run.mode.batch]])
    device = torch.device(run.mode.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    with no_tf32():  # the fp32 reference in fp32, not TF32 (torch's default for convolutions on CUDA)
        ref = load_engine(ckpt, device, torch.float32).logits(batch).cpu()
    low = load_engine(ckpt, device, dtype).logits(batch).cpu()
    return float((low - ref).abs().max() / ref.abs().max())


def _same(a: list[int], b: list[int]) -> float:
    return sum(x == y for x, y in zip(a, b)) / max(len(a), 1)


def _agreement(run: Run, model: Path, images: Path, top1: dict[str, list[int]]) -> None:
    """Top-1 of every precision against the device's fp32 and against fp32 on the CPU (the PIL path)."""
    if "fp32" not in top1:
        raise RuntimeError("fp32 did not run")
    cpu = top1["fp32"]
    if run.mode.device != "cpu":
        rows = bit("predict", images, "--model", model, "--device", "cpu", "--precision", "fp32", "--format", "jsonl",
                   "-k", "1", "--batch-size", run.mode.batch, "--workers", run.mode.workers)  # fmt: skip
        cpu = [json.loads(line)["predictions"][0]["index"] for line in rows.splitlines()]
    numbers = {f"{p}_vs_cpu_fp32": _same(t, cpu) for p, t in top1.items()}
    numbers.update({f"{p}_vs_fp32": _same(t, top1["fp32"]) for p, t in top1.items() if p != "fp32"})
    numbers["classes_seen"] = len(set(cpu))
    run.cpu_top1 = cpu  # the reference of the ONNX export too
    worst = min(numbers[k] for k in numbers if k.endswith("fp32"))
    run.add("agreement:agree", "PASS" if worst >= AGREEMENT else "FAIL",
            "" if worst >= AGREEMENT else f"top-1 agreement {worst:.3f} < {AGREEMENT}", **numbers)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# 2. GPU decoding against the CPU path


def decoding(run: Run, models: Models, images: Path) -> None:
    import torch

    from bitcli.engine import load_engine
    from bitcli.gpu_decode import DeviceDecoder, Encoded, file_bytes
    from bitcli.hub import load_checkpoint
    from bitcli.inputs import path_decoder

    device = torch.device(run.mode.device)
    ckpt = load_checkpoint(str(models.agree))
    engine = load_engine(ckpt, device, torch.float32)
    paths = [str(p) for p in sorted(images.glob("*.jpg"))]
    cpu_decode = path_decoder(ckpt.preprocess)
    decoder = DeviceDecoder(ckpt.preprocess, device, cpu_decode, file_bytes)
    t0 = time.perf_counter()
    prepared = [decoder.prepare(p) for p in paths]
    on_device = torch.stack(decoder.finish(prepared))
    if device.type == "cuda":
        torch.cuda.synchronize()
    t_device = time.perf_counter() - t0
    t0 = time.perf_counter()
    on_cpu = np.stack([cpu_decode(p) for p in paths])
    t_cpu = time.perf_counter() - t0
    diff = (on_device.cpu().int() - torch.from_numpy(on_cpu.astype(np.int32))).abs()
    top_device, top_cpu = [], []
    for i in range(0, len(paths), run.mode.batch):
        top_device += engine.logits(on_device[i : i + run.mode.batch]).argmax(1).tolist()
        top_cpu += engine.logits(on_cpu[i : i + run.mode.batch]).argmax(1).tolist()
    agree = _same(top_device, top_cpu)
    numbers = {"images": len(paths), "on_device": sum(isinstance(p, Encoded) for p in prepared),
               "max_pixel_diff": int(diff.max()), "mean_pixel_diff": float(diff.float().mean()),
               "pixels_differing": float((diff > 0).float().mean()), "top1_agreement": agree,
               "device_s": round(t_device, 3), "cpu_1thread_s": round(t_cpu, 3), "device": str(device)}  # fmt: skip
    ok = agree >= DECODE_AGREEMENT and numbers["on_device"] == len(paths)
    run.add("gpu-decode", "PASS" if ok else "FAIL",
            "" if ok else f"top-1 agreement {agree:.3f} < {DECODE_AGREEMENT} or files left on the CPU", **numbers)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# 3. fine-tuning: the loss falls, a killed run resumes bit-identical, torchrun


def finetuning(run: Run, models: Models, data: Path) -> None:
    m = run.mode
    for precision in ("fp32", "bf16", "fp16"):
        check = f"finetune:{precision}"
        if precision not in m.finetune:
            reason = m.skipped.get(precision) or "the GPU check fine-tunes at bf16 and fp16 (fp32 is the CPU's)"
            run.add(check, "SKIP", reason)
            continue
        run.guarded(check, lambda p=precision: _finetune(run, models, data, p))
    run.guarded("torchrun", lambda: _torchrun(run, models, data))
    run.guarded("distributed-smoke", lambda: _distributed_smoke(run))


def _finetune_args(run: Run, models: Models, data: Path, output: Path, precision: str) -> list:
    m = run.mode
    start = [] if m.name == "cpu" else ["--model", models.agree]
    save_every = _save_every(run)
    return ["finetune", data, "--output", output, *start, *m.finetune_args, "--steps", m.steps, "--precision",
            precision, "--device", m.device, "--eval-every", "0", "--save-every", save_every, "--mixup", "0"]  # fmt: skip


def _save_every(run: Run) -> int:
    return 1 if run.mode.name == "cpu" else 4  # an R50's checkpoint is 200 MB: not at every step


def _kill_step(run: Run) -> int:
    """After how many logged steps the run to resume is killed: a third of the run past its first checkpoint,
    so that a checkpoint exists and steps after it are lost (and redone by the resume)."""
    kill = _save_every(run) + run.mode.steps // 3
    if kill >= run.mode.steps:
        raise RuntimeError(f"--steps {run.mode.steps} is too few to kill a run after step {kill} (--save-every "
                           f"{_save_every(run)} + a third of the steps) and resume it")  # fmt: skip
    return kill


def _finetune(run: Run, models: Models, data: Path, precision: str) -> None:
    straight, killed = run.workdir / f"ft-{precision}-straight", run.workdir / f"ft-{precision}-killed"
    kill_step = _kill_step(run)
    for folder in (straight, killed):
        shutil.rmtree(folder, ignore_errors=True)
    with one_thread():
        bit(*_finetune_args(run, models, data, straight, precision))
        losses = [json.loads(line)["loss"] for line in (straight / "metrics.jsonl").read_text().splitlines()]
        killed_at = _kill_after(run, _finetune_args(run, models, data, killed, precision), kill_step)
        bit(*_finetune_args(run, models, data, killed, precision), "--resume")
    quarter = max(1, len(losses) // 4)
    first, last = float(np.mean(losses[:quarter])), float(np.mean(losses[-quarter:]))
    difference = _weight_difference(straight, killed)
    numbers = {"steps": len(losses), "loss_first": first, "loss_last": last, "killed_at_step": killed_at,
               "resumed_max_abs_diff": difference}  # fmt: skip
    reasons, note = [], ""
    if not last < first:
        reasons.append(f"the loss did not fall ({first:.4f} -> {last:.4f})")
    if difference != 0.0:
        again = run.workdir / f"ft-{precision}-again"
        shutil.rmtree(again, ignore_errors=True)
        with one_thread():
            bit(*_finetune_args(run, models, data, again, precision))
        spread = numbers["rerun_max_abs_diff"] = _weight_difference(straight, again)
        if spread == 0.0 or run.mode.device == "cpu":
            reasons.append("resumed weights differ from the uninterrupted run's, which a rerun repeats exactly")
        elif difference > RESUME_SPREAD * spread:
            reasons.append(f"resumed weights differ by {difference:.3g}, more than {RESUME_SPREAD:g}x the {spread:.3g} "
                           "between two uninterrupted runs")  # fmt: skip
        else:
            note = "not bit-identical: this GPU's kernels are not deterministic (two uninterrupted runs differ too)"
    run.add(f"finetune:{precision}", "FAIL" if reasons else "PASS", "; ".join(reasons) or note, **numbers)


@contextlib.contextmanager
def one_thread():
    """In-process runs compared with a killed process's use one intra-op thread, as that process does
    (results are bit-identical for the same thread count)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _kill_after(run: Run, args: list, steps: int) -> int:
    """Starts `bit ARGS` in its own process and SIGKILLs it once it has logged `steps` steps; the step its
    checkpoint resumes from."""
    env = {**SUBPROCESS_ENV, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "bitcli", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=env, cwd=ROOT)  # fmt: skip
    metrics = Path(args[args.index("--output") + 1]) / "metrics.jsonl"
    deadline = time.monotonic() + max(run.left(), 10)
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_bytes().count(b"\n") >= steps:
            break
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    code = proc.wait()
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if code != -signal.SIGKILL:
        raise RuntimeError(f"the run to kill ended by itself (exit {code}) before step {steps}: {err[-300:]}")
    from bitcli.formats import read_safetensors

    _, meta = read_safetensors(metrics.parent / "checkpoint.safetensors")
    return json.loads(meta["state"])["next_step"]


def _weight_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    if wa.keys() != wb.keys():
        raise RuntimeError("the two runs saved different tensors")
    return max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa)


def _torchrun(run: Run, models: Models, data: Path) -> None:
    """`torchrun --nproc_per_node N -m bitcli finetune` (N: every GPU, NCCL; on one GPU a world of 1), against
    one process with the same global batch."""
    import torch

    m = run.mode
    nproc = torch.cuda.device_count() if m.device == "cuda" else 1
    precision = m.finetune[0]
    one, many = run.workdir / f"ft-{precision}-straight", run.workdir / "ft-torchrun"
    shutil.rmtree(many, ignore_errors=True)
    args = _finetune_args(run, models, data, many, precision)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "bitcli", *map(str, args)]  # fmt: skip
    done = run_group(cmd, {**SUBPROCESS_ENV, "OMP_NUM_THREADS": "1"}, timeout=max(run.left(), 30))
    if done.returncode != 0:
        raise RuntimeError(f"torchrun exited {done.returncode}: {done.stderr.strip()[-300:]}")
    if not (one / "model.safetensors").exists():
        raise RuntimeError(f"no one-process run of {precision} to compare with")
    difference = _weight_difference(one, many)
    plan = json.loads((many / "finetune_config.json").read_text())
    # One process on the CPU: the same computation, bit for bit. Several processes reduce gradients in another
    # order, and a GPU's kernels need not be deterministic (finetune:* says whether they are).
    tolerance = 0.0 if nproc == 1 and m.device == "cpu" else 1e-2
    ok = difference <= tolerance
    backend = (
        "nccl"
        if m.device == "cuda" and nproc > 1
        else ("none: a world of 1 runs as one process" if nproc == 1 else "gloo")
    )
    run.add("torchrun", "PASS" if ok else "FAIL", "" if ok else f"weights differ by {difference:.3g} from one process",
            processes=nproc, world_size=plan["world_size"], backend=backend, max_abs_diff=difference)  # fmt: skip


def run_group(cmd: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """`cmd` (torchrun: an agent and its workers) in its own process group; on timeout the whole group is
    killed, not only the agent, and TimeoutExpired raised."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                            start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _distributed_smoke(run: Run) -> None:
    """NCCL (gloo on the CPU) under torchrun on every GPU: all_reduce, all_gather_object and one
    DistributedDataParallel step of a BiT through bitcli.distributed.wrap (`--serve dist-smoke`)."""
    import torch

    nproc = torch.cuda.device_count() if run.mode.device == "cuda" else 1
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(Path(__file__).resolve()), "--serve", "dist-smoke", "--device", run.mode.device]  # fmt: skip
    done = run_group(cmd, SUBPROCESS_ENV, timeout=max(run.left(), 30))
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"exit {done.returncode}: {done.stderr.strip()[-300:]}")
    result = json.loads(lines[-1])
    run.add("distributed-smoke", "PASS" if result["ok"] else "FAIL", result.get("reason", ""), **result["numbers"])


def dist_smoke(device_kind: str) -> None:
    """One process of the distributed smoke test (started by torchrun)."""
    import torch
    import torch.distributed as dist

    from bitcli.distributed import Dist, wrap
    from bitcli.finetune.start import random_init_config
    from bitcli.model import BitModel

    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    device = torch.device("cuda", local) if device_kind == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend)
    t = torch.full((4,), float(rank + 1), device=device)
    dist.all_reduce(t)
    gathered: list = [None] * world
    dist.all_gather_object(gathered, {"rank": rank})
    torch.manual_seed(0)
    model = BitModel(random_init_config("tiny", 3)).to(device).train()
    ddp = wrap(model, Dist(rank, world, local), device) if world > 1 else torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)  # fmt: skip
    x = torch.randn(4, 3, 32, 32, device=device, generator=torch.Generator(device).manual_seed(rank))
    torch.nn.functional.cross_entropy(ddp(x), torch.tensor([0, 1, 2, 0], device=device)).backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    first = grads.clone()
    dist.broadcast(first, 0)
    expected = world * (world + 1) / 2
    ok = bool(torch.allclose(t, torch.full_like(t, expected))) and [g["rank"] for g in gathered] == list(range(world))
    ok = ok and bool(torch.isfinite(grads).all()) and bool(torch.equal(first, grads))  # DDP averaged the same
    if rank == 0:
        print(json.dumps({"ok": ok, "reason": "" if ok else "a collective gave a wrong value",
                          "numbers": {"backend": backend, "world_size": world, "all_reduce": float(t[0])}}))  # fmt: skip
    dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------
# 4. ONNX


def onnx(run: Run, models: Models, images: Path) -> None:
    try:
        import onnxruntime as ort
    except ImportError:
        run.add("onnx-export", "SKIP", "onnxruntime is not installed (pip install 'bitcli[onnx]')")
        run.add("onnx-cuda", "SKIP", "onnxruntime is not installed")
        return
    graph = run.workdir / "models" / "agree.onnx"
    state: dict = {}

    def export() -> None:
        t0 = time.perf_counter()
        bit("convert", models.agree, graph, "--overwrite")
        state["cpu"] = _top1(
            bit("predict", images, "--model", graph, "--device", "cpu", "--format", "jsonl", "-k", "1")
        )
        torch_top1 = run.cpu_top1 or _top1(
            bit("predict", images, "--model", models.agree, "--device", "cpu", "--format", "jsonl", "-k", "1")
        )
        agree = _same(state["cpu"], torch_top1)
        run.add("onnx-export", "PASS" if agree >= AGREEMENT else "FAIL", "",
                seconds=round(time.perf_counter() - t0, 1), cpu_provider_vs_torch=agree)  # fmt: skip

    run.guarded("onnx-export", export)
    if run.mode.device != "cuda":
        run.add("onnx-cuda", "SKIP", "--cpu mode: onnxruntime's CUDA provider needs a GPU")
    elif "CUDAExecutionProvider" not in ort.get_available_providers():
        run.add(
            "onnx-cuda",
            "SKIP",
            f"this onnxruntime ({ort.__version__}) has no CUDA provider (pip install onnxruntime-gpu)",
        )
    elif "cpu" in state:

        def on_cuda() -> None:
            from conftest import run_main

            with sessions_seen() as seen:
                code, out, err = run_main(
                    "predict", images, "--model", graph, "--device", "cuda", "--format", "jsonl", "-k", "1"
                )
            if code != 0 or "no CUDA support" in err:
                raise RuntimeError(err.strip()[-300:])
            # onnxruntime falls back to the CPU when its CUDA provider does not start: then the rate and the
            # agreement are the CPU's, and this row must not pass
            first = [s.get_providers()[0] for s in seen]
            agree = _same(_top1(out), state["cpu"])
            ok = first == ["CUDAExecutionProvider"] and agree >= AGREEMENT
            reason = "" if ok else f"sessions ran on {first or 'nothing'}; top-1 agreement {agree:.3f}"
            run.add("onnx-cuda", "PASS" if ok else "FAIL", reason, cuda_vs_cpu_provider=agree, providers=first)

        run.guarded("onnx-cuda", on_cuda)
    else:
        run.add("onnx-cuda", "SKIP", "the export failed")


@contextlib.contextmanager
def sessions_seen():
    """Every onnxruntime session bitcli makes meanwhile (bitcli.onnx_engine.session is where it makes them)."""
    from bitcli import onnx_engine

    made: list = []
    real = onnx_engine.session

    def recorded(model, device, name):
        made.append(real(model, device, name))
        return made[-1]

    onnx_engine.session = recorded
    try:
        yield made
    finally:
        onnx_engine.session = real


def _top1(jsonl: str) -> list[int]:
    return [json.loads(line)["predictions"][0]["index"] for line in jsonl.splitlines()]


# ----------------------------------------------------------------------------------------------------------
# The run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="run everything on the CPU with tiny sizes (< 2 minutes)")
    p.add_argument("--out", type=Path, help="write the results here as JSON")
    p.add_argument("--workdir", type=Path, help="models, images and runs (default: a fresh temporary folder)")
    p.add_argument("--serve", help=argparse.SUPPRESS)
    p.add_argument("--device", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve == "dist-smoke":
        dist_smoke(args.device)
        return
    import tempfile

    import torch

    if not args.cpu and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA GPU here; run with --cpu to check the same code on the CPU")
    mode = cpu_mode() if args.cpu else gpu_mode()
    # A hang inside this process (a CUDA call, a DataLoader worker) has no timeout of its own: the watchdog
    # prints every thread's traceback and ends the process; the JSON so far is already written.
    faulthandler.dump_traceback_later(mode.watchdog, exit=True)
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu-check-")))
        workdir.mkdir(parents=True, exist_ok=True)
        results = check_all(Run(mode, workdir, args.out))
    faulthandler.cancel_dump_traceback_later()
    sys.exit(1 if any(c["status"] == "FAIL" for c in results["checks"]) else 0)


@dataclass
class Inputs:
    """What setup makes: the models, the agreement JPEGs and the two class folders."""

    models: Models
    images: Path
    evalset: Path
    trainset: Path


def setup(run: Run) -> Inputs:
    m = run.mode
    t0 = time.perf_counter()
    models = make_models(run)
    images = run.workdir / "agree-images"
    write_jpegs(images, m.images, seed=2, max_side=None if m.name == "gpu" else 320)
    evalset = class_folder(run.workdir / "evalset", models.labels[:3], 4, 2 * m.agree_res)
    trainset = class_folder(run.workdir / "trainset", ["cat", "astronaut", "coffee", "rocket"], 16 if m.name == "gpu" else 8,
                            160 if m.name == "gpu" else 24)  # fmt: skip
    run.add("setup", "PASS", "", seconds=round(time.perf_counter() - t0, 1), agree_from_transformers=models.agree_hf is not None)  # fmt: skip
    return Inputs(models, images, evalset, trainset)


def check_all(run: Run) -> dict:
    """Every check in turn; the table is printed (and the JSON written) whatever happens, a failed setup
    included (the checks after it need its models and images: they do not run)."""
    from gpu_peers import throughput

    made: list[Inputs] = []
    try:
        run.begin("setup")
        run.guarded("setup", lambda: made.append(setup(run)))
        if made:
            models, images = made[0].models, made[0].images
            run.begin("inference")
            inference(run, models, images, made[0].evalset)
            run.begin("decode")
            run.guarded("gpu-decode", lambda: decoding(run, models, images))
            run.begin("finetune")
            finetuning(run, models, made[0].trainset)
            run.begin("onnx")
            onnx(run, models, images)
            run.begin("throughput")
            run.guarded("throughput", lambda: throughput(run, models))
        run.end()
        results = run.save(complete=bool(made))
        report(results)
        return results
    except BaseException:  # an exception outside every check (a bug here, ^C): still the table of what ran
        report(run.save())
        raise


def machine() -> dict:
    import platform

    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cores": os.cpu_count()}
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    info["cpu"] = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
        platform.processor(),
    )
    if torch.cuda.is_available():
        info["gpu"] = f"{torch.cuda.get_device_name()} x{torch.cuda.device_count()}"
        info["cuda"] = torch.version.cuda
    for name in ("torchvision", "timm", "transformers", "onnxruntime", "huggingface_hub"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    import bitcli

    info["bitcli"] = str(Path(bitcli.__file__).parent)  # this checkout's, not an installed copy's
    info["tf32"] = tf32_flags()
    return info


def tf32_flags() -> dict:
    """Whether float32 convolutions (cuDNN) and matrix products may run in TF32 (torch's defaults: yes and no;
    bitcli's --precision fp32 on CUDA turns both off, bitcli.runtime.exact_fp32)."""
    import torch

    try:
        return {"cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                "float32_matmul_precision": torch.get_float32_matmul_precision()}  # fmt: skip
    except RuntimeError as exc:  # torch >= 2.9 refuses to read them when its old and new settings were mixed
        return {"unreadable": str(exc)[:200]}


@contextlib.contextmanager
def no_tf32():
    """float32 computed in float32 (the reference of logit errors), the flags put back after."""
    import torch

    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def report(results: dict) -> None:
    out = io.StringIO()
    out.write(f"\nbitcli GPU check ({results['mode']} mode) on {results['machine'].get('gpu') or results['machine']['cpu']}: "
              f"{results['seconds']:.0f} s\n")  # fmt: skip
    out.write("phases: " + ", ".join(f"{k} {v['seconds']:.0f} s" for k, v in results["phases"].items()) + "\n")
    out.write(f"{'check':28s} {'status':6s} numbers / reason\n")
    for c in results["checks"]:
        out.write(
            f"{c['check']:28s} {c['status']:6s} {c['reason'] + '  ' if c['reason'] else ''}{_short(c['numbers'])}\n"
        )
    if results["throughput"]:
        out.write(f"\n{'contender':22s} {'model':8s} {'px':>4s} {'batch':>5s} {'what':12s} {'img/s':>9s}  note\n")
        for r in results["throughput"]:
            rate = f"{r['images_per_s']:9.1f}" if r.get("images_per_s") is not None else f"{'-':>9s}"
            out.write(
                f"{r['contender']:22s} {r['model']:8s} {r['resolution']:4d} {r['batch']:5d} {r['what']:12s} {rate}  {r.get('note', '')}\n"
            )
    print(out.getvalue(), flush=True)


if __name__ == "__main__":
    main()
