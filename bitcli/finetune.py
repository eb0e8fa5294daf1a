"""`bit finetune`: BiT-HyperRule transfer of a BiT model to an image folder; resumable, optionally distributed.

Reading order: Options (the command line) -> Plan (every resolved choice, written to DIR/finetune_config.json)
-> run(): data, model, output folder, then the training loop; checkpoints and metrics at the bottom.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bitcli import hyperrule
from bitcli.config import BitConfig
from bitcli.data import (
    DecodeCache,
    ImageFolder,
    Reader,
    StepSampler,
    augment,
    eval_transform,
    few_shot,
    find_splits,
    find_undecodable,
    median_area,
    scan,
    split_validation,
    train_transform,
)
from bitcli.errors import BitError, UsageError
from bitcli.ui import log, visible

CONFIG_FILE = "finetune_config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
STATE_FILE = "checkpoint.safetensors"
LOCK_FILE = ".lock"  # held by the writing process while a run is in progress; removed when it ends
MODEL_FILES = ("model.safetensors", "preprocessor_config.json", "config.json")  # config.json last
RUN_FILES = (*MODEL_FILES, METRICS_FILE, SUMMARY_FILE, STATE_FILE, CONFIG_FILE)
STATE_FORMAT = "bitcli-finetune-state/1"
# Temporary names of bitcli's own writes into DIR (atomic_write: .NAME.XXXXXXXX.tmp; the final model's
# staging folder .final and its own temporary ..final.XXXXXXXX.tmp). Only these are cleaned up.
LEFTOVER = re.compile(r"\.(?:%s|\.final)\.[a-z0-9_]{8}\.tmp" % "|".join(re.escape(n) for n in RUN_FILES))
CHECK_LOG_FROM = 1000  # images: say on stderr that they are being decoded (a progress bar shows on a terminal)

WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES}  # disk full, read-only...
TRAIN_CACHE_BYTES = 1 << 30  # decoded training images kept in memory (per process)
VAL_CACHE_BYTES = 256 << 20

# --random-init architectures besides the published ones (R50x1 ... R152x4). For demos and tests.
ARCH_PRESETS = {
    "tiny": BitConfig(depths=(1, 1), hidden_sizes=(32, 64), embedding_size=16, num_groups=8),
    "small": BitConfig(depths=(1, 1, 1, 1), hidden_sizes=(32, 64, 128, 256), embedding_size=16, num_groups=8),
}

# Plan fields that decide the weights: a resumed run must agree on all of them.
RESULT_FIELDS = (
    "classes", "train_examples", "train_fingerprint", "model", "random_init", "architecture", "shots", "seed",
    "resize", "crop", "steps", "boundaries", "lr", "batch_size", "mixup",
)  # fmt: skip


@dataclass(frozen=True)
class Options:
    """The command line as typed; "auto" values are resolved into a Plan."""

    data: Path
    model: str
    output: Path
    shots: int | None = None  # examples per class; None: all
    val: Path | None = None  # validation folder (default: DATA/val|valid|validation when DATA/train exists)
    val_split: float | None = None  # or hold out this fraction of every training class
    steps: str = "auto"  # auto (HyperRule) or N
    lr: float = hyperrule.BASE_LR
    batch_size: int = hyperrule.BATCH_SIZE  # global, over all processes and micro-batches
    batch_split: str = "auto"  # micro-batches per optimizer step (gradient accumulation)
    resolution: str = "auto"  # auto (HyperRule), CROP, or RESIZE:CROP
    mixup: str = "auto"  # auto (HyperRule) or ALPHA; 0 turns MixUp off
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    workers: int = 4  # image-decoding threads; results do not depend on it
    eval_every: str = "auto"  # steps between validations; 0: only at the end
    save_every: str = "auto"  # steps between resumable checkpoints
    resume: bool = False
    overwrite: bool = False
    random_init: bool = False
    revision: str | None = None


@dataclass(frozen=True)
class Plan:
    """Every choice of the run, automatic or not; written to DIR/finetune_config.json."""

    data: str
    train_folder: str
    validation: str | None  # a folder, "split F of the training folder", or None
    classes: tuple[str, ...]
    train_examples: int  # after --val-split and --shots
    train_fingerprint: str
    val_examples: int
    skipped: tuple[str, ...]  # images left out because they do not decode
    model: str
    random_init: bool
    architecture: dict[str, Any]  # BitConfig of the fine-tuned model
    shots: int | None
    seed: int
    resize: int
    crop: int
    steps: int
    boundaries: tuple[int, ...]
    lr: float
    momentum: float
    batch_size: int
    batch_split: int  # micro-batches per step in each process
    world_size: int
    micro_batch: int  # images per forward pass
    mixup: float | None
    device: str
    precision: str
    workers: int
    eval_every: int
    save_every: int
    why: dict[str, str]  # field -> where its value came from

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(dataclasses.asdict(self))


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


# ----------------------------------------------------------------------------------------------------------
# Flag parsing


def _auto_int(flag: str, value: str, minimum: int) -> int | None:
    if value.strip().lower() == "auto":
        return None
    try:
        n = int(value)
    except ValueError:
        raise UsageError(f"{flag} {value!r}: use auto or a whole number") from None
    if n < minimum:
        raise UsageError(f"{flag} {value}: must be at least {minimum}")
    return n


def _auto_float(flag: str, value: str) -> float | None:
    if value.strip().lower() == "auto":
        return None
    try:
        x = float(value)
    except ValueError:
        raise UsageError(f"{flag} {value!r}: use auto or a number") from None
    if not math.isfinite(x) or x < 0:
        raise UsageError(f"{flag} {value}: must be a number >= 0")
    return x


def _resolution(value: str) -> hyperrule.Resolution | None:
    if value.strip().lower() == "auto":
        return None
    try:
        if ":" in value:
            resize, crop = (int(v) for v in value.split(":"))
            if crop < 1 or resize < crop:
                raise ValueError
            return hyperrule.Resolution(resize, crop)
        return hyperrule.resolution_for_crop(int(value))
    except (ValueError, BitError):
        raise UsageError(f"--resolution {value!r}: use auto, CROP (e.g. 128) or RESIZE:CROP with RESIZE >= CROP") from None


def total_stride(config: BitConfig) -> int:
    """Input pixels per pixel of the last feature map: 4 in the stem, then 2 in every stage after the first
    until output_stride, where dilation takes over (as BitModel builds it)."""
    reduction = 4
    for _ in config.depths[1:]:
        if reduction < config.output_stride:
            reduction *= 2
    return reduction


def check_resolution(value: str, config: BitConfig) -> None:
    """An explicit --resolution must give the model at least one pixel of feature map per stride: below that
    the last stages see 1x1 maps, and GroupNorm over a single value fails mid-run (--resolution 4)."""
    res = _resolution(value)
    smallest = total_stride(config)
    if res is not None and res.crop < smallest:
        raise UsageError(
            f"--resolution: a {res.crop}-px crop is below this model's total stride of {smallest} px "
            f"(its feature maps would shrink below one pixel); use a crop of at least {smallest}"
        )


# ----------------------------------------------------------------------------------------------------------
# Processes


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_spec: str):
    """One process, or one of `torchrun --nproc_per_node N` (NCCL on GPUs, gloo on CPUs)."""
    import torch
    import torch.distributed as dist

    from bitcli.runtime import resolve_device

    device = resolve_device(device_spec)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), device
    info = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise UsageError(f"--device {device_spec}: distributed runs use CUDA (NCCL) or the CPU (gloo)")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return info, device


def _barrier(info: Dist) -> None:
    if info.world > 1:
        import torch.distributed as dist

        dist.barrier()


# ----------------------------------------------------------------------------------------------------------
# The model to start from


def random_init_config(spec: str, num_classes: int) -> BitConfig:
    """`--random-init --model`: a preset (tiny, small), a published layout (R50x1 ... R152x4), or a JSON
    object of BitConfig fields such as '{"depths": [1, 1], "hidden_sizes": [32, 64], "embedding_size": 16,
    "num_groups": 8}'."""
    if spec in ARCH_PRESETS:
        return dataclasses.replace(ARCH_PRESETS[spec], num_classes=num_classes)
    if spec.lstrip().startswith("{"):
        try:
            fields = json.loads(spec)
        except json.JSONDecodeError as exc:
            raise BitError(f"--model: not valid JSON ({exc.msg}); e.g. '{{\"depths\": [1, 1], \"hidden_sizes\": [32, 64]}}'") from None
        if not isinstance(fields, dict):
            raise BitError("--model: the JSON architecture must be an object of BitConfig fields")
        return BitConfig.from_dict({**fields, "num_classes": num_classes})
    try:
        return BitConfig.from_name(spec, num_classes=num_classes)
    except BitError:
        raise BitError(
            f"--random-init --model {spec!r}: use a preset ({', '.join(ARCH_PRESETS)}), an architecture "
            "(R50x1 ... R152x4) or a JSON object of BitConfig fields"
        ) from None


@dataclass(frozen=True)
class Start:
    """What the run starts from, read before any weight is built (so that flags are checked against it)."""

    config: BitConfig  # the architecture (a checkpoint's own head size until reset_classifier)
    ckpt: Any = None  # the Checkpoint; None: --random-init


def start_point(opts: Options, num_classes: int) -> Start:
    if opts.random_init:
        return Start(random_init_config(opts.model, num_classes))
    from bitcli.hub import load_checkpoint

    ckpt = load_checkpoint(opts.model, opts.revision)  # tensors are read later, by build_start_model
    return Start(ckpt.config, ckpt)


def build_start_model(opts: Options, start: Start, num_classes: int):
    """(model on the CPU in fp32 with a zero head of `num_classes`, normalisation mean, std)."""
    import torch

    from bitcli.model import BitModel

    if start.ckpt is None:
        torch.manual_seed(opts.seed)  # the same random weights for the same --seed
        return BitModel(start.config), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    model = start.ckpt.build_model(device="cpu")
    model.reset_classifier(num_classes)  # BiT's new head starts at zero
    return model, start.ckpt.preprocess.mean, start.ckpt.preprocess.std


# ----------------------------------------------------------------------------------------------------------
# Micro-batching


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def auto_batch_split(model, per_rank: int, crop: int, device, dtype, info: Dist) -> tuple[int, str]:
    """The fewest micro-batches per step whose forward and backward fit in memory.

    On a GPU each candidate is tried for real (out-of-memory moves on to the next); on a CPU the activation
    size of one image is measured and the micro-batch kept under a quarter of the available memory.
    """
    import torch

    from bitcli.runtime import autocast

    splits = [d for d in range(1, per_rank + 1) if per_rank % d == 0]
    chosen, why = splits[-1], "nothing larger fit: one image per micro-batch"
    if device.type == "cuda":
        for split in splits:
            try:
                x = torch.zeros(per_rank // split, 3, crop, crop, device=device)
                with autocast(device, dtype):
                    out = model(x)
                out.float().sum().backward()
                torch.cuda.synchronize(device)
                chosen, why = split, f"largest micro-batch that fit in GPU memory: {per_rank // split}"
                break
            except torch.cuda.OutOfMemoryError:
                pass
            finally:
                model.zero_grad(set_to_none=True)
                x = out = None
                torch.cuda.empty_cache()
    else:
        sizes: list[int] = []
        leaves = [m for m in model.modules() if not list(m.children())]
        hooks = [m.register_forward_hook(lambda m, i, o: sizes.append(getattr(o, "numel", int)())) for m in leaves]
        try:
            with torch.no_grad():
                model(torch.zeros(1, 3, crop, crop))
        finally:
            for h in hooks:
                h.remove()
        per_image = sum(sizes) * 4 * 2  # fp32 activations kept for backward, and their gradients
        budget = _mem_available() // 4 // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        why = f"~{per_image / 2**20:.1f} MiB of activations per image, under 1/4 of available memory"
        for split in splits:
            if per_rank // split * per_image <= budget:
                chosen = split
                break
    if info.world > 1:  # every process must take the same number of micro-batches
        import torch.distributed as dist

        t = torch.tensor([chosen], device=device if device.type == "cuda" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        chosen = int(t.item())
    return chosen, why


# ----------------------------------------------------------------------------------------------------------
# Output folder


def check_output_location(opts: Options) -> None:
    """DIR must be outside the image folders: inside DATA its files would be a class folder of the next run
    and of `bit eval DATA` ("class folder 'myrun' holds no images")."""
    out = opts.output.resolve()
    for flag, folder in (("DATA", opts.data), ("--val", opts.val)):
        if folder is None:
            continue
        root = folder.resolve()
        if out == root or root in out.parents:
            raise UsageError(
                f"--output {visible(str(opts.output))}: is {'the' if out == root else 'inside the'} image folder "
                f"{visible(str(folder))} ({flag}), where the run's files would be taken for a class of images; "
                "choose a folder outside it"
            )


def output_mode(output: Path, resume: bool, overwrite: bool) -> str:
    """fresh | overwrite | resume | finished (--resume of a finished run: nothing to do), or a BitError
    saying why this folder cannot be used."""
    if resume and overwrite:
        raise UsageError("--resume continues a run and --overwrite starts it again; pass only one")
    if output.exists() and not output.is_dir():
        raise BitError(f"--output {output}: is a file; pass a folder")
    is_run = (output / CONFIG_FILE).is_file()
    finished = (output / SUMMARY_FILE).is_file()
    if resume:
        if not is_run:
            raise BitError(f"--resume: {output} holds no bit finetune run ({CONFIG_FILE}); run without --resume")
        return "finished" if finished else "resume"
    if not output.exists() or not [p for p in output.iterdir() if p.name != LOCK_FILE]:
        return "fresh"
    if not is_run:
        raise BitError(f"--output {output}: folder is not empty and holds no bit finetune run; choose a new or empty folder")
    if not overwrite:
        if finished:
            raise BitError(f"--output {output}: holds a finished run; pass --overwrite to replace it, or choose another folder")
        raise BitError(f"--output {output}: holds an unfinished run; pass --resume to continue it or --overwrite to start again")
    return "overwrite"


def _remove_leftovers(output: Path, run_files: bool) -> None:
    """Temporary files of bitcli's writes that a kill interrupted (never read: every write is renamed into
    place), and with `run_files` the previous run's files. Nothing else: DIR may hold the user's files."""
    for p in output.iterdir() if output.is_dir() else ():
        if p.is_symlink():
            continue
        if p.name == ".final" and p.is_dir():
            shutil.rmtree(p)
        elif LEFTOVER.fullmatch(p.name):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        elif run_files and p.name in RUN_FILES and p.is_file():
            p.unlink()


@contextlib.contextmanager
def lock_output(output: Path):
    """An exclusive lock on DIR/.lock while the run writes, so that two runs never write the same folder.

    The file is removed at the end, while still locked. A run that opened it just before then finds, once
    it holds the lock, that the name no longer leads to its file, and opens the new one instead.
    """
    path = output / LOCK_FILE
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        fcntl = None
    while True:
        handle = open(path, "a")
        if fcntl is None:
            break
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise BitError(f"--output {output}: another bit finetune is writing to this folder; wait for it or choose another") from None
        try:
            if os.path.samestat(os.fstat(handle.fileno()), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        handle.close()
    try:
        yield
    finally:
        with contextlib.suppress(OSError):  # (an open file cannot be removed on Windows: it stays there)
            path.unlink(missing_ok=True)
        handle.close()


def write_final_model(ckpt, output: Path) -> None:
    """The transformers layout directly in DIR, beside the run's other files (write_hf replaces whole
    folders, so it writes to a staging folder whose files are then renamed in, config.json last)."""
    from bitcli.checkpoints import write_hf

    staging = output / ".final"
    shutil.rmtree(staging, ignore_errors=True)
    write_hf(ckpt, staging)
    for name in MODEL_FILES:
        os.replace(staging / name, output / name)
    staging.rmdir()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    from bitcli.checkpoints import atomic_write

    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


class MomentumSGD:
    """SGD with momentum and nothing else (no dampening, weight decay or Nesterov), as in BiT.

    The update is torch.optim.SGD's, bit for bit (tests/test_finetune.py checks it against torch). It is not
    torch.optim.SGD itself because constructing any torch optimizer imports torch._dynamo: 2-4 s of start-up
    on a small CPU for every run. GradScaler accepts it (it needs `param_groups` and `step()`).
    """

    def __init__(self, params, momentum: float) -> None:
        self.param_groups = [{"params": list(params), "lr": 0.0}]
        self.momentum = momentum
        self.state: dict[Any, dict[str, Any]] = {}  # parameter -> {"momentum_buffer": tensor}

    def step(self) -> None:
        import torch

        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    buf = self.state.get(p, {}).get("momentum_buffer")
                    if buf is None:  # first step: the buffer starts as the gradient itself
                        buf = p.grad.detach().clone()
                        self.state[p] = {"momentum_buffer": buf}
                    else:
                        buf.mul_(self.momentum).add_(p.grad)
                    p.add_(buf, alpha=-group["lr"])

    def zero_grad(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None


# ----------------------------------------------------------------------------------------------------------
# Resumable state: one safetensors file (weights, SGD momentum, torch RNG) with the scalar state as JSON
# metadata; written to a temporary name and renamed, so the file on disk is always a complete checkpoint.


def save_state(path: Path, model, optimizer, next_step: int, plan: Plan, scaler) -> None:
    import torch

    from bitcli.checkpoints import TensorRef, write_safetensors

    tensors: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        tensors[f"model.{name}"] = p.detach().cpu()
        buf = optimizer.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            tensors[f"momentum.{name}"] = buf.detach().cpu()
    tensors["rng.torch"] = torch.get_rng_state()
    state = {
        "next_step": next_step,
        "seed": plan.seed,
        "train_fingerprint": plan.train_fingerprint,
        "sampler": {"kind": "with-replacement" if plan.train_examples < plan.batch_size else "epochs",
                    "seed": plan.seed, "next_step": next_step},  # fmt: skip
        "scaler": scaler.state_dict() if scaler is not None else None,
    }
    refs = {k: TensorRef(tuple(t.shape), t.dtype, (lambda t=t: t)) for k, t in tensors.items()}
    write_safetensors(path, refs, {"format": STATE_FORMAT, "state": json.dumps(state)})


def load_state(path: Path, model, optimizer, plan: Plan, scaler, device) -> int:
    """Restore weights, momentum and RNG; return the step to continue from."""
    import torch

    from bitcli.checkpoints import read_safetensors

    refs, meta = read_safetensors(path)
    if meta.get("format") != STATE_FORMAT:
        raise BitError(f"{path}: not a bit finetune checkpoint; remove it or use --overwrite")
    try:
        state = json.loads(meta["state"])
        next_step = int(state["next_step"])
    except (KeyError, ValueError, TypeError):
        raise BitError(f"{path}: checkpoint state is damaged; use --overwrite to start again") from None
    if state.get("train_fingerprint") != plan.train_fingerprint:
        raise BitError(f"{path}: the training images changed since this checkpoint; restore them or use --overwrite")
    weights = {k.removeprefix("model."): r.load() for k, r in refs.items() if k.startswith("model.")}
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise BitError(f"{path}: checkpoint does not fit the model ({' '.join(str(exc).split())[:200]})") from None
    for name, p in model.named_parameters():
        ref = refs.get(f"momentum.{name}")
        if ref is not None:
            optimizer.state[p] = {"momentum_buffer": ref.load().to(device=device, dtype=p.dtype).clone()}
    if "rng.torch" in refs:
        torch.set_rng_state(refs["rng.torch"].load())
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return next_step


class MetricsLog:
    """metrics.jsonl: one JSON object per optimizer step, flushed as it is written. On resume the lines of
    steps that the checkpoint does not cover (written after it, before the kill) are dropped."""

    def __init__(self, path: Path, keep_before: int | None) -> None:
        from bitcli.checkpoints import atomic_write

        kept: list[str] = []
        if keep_before is not None and path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    if int(json.loads(line)["step"]) < keep_before:
                        kept.append(line + "\n")
                except (ValueError, KeyError, TypeError):
                    break  # a torn last line
        atomic_write(path, lambda f: f.write("".join(kept).encode("utf-8")))
        self.file = open(path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class TrainProgress:
    """Rich progress on a TTY stderr (step, lr, loss, images/s, ETA); nothing otherwise."""

    def __init__(self, enabled: bool, total: int, start: int) -> None:
        self.enabled, self.total, self.start = enabled and sys.stderr.isatty(), total, start
        self.progress = None

    def __enter__(self) -> TrainProgress:
        if self.enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            from bitcli.ui import stderr_console

            self.progress = Progress(
                TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                TextColumn("lr {task.fields[lr]:.2e}"), TextColumn("loss {task.fields[loss]:.4f}"),
                TextColumn("{task.fields[ips]:.0f} img/s"), TimeRemainingColumn(),
                console=stderr_console(), transient=True,
            )  # fmt: skip
            self.progress.__enter__()
            self.task = self.progress.add_task("finetune", total=self.total, completed=self.start, lr=0.0, loss=0.0, ips=0.0)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.__exit__(None, None, None)

    def update(self, done: int, lr: float, loss: float, ips: float) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=done, lr=lr, loss=loss, ips=ips)

    def log(self, message: str) -> None:
        if self.progress is not None:
            self.progress.console.print(message, highlight=False, markup=False)
        else:
            log(message)


# ----------------------------------------------------------------------------------------------------------
# Planning


@dataclass(frozen=True)
class Datasets:
    train: ImageFolder
    val: ImageFolder | None
    validation: str | None
    skipped: tuple[str, ...] = ()  # images left out because they do not decode (training, then validation)


def scan_datasets(opts: Options) -> Datasets:
    """The image folders as found (headers are not even read yet); refuses layouts that make no classifier."""
    if opts.val is not None and opts.val_split is not None:
        raise UsageError("--val and --val-split both name a validation set; pass only one")
    train_root, val_root = find_splits(opts.data)
    if opts.val is not None:
        val_root = opts.val
    elif val_root is not None and opts.val_split is not None:
        raise UsageError(f"--val-split: {opts.data} already has the validation split {val_root}; drop --val-split")
    train = scan(train_root)
    if len(train.classes) < 2:
        raise UsageError(
            f"{visible(str(train_root))}: holds one class folder ({train.classes[0]!r}); a classifier needs at "
            "least 2 classes, so add a sub-folder of images for each other class"
        )
    val = scan(val_root, classes=train.classes) if val_root is not None else None
    return Datasets(train, val, str(val_root) if val_root is not None else None)


def usable_datasets(opts: Options, found: Datasets, undecodable: Callable[[list[str]], dict[int, str]]) -> Datasets:
    """The images that decode, then --val-split and --shots.

    `undecodable(paths)` decodes them all and returns {index: error} of the failures. Every image the run
    uses is decoded here, before step 0; with --shots (and no --val-split) only the candidates are (see
    few_shot). The skipped files leave the data set before any sampling, so a run that skips them and one
    whose folder no longer holds them train on the same images, with the same fingerprint.
    """
    train, val, validation = found.train, found.val, found.validation
    skipped: list[str] = []

    def without(ds: ImageFolder, failed: dict[int, str] | set[int]) -> ImageFolder:
        skipped.extend(ds.paths[i] for i in sorted(failed))
        return ds.subset(i for i in range(len(ds)) if i not in failed)

    checked_all = opts.shots is None or opts.val_split is not None
    if checked_all:
        failed = undecodable([*train.paths, *(val.paths if val is not None else ())])
        n = len(train)
        train = without(train, {i for i in failed if i < n})
        if val is not None:
            val = without(val, {i - n for i in failed if i >= n})
        for c, count in enumerate(train.counts()):
            if count == 0:
                raise BitError(
                    f"{visible(str(train.root / train.classes[c]))}: none of the images of class "
                    f"{train.classes[c]!r} can be decoded (listed above); replace them or remove the folder"
                )
    elif val is not None:
        val = without(val, undecodable(list(val.paths)))
    if opts.val_split is not None:
        train, val = split_validation(train, opts.val_split, opts.seed)
        validation = f"{opts.val_split:g} of every class of {found.train.root} (seed {opts.seed})"
    if opts.shots is not None:
        pool = train

        def failing(indices: list[int]) -> set[int]:
            if checked_all:
                return set()
            failed = {indices[j] for j in undecodable([pool.paths[i] for i in indices])}
            skipped.extend(pool.paths[i] for i in sorted(failed))
            return failed

        train = few_shot(pool, opts.shots, opts.seed, failing)
    if val is not None and len(val) == 0:
        raise BitError(f"{visible(validation or '')}: none of the validation images can be decoded (listed above)")
    return Datasets(train, val, validation, tuple(skipped))


def _find_undecodable(paths: list[str], info: Dist, device, workers: int) -> dict[int, str]:
    """data.find_undecodable over `paths`, shared by the processes (each decodes every world-th image) and
    the same answer in each; the main process reports every failure on stderr."""
    from bitcli.ui import progress_bar

    if not paths:
        return {}
    if info.main and len(paths) >= CHECK_LOG_FROM:
        log(f"checking that {len(paths):,} images decode")
    mine = paths[info.rank :: info.world]
    bar = progress_bar("checking images", total=len(mine), unit="img") if info.main else contextlib.nullcontext(lambda n: None)
    with bar as advance:
        found = {info.rank + j * info.world: error for j, error in find_undecodable(mine, workers, advance).items()}
    if info.world > 1:
        import torch
        import torch.distributed as dist

        flags = torch.zeros(len(paths), dtype=torch.int32, device=device if device.type == "cuda" else "cpu")
        if found:
            flags[list(found)] = 1
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        others = [i for i in flags.nonzero().flatten().tolist() if i not in found]
        again = find_undecodable([paths[i] for i in others], workers) if info.main else {}  # their errors: a few files
        found.update({i: again.get(j, f"{paths[i]}: cannot be decoded") for j, i in enumerate(others)})
    if info.main:
        for i in sorted(found):
            log(f"skipped {visible(found[i])}")
    return found


def check_flags(opts: Options, info: Dist, config: BitConfig) -> None:
    """Every flag's form and range (make_plan reads them again), before any image is decoded or weight built."""
    check_resolution(opts.resolution, config)
    _auto_int("--steps", opts.steps, 1)
    _auto_float("--mixup", opts.mixup)
    _auto_int("--eval-every", opts.eval_every, 0)
    _auto_int("--save-every", opts.save_every, 1)
    _batch_split(opts, info)


def _batch_split(opts: Options, info: Dist) -> int | None:
    """--batch-split N (None: auto), checked with --lr and --batch-size against the number of processes."""
    if opts.lr <= 0 or not math.isfinite(opts.lr):
        raise UsageError(f"--lr {opts.lr}: must be a positive number")
    if opts.batch_size % info.world:
        raise UsageError(f"--batch-size {opts.batch_size}: must divide evenly over the {info.world} processes")
    per_rank = opts.batch_size // info.world
    split = _auto_int("--batch-split", opts.batch_split, 1)
    if split is not None and per_rank % split:
        raise UsageError(
            f"--batch-split {split}: must divide the {per_rank} images each process takes per step "
            f"(--batch-size {opts.batch_size} over {info.world} process(es))"
        )
    return split


def make_plan(opts: Options, ds: Datasets, model, info: Dist, device, dtype, saved: dict[str, Any] | None) -> Plan:
    n = len(ds.train)
    why: dict[str, str] = {}
    regime = f"{n:,} training examples"
    res = _resolution(opts.resolution)
    if res is None:
        area = median_area(ds.train)
        res = hyperrule.resolution(area)
        side = "<" if area < hyperrule.SMALL_IMAGE_AREA else ">="
        why["resolution"] = f"HyperRule: median image area {area:,.0f} px {side} 96x96"
    else:
        why["resolution"] = f"--resolution {opts.resolution}"
    steps = _auto_int("--steps", opts.steps, 1)
    if steps is None:
        sched = hyperrule.schedule(n)
        why["steps"] = f"HyperRule for {regime}"
    else:
        sched = hyperrule.scaled_schedule(n, steps)
        why["steps"] = f"--steps {steps}: the HyperRule boundaries for {regime} scaled to {steps} step{'s' * (steps != 1)}"
    alpha = _auto_float("--mixup", opts.mixup)
    if alpha is None:
        alpha = hyperrule.mixup_alpha(n)
        why["mixup"] = f"HyperRule for {regime}"
    else:
        alpha = alpha or None
        why["mixup"] = f"--mixup {opts.mixup}"
    per_rank = opts.batch_size // info.world
    split = _batch_split(opts, info)
    if split is not None:
        why["batch_split"] = f"--batch-split {split}"
    elif saved is not None and saved.get("world_size") == info.world and per_rank % int(saved["batch_split"]) == 0:
        split = int(saved["batch_split"])
        why["batch_split"] = "auto: kept from the run being resumed"
    else:
        split, reason = auto_batch_split(model, per_rank, res.crop, device, dtype, info)
        why["batch_split"] = f"auto: {reason}"
    eval_every = _auto_int("--eval-every", opts.eval_every, 0)
    if eval_every is None:
        eval_every = math.ceil(sched.steps / 5)
        why["eval_every"] = "auto: 5 validations per run"
    save_every = _auto_int("--save-every", opts.save_every, 1)
    if save_every is None:
        save_every = math.ceil(sched.steps / 10)
        why["save_every"] = "auto: 10 checkpoints per run"
    return Plan(
        data=str(opts.data),
        train_folder=str(ds.train.root),
        validation=ds.validation,
        classes=ds.train.classes,
        train_examples=n,
        train_fingerprint=ds.train.fingerprint(),
        val_examples=len(ds.val) if ds.val is not None else 0,
        skipped=ds.skipped,
        model=opts.model,
        random_init=opts.random_init,
        architecture=model.config.to_dict(),
        shots=opts.shots,
        seed=opts.seed,
        resize=res.resize,
        crop=res.crop,
        steps=sched.steps,
        boundaries=sched.boundaries,
        lr=opts.lr,
        momentum=hyperrule.MOMENTUM,
        batch_size=opts.batch_size,
        batch_split=split,
        world_size=info.world,
        micro_batch=per_rank // split,
        mixup=alpha,
        device=str(device),
        precision=str(dtype).removeprefix("torch."),
        workers=opts.workers,
        eval_every=eval_every,
        save_every=save_every,
        why=why,
    )


def describe(plan: Plan) -> list[str]:
    val = (
        f"{plan.val_examples:,} images ({visible(plan.validation)})" if plan.validation
        else "none (pass --val DIR or --val-split F)"
    )  # fmt: skip
    source = f"random {plan.model}" if plan.random_init else plan.model
    lines = [
        f"bit finetune: {visible(source)} -> {len(plan.classes)} classes",
        f"  train       {plan.train_examples:,} images from {visible(plan.train_folder)}"
        + (f" ({plan.shots} per class, seed {plan.seed})" if plan.shots else ""),
        f"  validation  {val}",
        f"  resolution  resize {plan.resize}x{plan.resize}, random crop {plan.crop} + flip; eval resize "
        f"{plan.crop}x{plan.crop}   [{plan.why['resolution']}]",
        f"  schedule    {plan.steps} step{'s' * (plan.steps != 1)}; {describe_schedule(plan.boundaries, plan.lr)}   "
        f"[{plan.why['steps']}]",
        f"  mixup       {'alpha ' + format(plan.mixup, 'g') if plan.mixup else 'off'}   [{plan.why['mixup']}]",
        f"  batch       {plan.batch_size} = {plan.world_size} process(es) x {plan.batch_split} micro-batch(es) of "
        f"{plan.micro_batch}   [{plan.why['batch_split']}]",
        f"  optimizer   SGD momentum {plan.momentum}, no weight decay, new head zero-initialised",
        f"  device      {plan.device}, {plan.precision}; "
        + (f"validate every {plan.eval_every or plan.steps} steps, " if plan.validation else "")
        + f"checkpoint every {plan.save_every} steps",
    ]
    if plan.skipped:
        n = len(plan.skipped)
        lines.insert(3, f"  skipped     {n} image{'s' * (n != 1)} that do{'es' * (n == 1)} not decode (listed above; "
                        f"{SUMMARY_FILE} lists {'them' if n != 1 else 'it'} too)")  # fmt: skip
    return lines


def describe_schedule(boundaries: tuple[int, ...], lr: float) -> str:
    """'lr 0.003 after a linear warm-up of 100 steps, /10 after steps 200, 300, 400' (short runs: less)."""
    warmup, decays = boundaries[0], boundaries[1:-1]
    text = f"lr {lr:g} " + (f"after a linear warm-up of {warmup} steps" if warmup else "from the first step (no warm-up)")
    if not decays:
        return text + ", no decay"
    return text + f", /10 after step{'s' * (len(decays) > 1)} " + ", ".join(str(d) for d in decays)


# ----------------------------------------------------------------------------------------------------------
# The run


def run(opts: Options) -> None:
    import torch

    info, device = setup_distributed(opts.device)
    try:
        with contextlib.ExitStack() as held:  # the output folder's lock, released however the run ends
            _run(opts, info, device, held)
    except OSError as exc:
        if exc.errno not in WRITE_ERRORS:
            raise
        where = exc.filename or opts.output
        raise BitError(
            f"{where}: cannot write ({exc.strerror}); free some space or choose another --output "
            "(--resume continues from the last checkpoint)"
        ) from None
    finally:
        if info.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _run(opts: Options, info: Dist, device, held: contextlib.ExitStack) -> None:
    import torch

    from bitcli.runtime import resolve_precision, reuse_freed_memory

    started = time.monotonic()
    dtype = resolve_precision(opts.precision, device)
    if device.type == "cpu":  # exact resume and reproducible weights need deterministic kernels
        _use_deterministic_algorithms()
        reuse_freed_memory()  # activations re-use the heap instead of fresh, zeroed pages every step
    prepared = _prepare(opts, info, device, dtype)
    if prepared is None:
        return
    mode, ds, model, mean, std, plan = prepared
    _barrier(info)  # every process has looked at DIR before the first write to it
    say = log if info.main else (lambda message: None)
    if info.main:
        for line in describe(plan):
            log(line)
        opts.output.mkdir(parents=True, exist_ok=True)
        held.enter_context(lock_output(opts.output))
        _remove_leftovers(opts.output, run_files=mode == "overwrite")
        if mode != "resume":
            _write_json(opts.output / CONFIG_FILE, plan.to_dict())

    channels_last = device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = MomentumSGD(model.parameters(), hyperrule.MOMENTUM)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    start = 0
    state_path = opts.output / STATE_FILE
    if mode == "resume":
        if state_path.is_file():
            start = load_state(state_path, model, optimizer, plan, scaler, device)
            say(f"resuming at step {start} of {plan.steps} from {state_path}")
        else:
            say(f"no checkpoint in {opts.output} yet; starting from step 0")
    raw = model
    if info.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(raw, device_ids=[device.index] if device.type == "cuda" else None)

    train_tf = train_transform(plan.resize)
    val_tf = eval_transform(plan.crop, mean, std)
    train_cache = DecodeCache(ds.train, train_tf, TRAIN_CACHE_BYTES)
    val_cache = DecodeCache(ds.val, val_tf, VAL_CACHE_BYTES) if ds.val is not None else None
    sampler = StepSampler(len(ds.train), plan.batch_size, plan.seed, plan.resize - plan.crop, plan.mixup)
    targets = np.asarray(ds.train.targets, dtype=np.int64)
    sched = hyperrule.Schedule(plan.boundaries)
    per_rank = plan.batch_size // info.world
    m = plan.micro_batch

    def micro_batches():
        """(step, sample, own positions, decoded positions) with decode jobs, in training order."""
        for step in range(start, plan.steps):
            sample = sampler.sample(step)
            for j in range(plan.batch_split):
                own = np.arange(info.rank * per_rank + j * m, info.rank * per_rank + (j + 1) * m)
                # MixUp partners come from the whole global batch, so that splitting it changes nothing.
                needed = own if sample.partners is None else np.unique(np.concatenate([own, sample.partners[own]]))
                jobs = [
                    functools.partial(_train_image, train_cache, int(sample.indices[p]), int(sample.tops[p]),
                                      int(sample.lefts[p]), plan.crop, bool(sample.flips[p]))
                    for p in needed
                ]  # fmt: skip
                yield (step, sample, own, needed), jobs

    def to_input(batch_uint8: np.ndarray):
        x = val_tf.normalize(torch.from_numpy(batch_uint8).to(device))  # same mean/std as evaluation
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    metrics = MetricsLog(opts.output / METRICS_FILE, keep_before=start) if info.main else None
    saved_step = step = start
    last_eval = None
    last_loss = float("nan")
    step_times: list[float] = []
    try:
        with Reader(opts.workers) as reader, TrainProgress(info.main, plan.steps, start) as progress:
            batches = reader.run(micro_batches())
            for step in range(start, plan.steps):
                t0 = time.monotonic()
                lr = hyperrule.learning_rate(step, sched, plan.lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss_total = torch.zeros((), device=device)
                for j in range(plan.batch_split):
                    (b_step, sample, own, needed), decoded = next(batches)
                    assert b_step == step
                    x, y, y_mix = _mix(decoded, needed, own, sample, targets, to_input, device)
                    sync = contextlib.nullcontext() if (info.world == 1 or j == plan.batch_split - 1) else model.no_sync()
                    with sync:
                        loss = _loss(model, x, y, y_mix, sample.lam, device, dtype)
                        scaled = loss / plan.batch_split  # the step's gradient is the mean over the global batch
                        (scaler.scale(scaled) if scaler is not None else scaled).backward()
                    loss_total += loss.detach()
                if info.world > 1:
                    torch.distributed.all_reduce(loss_total)
                last_loss = float(loss_total) / plan.batch_split / info.world
                if not math.isfinite(last_loss):
                    raise BitError(
                        f"loss became {last_loss} at step {step}: training diverged and nothing more is written "
                        f"(the last checkpoint in {opts.output} is kept); lower --lr or use --precision fp32"
                    )
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad()
                dt = time.monotonic() - t0
                step_times.append(dt)
                ips = plan.batch_size / max(dt, 1e-9)
                record: dict[str, Any] = {"step": step, "lr": lr, "loss": last_loss, "images_per_s": round(ips, 2)}
                last_step = step == plan.steps - 1
                if val_cache is not None and (last_step or (plan.eval_every and (step + 1) % plan.eval_every == 0)):
                    if info.main:
                        last_eval = _validate(raw, ds.val, val_cache, val_tf, device, dtype, m, opts.workers, channels_last)
                        record.update(val_top1=last_eval.top1, val_top5=last_eval.top5, val_loss=last_eval.loss)
                        progress.log(
                            f"{step + 1}/{plan.steps} steps  lr {lr:.2e}  loss {last_loss:.4f}  "
                            f"val top-1 {last_eval.top1:.4f}  top-5 {last_eval.top5:.4f}"
                        )
                    _barrier(info)
                if info.main:
                    metrics.write(record)
                    if last_step or (step + 1) % plan.save_every == 0:
                        _check_finite(raw, step)
                        save_state(state_path, raw, optimizer, step + 1, plan, scaler)
                        saved_step = step + 1
                progress.update(step + 1, lr, last_loss, ips)
    except KeyboardInterrupt:
        say(f"stopped during step {step}; `--resume` continues from the checkpoint of step {saved_step}")
        raise
    finally:
        if metrics is not None:
            metrics.close()

    if info.main:
        if ds.val is not None and last_eval is None:  # resumed after the last step's checkpoint
            last_eval = _validate(raw, ds.val, val_cache, val_tf, device, dtype, m, opts.workers, channels_last)
        _check_finite(raw, plan.steps - 1)
        _write_outputs(opts.output, raw, plan, val_tf, last_eval, last_loss, step_times, start, started)
    _barrier(info)


def _prepare(opts: Options, info: Dist, device, dtype):
    """(mode, data sets, model on the device, mean, std, plan), or None when --resume finds the run finished.
    Everything that can refuse the run, cheapest first: the output folder, the image folders, the flags
    against the architecture, then decoding every image; nothing is written yet."""
    check_output_location(opts)
    mode = output_mode(opts.output, opts.resume, opts.overwrite)
    if mode == "finished":
        if info.main:
            log(f"the run in {visible(str(opts.output))} already finished ({SUMMARY_FILE} is there): nothing to resume; "
                "--overwrite trains it again")  # fmt: skip
        return None
    saved = _read_saved_plan(opts.output) if mode == "resume" else None
    found = scan_datasets(opts)
    start = start_point(opts, len(found.train.classes))
    check_flags(opts, info, start.config)
    ds = usable_datasets(opts, found, functools.partial(_find_undecodable, info=info, device=device, workers=opts.workers))
    model, mean, std = build_start_model(opts, start, len(ds.train.classes))
    model = model.to(device).train()
    plan = make_plan(opts, ds, model, info, device, dtype, saved)
    if saved is not None:
        _check_same_run(saved, plan, opts.output)
    return mode, ds, model, mean, std, plan


def _use_deterministic_algorithms() -> None:
    """torch.use_deterministic_algorithms(True) without its import of torch._inductor (2-3 s on a small CPU),
    which it needs only to set a flag for torch.compile; nothing here is compiled.

    Deterministic mode would also fill every new tensor with NaN: a full extra write of each activation and
    gradient. Every kernel here writes its whole output, so the fill changes no result and is switched off.
    """
    import torch
    import torch.utils.deterministic

    setter = getattr(torch._C, "_set_deterministic_algorithms", None)
    if setter is None:
        torch.use_deterministic_algorithms(True)
    else:
        setter(True)
    torch.utils.deterministic.fill_uninitialized_memory = False


def _mix(decoded: np.ndarray, needed: np.ndarray, own: np.ndarray, sample, targets: np.ndarray, to_input, device):
    """(input, labels, partner labels or None) of a micro-batch: the images at batch positions `own`, each
    blended with its MixUp partner (decoded[i] is the image at position needed[i])."""
    import torch

    row = {int(p): r for r, p in enumerate(needed)}
    x = to_input(decoded[[row[int(p)] for p in own]])
    y = torch.from_numpy(targets[sample.indices[own]]).to(device)
    if sample.partners is None:
        return x, y, None
    partners = sample.partners[own]
    x = sample.lam * x + (1.0 - sample.lam) * to_input(decoded[[row[int(p)] for p in partners]])
    return x, y, torch.from_numpy(targets[sample.indices[partners]]).to(device)


def _train_image(cache: DecodeCache, index: int, top: int, left: int, crop: int, flip: bool) -> np.ndarray:
    return augment(cache.get(index), top, left, crop, flip)


def _loss(model, x, y, y_mix, lam: float, device, dtype):
    """Cross-entropy; with MixUp the λ-weighted sum over both images' labels (one λ per optimizer step)."""
    import torch.nn.functional as F

    from bitcli.runtime import autocast

    with autocast(device, dtype):
        logits = model(x)
    logits = logits.float()
    if y_mix is None:
        return F.cross_entropy(logits, y)
    return lam * F.cross_entropy(logits, y) + (1.0 - lam) * F.cross_entropy(logits, y_mix)


def _validate(model, val: ImageFolder, cache: DecodeCache, transform, device, dtype, batch: int, workers: int, channels_last: bool):
    from bitcli.evaluate import evaluate

    return evaluate(
        model, val, cache.get, transform.normalize, device, dtype, batch, workers,
        list(range(len(val.classes))), channels_last,
    )  # fmt: skip


def _check_finite(model, step: int) -> None:
    import torch

    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise BitError(
                f"weight {name} holds NaN or inf after step {step}; nothing was written. Lower --lr or use --precision fp32"
            )


def _write_outputs(output: Path, model, plan: Plan, transform, last_eval, last_loss: float,
                   step_times: list[float], start: int, started: float) -> None:  # fmt: skip
    import torch

    from bitcli.checkpoints import Checkpoint, TensorRef

    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    tensors = {k: TensorRef(tuple(t.shape), t.dtype, (lambda t=t: t)) for k, t in state.items()}
    ckpt = Checkpoint(model.config, list(plan.classes), transform, tensors, str(output), "hf")
    write_final_model(ckpt, output)
    trained = sum(step_times)
    summary = {
        "steps": plan.steps,
        "train_examples": plan.train_examples,
        "val_examples": plan.val_examples,
        "skipped": list(plan.skipped),  # images that do not decode, left out of training and validation
        "val_top1": last_eval.top1 if last_eval else None,
        "val_top5": last_eval.top5 if last_eval else None,
        "val_loss": last_eval.loss if last_eval else None,
        "val_per_class": last_eval.per_class if last_eval else None,
        "final_loss": last_loss if math.isfinite(last_loss) else None,  # None: no step left after resuming
        "resumed_from_step": start or None,
        "wall_time_s": round(time.monotonic() - started, 2),  # this invocation
        "images_per_s": round(plan.batch_size * len(step_times) / trained, 2) if trained else None,
    }
    _write_json(output / SUMMARY_FILE, summary)
    if last_eval:
        log(f"done: val top-1 {last_eval.top1:.4f}, top-5 {last_eval.top5:.4f} on {plan.val_examples:,} images")
    log(f"model, metrics.jsonl and summary.json in {output} ({summary['wall_time_s']:.0f} s)")


def _read_saved_plan(output: Path) -> dict[str, Any]:
    from bitcli.checkpoints import read_json

    return read_json(output / CONFIG_FILE)


def _check_same_run(saved: dict[str, Any], plan: Plan, output: Path) -> None:
    now = plan.to_dict()
    changed = [f"{k} {saved.get(k)!r} -> {now[k]!r}" for k in RESULT_FIELDS if saved.get(k) != now[k]]
    if changed:
        shown = "; ".join(c if len(c) < 120 else c[:117] + "..." for c in changed[:3])
        raise BitError(
            f"--resume: {output} was started with other settings ({shown}); repeat the original flags "
            "or pass --overwrite to start again"
        )
