"""The training loop. Per optimizer step: set the lr, forward and backward each micro-batch (the gradients
add up to the global batch's mean), step the optimizer, log, validate (and with --keep-best keep the best
model), save.

Each step's images, crops, flips and MixUp come from data.StepSampler as a function of (seed, step), so a
run resumed from the checkpoint of step s continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from bitcli import hyperrule
from bitcli.data import DecodeCache, StepSample, StepSampler, augment, balanced_class_weights
from bitcli.distributed import Dist, all_sum, barrier
from bitcli.errors import BitError
from bitcli.evaluation import evaluate
from bitcli.finetune.datasets import Datasets
from bitcli.finetune.plan import Plan
from bitcli.finetune.progress import TrainProgress
from bitcli.finetune.rundir import MetricsLog, measures_text, validation_fields, write_best_model
from bitcli.finetune.runfiles import METRICS_FILE, STATE_FILE
from bitcli.finetune.selection import Best, Logits, calibrate
from bitcli.finetune.state import check_finite, save_state
from bitcli.finetune.watch import Watch
from bitcli.images import Reader
from bitcli.multilabel import Evaluation, MultiLabelResult
from bitcli.torch_engine import TorchEngine
from bitcli.ui import log


@dataclass
class Training:
    """What the loop works with, set up by the command before step `start`."""

    plan: Plan
    info: Dist
    engine: TorchEngine  # the model itself (engine.model), its device, precision and input conversion
    model: torch.nn.Module  # what the training forward runs: engine.model, or DistributedDataParallel over it
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # enabled for fp16 only
    data: Datasets
    train_cache: DecodeCache
    val_cache: DecodeCache | None
    output: Path
    start: int  # the first step to take (0, or the checkpoint's when resuming)
    workers: int
    tensorboard: bool = False  # --tensorboard: the main process also writes TensorBoard events
    best: Best | None = None  # --keep-best: the best validation so far (restored from the checkpoint on resume)
    # --report: the last validation's per-image results go here (evaluation.evaluate's `keep`)
    keep: Callable[[np.ndarray, torch.Tensor], None] | None = None
    # --cache-features: every training image's features [N, D] on the device; the head alone trains on them
    features: torch.Tensor | None = None


@dataclass
class Outcome:
    last_eval: Evaluation | None = None
    last_loss: float = float("nan")  # stays NaN when no step was left to take
    step_times: list[float] = field(default_factory=list)
    last_logits: Logits | None = None  # the last step's validation logits, to fit the temperature on


def train(t: Training) -> Outcome:
    plan, info, engine, model, optimizer, scaler = t.plan, t.info, t.engine, t.model, t.optimizer, t.scaler
    sched = hyperrule.Schedule(plan.boundaries)
    metrics = MetricsLog(t.output / METRICS_FILE, keep_before=t.start) if info.main else None
    watch = Watch(t.output, t.start, t.tensorboard) if info.main else None
    out = Outcome()
    step = saved_step = recorded = t.start  # recorded: the steps whose metrics record is written
    weight = class_weights(t)
    reader: Reader[tuple[StepSample, np.ndarray, np.ndarray]]
    try:
        with Reader(t.workers) as reader, TrainProgress(info.main, plan.steps, t.start) as progress:
            batches = micro_batches(t, reader) if t.features is None else feature_batches(t)
            forward = model if t.features is None else engine.model.head
            for step in range(t.start, plan.steps):
                t0 = time.monotonic()
                # the learning rate of this step (HyperRule: linear warm-up, then /10 at each boundary)
                lr = hyperrule.learning_rate(step, sched, plan.lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr

                # forward and backward, one micro-batch at a time; the gradients add up to the global batch's mean
                loss_sum = torch.zeros((), device=engine.device)
                for micro in range(plan.batch_split):
                    x, y, y_mix, lam = next(batches)
                    with gradient_sync(model, info, last=micro == plan.batch_split - 1):
                        with engine.autocast():
                            logits = forward(x)
                        if plan.multi_label:
                            loss = mixup_binary_cross_entropy(logits.float(), y, y_mix, lam)
                        elif weight is not None:
                            loss = mixup_cross_entropy(logits.float(), y, y_mix, lam, weight=weight)
                        else:
                            loss = mixup_cross_entropy(logits.float(), y, y_mix, lam)
                        scaler.scale(loss / plan.batch_split).backward()
                    loss_sum += loss.detach()
                out.last_loss = mean_loss(loss_sum, t, step)  # (a NaN stops the run here, before the update)

                # the update; with fp16 a step whose gradients overflowed is skipped and the loss scale lowered
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)

                # log, validate (main process; the others wait), save the resumable checkpoint
                dt = time.monotonic() - t0
                out.step_times.append(dt)
                ips = round(plan.batch_size / max(dt, 1e-9), 2)
                record: dict[str, Any] = {"step": step, "lr": lr, "loss": out.last_loss, "images_per_s": ips}
                if t.val_cache is not None and validation_due(plan, step):
                    if info.main:
                        ev = validation_step(t, step, out)
                        record.update(validation_fields(ev))
                        progress.log(f"{step + 1}/{plan.steps} steps  lr {lr:.2e}  loss {out.last_loss:.4f}  "
                                     f"val {measures_text(ev)}")  # fmt: skip
                        if t.best is not None and t.best.step == step:
                            progress.log(f"best {plan.keep_best} so far: {t.best.value:.4f}; its model is in best/")
                    barrier(info)
                if metrics is not None and watch is not None:  # the main process
                    metrics.write(record)
                    recorded = step + 1
                    watch.step(record, out.last_eval if "val_loss" in record else None)
                    if step == plan.steps - 1 or (step + 1) % plan.save_every == 0:
                        check_finite(engine.model, step + 1)
                        watch.before_checkpoint()
                        save_state(t.output / STATE_FILE, engine.model, optimizer, step + 1, plan=plan, scaler=scaler,
                                   best=t.best.to_dict() if t.best is not None else None)  # fmt: skip
                        saved_step = step + 1
                progress.update(step + 1, lr, out.last_loss, ips)
    except KeyboardInterrupt:
        if info.main:
            log(stop_message(step, recorded=recorded, saved=saved_step))
        raise
    finally:
        if metrics is not None:
            metrics.close()
        if watch is not None:
            watch.close()
    return out


def stop_message(step: int, *, recorded: int, saved: int) -> str:
    """Where Ctrl-C stopped the run, with steps counted from 1 (the progress line's k; the checkpoint of step k
    holds the first k steps). A step whose record is written is done (bit report counts it): the stop came after
    it, before its checkpoint."""
    if recorded == step + 1:
        where = f"after step {step + 1}" + (" (its checkpoint not yet written)" if saved <= step else "")
    else:
        where = f"during step {step + 1}"
    return f"stopped {where}; `--resume` continues from the checkpoint of step {saved}"


def bit_sgd(params: Iterable[torch.nn.Parameter]) -> torch.optim.SGD:
    """BiT's optimizer: SGD with momentum 0.9 and nothing else (no dampening, weight decay or Nesterov); the
    lr is set before every step. A parameter's momentum buffer starts as a copy of its first gradient, then
    buf = 0.9 * buf + g and p -= lr * buf (as in BiT's code; state.py saves and restores the buffers)."""
    return torch.optim.SGD(params, lr=0.0, momentum=hyperrule.MOMENTUM, dampening=0, weight_decay=0, nesterov=False)


def validation_due(plan: Plan, step: int) -> bool:
    """After every eval_every-th step (0: never) and after the last one."""
    return step == plan.steps - 1 or bool(plan.eval_every and (step + 1) % plan.eval_every == 0)


def validate(t: Training, last: bool, views: Logits | None = None) -> Evaluation:
    """On the main process, when the run validates (val and val_cache are set); the `last` validation's
    per-image results also go to t.keep (--report), and every stack's logits to `views` (the temperature fit)."""
    val, cache = t.data.val, t.val_cache
    assert val is not None and cache is not None
    result = evaluate(t.engine, val, cache.get, batch_size=t.plan.micro_batch, workers=t.workers,
                      class_to_model=list(range(len(val.classes))), keep=t.keep if last else None,
                      keep_views=views, multi_label=t.plan.multi_label)  # fmt: skip
    assert result is not None  # the main process gets the result
    return result


def validation_step(t: Training, step: int, out: Outcome) -> Evaluation:
    """The main process's validation after `step`; with --keep-best a better model than the best so far is
    written to DIR/best/ (calibrated on this validation, unless --no-calibrate) before the step's checkpoint,
    which records it. The last step's logits are kept for the final model's temperature."""
    plan = t.plan
    last = step == plan.steps - 1
    logits = Logits() if plan.calibrate and (last or t.best is not None) else None
    out.last_eval = ev = validate(t, last, views=logits)
    if last:
        out.last_logits = logits
    if t.best is not None and t.best.improves(ev):
        calibration = calibrate(logits, plan.classes) if logits is not None else None
        temperature = calibration.temperature if calibration is not None else 1.0
        thresholds = ev.thresholds if isinstance(ev, MultiLabelResult) else None
        write_best_model(t.engine.model, plan, t.engine.preprocess, t.output, temperature=temperature,
                         thresholds=thresholds)  # fmt: skip
        t.best.record(ev, step, calibration)
    return ev


def class_weights(t: Training) -> torch.Tensor | None:
    """--class-weights balanced: scikit-learn's compute_class_weight("balanced") on the training labels (after
    --shots and --val-split), float32 on the device; None without the flag."""
    if t.plan.class_weights is None:
        return None
    weights = balanced_class_weights(t.data.train.targets, len(t.plan.classes))
    return torch.from_numpy(weights).float().to(t.engine.device)


def gradient_sync(model: torch.nn.Module, info: Dist, last: bool):
    """Processes average their gradients once per step, in the backward of the last micro-batch."""
    if info.world == 1 or last:
        return contextlib.nullcontext()
    return cast(DistributedDataParallel, model).no_sync()  # several processes: the model is wrapped in DDP


def mixup_cross_entropy(logits: torch.Tensor, y: torch.Tensor, y_mix: torch.Tensor | None, lam: float,
                        *, weight: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Cross-entropy; with MixUp the λ-weighted sum over both images' labels (one λ per optimizer step).

    With class weights (--class-weights), the mean over the images of weight[label] x the image's
    cross-entropy, for both labels of a MixUp pair. Not PyTorch's weighted mean (reduction="mean" divides by
    the sum of the batch's weights): that divisor differs between micro-batches and processes, so the
    gradients of a split batch would no longer add up to the whole batch's, and the weights would no longer
    scale the loss (a batch of one class would weigh as much as any other)."""

    def ce(target: torch.Tensor) -> torch.Tensor:
        if weight is None:
            return F.cross_entropy(logits, target)
        return F.cross_entropy(logits, target, weight=weight, reduction="none").mean()

    if y_mix is None:
        return ce(y)
    return lam * ce(y) + (1.0 - lam) * ce(y_mix)


def mixup_binary_cross_entropy(logits: torch.Tensor, y: torch.Tensor, y_mix: torch.Tensor | None,
                               lam: float) -> torch.Tensor:  # fmt: skip
    """Multi-label: binary cross-entropy of the logits against the multi-hot targets, with MixUp against the
    λ-mixed targets λ·y + (1 - λ)·y' (BCE is linear in its target, so this is the λ-weighted sum of both
    images' losses, as mixup_cross_entropy's). Summed over the classes, mean over the images: a micro-batch's
    mean adds up to the whole batch's, and the loss does not shrink with the number of classes."""
    target = y.float() if y_mix is None else lam * y.float() + (1.0 - lam) * y_mix.float()
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(dim=1).mean()


def mean_loss(loss_sum: torch.Tensor, t: Training, step: int) -> float:
    """The step's mean loss over the global batch; a NaN or inf loss is an error (training diverged)."""
    loss = float(all_sum(loss_sum, t.info)) / t.plan.batch_split / t.info.world
    if not math.isfinite(loss):
        raise BitError(
            f"loss became {loss} at step {step + 1}: training diverged and nothing more is written "
            f"(the last checkpoint in {t.output} is kept); lower --lr or use --precision fp32"
        )
    return loss


# ----------------------------------------------------------------------------------------------------------
# The input pipeline


def micro_batches(
    t: Training, reader: Reader
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]]:
    """(input, labels, MixUp partner labels or None, λ) of this process's micro-batches, in training order,
    from step t.start on. The images are decoded and augmented on the reader's threads, a batch ahead."""
    plan, info = t.plan, t.info
    balanced = {"by_class": t.data.train.by_class()} if plan.sampler else {}  # --sampler balanced
    sampler = StepSampler(len(t.data.train), plan.batch_size, plan.seed, max_offset=plan.resize - plan.crop,
                          mixup=plan.mixup, **balanced)  # fmt: skip
    train = t.data.train
    # multi-label: each image's multi-hot row (float32) is its target; else its class index
    targets = (
        train.multi_hot.astype(np.float32) if train.multi_hot is not None else np.asarray(train.targets, dtype=np.int64)
    )
    per_rank, m = plan.batch_size // info.world, plan.micro_batch

    def jobs():
        for step in range(t.start, plan.steps):
            sample = sampler.sample(step)
            for j in range(plan.batch_split):
                own = np.arange(info.rank * per_rank + j * m, info.rank * per_rank + (j + 1) * m)
                # MixUp partners come from the whole global batch, so that splitting it changes nothing.
                needed = own if sample.partners is None else np.unique(np.concatenate([own, sample.partners[own]]))
                yield (sample, own, needed), [
                    functools.partial(_train_image, t.train_cache, int(sample.indices[p]), int(sample.tops[p]),
                                      int(sample.lefts[p]), crop=plan.crop,
                                      flip=plan.flip and bool(sample.flips[p]))
                    for p in needed
                ]  # fmt: skip

    for (sample, own, needed), decoded in reader.run(jobs()):
        yield (*_mix(decoded, needed, own, sample, targets=targets, engine=t.engine), sample.lam)


def feature_batches(t: Training) -> Iterator[tuple[torch.Tensor, torch.Tensor, None, float]]:
    """--cache-features: the micro-batches of the same steps (data.StepSampler's images, in the same order) as
    cached features, without crop, flip or MixUp (one process: check_flags refuses torchrun); --sampler balanced
    draws them as micro_batches does, and multi-label data gives its multi-hot rows."""
    plan, features, train = t.plan, t.features, t.data.train
    assert features is not None
    balanced = {"by_class": train.by_class()} if plan.sampler else {}  # --sampler balanced
    sampler = StepSampler(len(train), plan.batch_size, plan.seed, max_offset=0, mixup=None, **balanced)
    rows = train.multi_hot.astype(np.float32) if train.multi_hot is not None else np.asarray(train.targets, np.int64)
    targets = torch.as_tensor(rows, device=features.device)
    m = plan.micro_batch
    for step in range(t.start, plan.steps):
        indices = torch.from_numpy(sampler.indices(step)).to(features.device)
        for j in range(plan.batch_split):
            own = indices[j * m : (j + 1) * m]
            yield features[own], targets[own], None, 1.0


def _train_image(cache: DecodeCache, index: int, top: int, left: int, *, crop: int, flip: bool) -> np.ndarray:
    return augment(cache.get(index), top, left, crop=crop, flip=flip)


def _mix(
    decoded: np.ndarray,
    needed: np.ndarray,
    own: np.ndarray,
    sample: StepSample,
    *,
    targets: np.ndarray,
    engine: TorchEngine,
):
    """(input, labels, partner labels or None) of a micro-batch: the images at batch positions `own`, each
    blended with its MixUp partner (decoded[i] is the image at position needed[i])."""
    row = {int(p): r for r, p in enumerate(needed)}
    x = engine.to_input(decoded[[row[int(p)] for p in own]])  # normalised as for evaluation
    y = torch.from_numpy(targets[sample.indices[own]]).to(engine.device)
    if sample.partners is None:
        return x, y, None
    partners = sample.partners[own]
    x = sample.lam * x + (1.0 - sample.lam) * engine.to_input(decoded[[row[int(p)] for p in partners]])
    return x, y, torch.from_numpy(targets[sample.indices[partners]]).to(engine.device)
