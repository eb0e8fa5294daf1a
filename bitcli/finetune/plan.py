"""FinetuneOptions (the command line, typed; None = auto) -> Plan: every choice of the run, automatic or not,
with where it came from. The plan is written to DIR/finetune_config.json and printed before training."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bitcli import extras, hyperrule
from bitcli.config import BitConfig
from bitcli.data import balanced_class_weights, median_area
from bitcli.distributed import Dist
from bitcli.errors import BitError, UsageError
from bitcli.finetune.datasets import Datasets
from bitcli.finetune.memory import auto_batch_split
from bitcli.finetune.runfiles import PICTURE_FILES, SUMMARY_FILE
from bitcli.finetune.start import check_resolution
from bitcli.formats import BIT_DEFAULT_PREPROCESS
from bitcli.metrics import selection_metrics
from bitcli.options import FinetuneOptions
from bitcli.preprocess import Preprocess
from bitcli.ui import visible

# Plan fields that decide the weights: a resumed run must agree on all of them.
RESULT_FIELDS = (
    "classes", "train_examples", "train_fingerprint", "model", "random_init", "architecture", "shots", "seed",
    "resize", "crop", "steps", "boundaries", "lr", "batch_size", "mixup", "head_only", "class_weights", "sampler",
    "keep_best", "multi_label", "cache_features", "flip",
)  # fmt: skip
# The RESULT_FIELDS that follow from the data alone: with the flags unchanged, the data changed.
DATA_FIELDS = ("classes", "train_examples", "train_fingerprint")
# RESULT_FIELDS added later, with the value that runs started before them had (their plans lack the field;
# they stay resumable).
RESULT_DEFAULTS = {"head_only": False, "class_weights": None, "sampler": None, "keep_best": None, "multi_label": False,
                   "cache_features": False, "flip": True}  # fmt: skip
# The HyperRule's resolution assumes a start model pre-trained at about 224 px (BiT-M/S). Beyond this factor
# between the chosen crop and the start model's own, the plan says so (issue 12: a model trained at 32 px
# reached 0.37 top-1 at the rule's 128 px and 0.93 at its own size).
OWN_SIZE_RATIO = 2
HYPERRULE_UPSTREAM = 224  # px: the upstream resolution the rule was made for (BiT-M/S pre-training)
# Largest over smallest class of the training set beyond which the plan suggests the imbalance flags.
IMBALANCE_NOTE_RATIO = 5
HISTOGRAM_NAMED = 3  # classes named where several share the smallest (or largest) size


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
    head_only: bool  # --head-only: the backbone frozen, only the new head trains
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
    notes: tuple[str, ...] = ()  # advice printed with the plan (e.g. the start model's own resolution)
    tensorboard: bool = False  # --tensorboard: TensorBoard events under DIR/tensorboard
    class_sizes: tuple[int, ...] = ()  # training images of each class, in `classes` order
    class_weights: str | None = None  # --class-weights balanced: inverse-frequency weights in the loss
    sampler: str | None = None  # --sampler balanced: classes drawn uniformly at every step
    keep_best: str | None = None  # --keep-best METRIC: the best validated model also goes to DIR/best/
    calibrate: bool = True  # fit the temperature on the validation set at the end (--no-calibrate: off)
    multi_label: bool = False  # the data gives several labels a row: sigmoid outputs, BCE, per-class thresholds
    cache_features: bool = False  # --cache-features: the head trains on cached eval-transform features
    flip: bool = True  # half the training crops mirrored (--no-flip: none)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


# ----------------------------------------------------------------------------------------------------------
# Checks that need the data or the architecture (the CLI has already parsed every flag's form)


def check_flags(opts: FinetuneOptions, info: Dist, config: BitConfig, *, has_validation: bool = True,
                multi_label: bool = False) -> None:  # fmt: skip
    """Every flag's range, before any image is decoded or weight built (make_plan relies on them).
    has_validation: DATA has a validation split of its own; multi_label: its rows give several labels."""
    check_resolution(opts.resolution, config)
    if multi_label:
        refused = [(flag, v) for flag, v in (("--class-weights", opts.class_weights), ("--sampler", opts.sampler))
                   if v is not None]  # fmt: skip
        if refused:
            name, choice = refused[0]
            raise UsageError(f"{name} {choice}: not available for multi-label data yet; leave it out")
    check_keep_best(opts.keep_best, multi_label)
    for flag, value, minimum in (("--steps", opts.steps, 1), ("--batch-split", opts.batch_split, 1),
                                 ("--eval-every", opts.eval_every, 0), ("--save-every", opts.save_every, 1)):  # fmt: skip
        if value is not None and value < minimum:
            raise UsageError(f"{flag} {value}: must be at least {minimum}")
    if opts.mixup is not None and not (math.isfinite(opts.mixup) and opts.mixup >= 0):
        raise UsageError(f"--mixup {opts.mixup}: must be a number >= 0")
    if opts.lr <= 0 or not math.isfinite(opts.lr):
        raise UsageError(f"--lr {opts.lr}: must be a positive number")
    if opts.keep_best is not None and not (has_validation or opts.val_split is not None):
        raise UsageError(
            f"--keep-best {opts.keep_best}: selects on the validation set, and the run has none; "
            "pass --val DATA or --val-split F"
        )
    if opts.cache_features and info.world > 1:
        raise UsageError("--cache-features runs in one process (the features are this process's); drop torchrun")
    if opts.batch_size % info.world:
        raise UsageError(f"--batch-size {opts.batch_size}: must divide evenly over the {info.world} processes")
    per_rank = opts.batch_size // info.world
    if opts.batch_split is not None and per_rank % opts.batch_split:
        raise UsageError(
            f"--batch-split {opts.batch_split}: must divide the {per_rank} images each process takes per step "
            f"(--batch-size {opts.batch_size} over {info.world} process(es))"
        )


def check_keep_best(metric: object, multi_label: bool) -> None:
    """--keep-best METRIC must mean something for the data's kind (known once the labels are read): top-1 and
    balanced accuracy count one label an image, mAP ranks each class's scores over images of several labels."""
    if metric is None or str(metric) in selection_metrics(multi_label):
        return
    valid = ", ".join(selection_metrics(multi_label))
    if multi_label:
        raise UsageError(f"--keep-best {metric}: counts one label an image, and this data is multi-label (several "
                         f"labels a row); use --keep-best mAP (or one of {valid})")  # fmt: skip
    raise UsageError(f"--keep-best {metric}: is for multi-label data, and this data has one label an image; use "
                     f"--keep-best top1 (or one of {valid})")  # fmt: skip


def check_same_run(saved: dict[str, Any], plan: Plan, output) -> None:
    """--resume: the saved plan and this one must agree on everything that decides the weights. When only the
    training data differs (same flags), the message says so: repeating the flags cannot fix that."""
    now = plan.to_dict()
    before = {k: saved.get(k, RESULT_DEFAULTS.get(k)) for k in RESULT_FIELDS}
    changed = [k for k in RESULT_FIELDS if before[k] != now[k]]
    if not changed:
        return
    if set(changed) <= set(DATA_FIELDS):
        shown = "; ".join(_change(k, before[k], now[k]) for k in changed)
        raise BitError(
            f"--resume: the training data of {output} changed since the run started ({shown}): restore the images "
            "and labels it started with (and its --val-split, if any), or pass --overwrite to start again"
        )
    shown = "; ".join(_change(k, before[k], now[k]) for k in changed[:3])
    raise BitError(
        f"--resume: {output} was started with other settings ({shown}); repeat the original flags "
        "or pass --overwrite to start again"
    )


def _change(field: str, before: Any, now: Any) -> str:
    if field == "train_fingerprint" and isinstance(before, str) and isinstance(now, str):
        return f"{field} {before[:12]}... -> {now[:12]}..."
    if field == "flip":  # the flag is the negation: name it
        return f"flip {before!r} -> {now!r}: --no-flip {'given' if now is False else 'left out'} now"
    text = f"{field} {before!r} -> {now!r}"
    return text if len(text) < 120 else text[:117] + "..."


# ----------------------------------------------------------------------------------------------------------
# Planning: each automatic choice with its reason


def _resolution(opts: FinetuneOptions, ds: Datasets) -> tuple[hyperrule.Resolution, str]:
    res = opts.resolution
    if res is not None:
        typed = res.crop if res == hyperrule.resolution_for_crop(res.crop) else f"{res.resize}:{res.crop}"
        return res, f"--resolution {typed}"
    area = median_area(ds.train)
    side = "<" if area < hyperrule.SMALL_IMAGE_AREA else ">="
    return hyperrule.resolution(area), f"HyperRule: median image area {area:,.0f} px {side} 96x96"


def stated_preprocess(ckpt: Any) -> Preprocess | None:
    """The start checkpoint's own preprocessing; None for --random-init and for checkpoints that state none
    (a .npz, a folder without a preprocessor config): bit's default stands in there, which says nothing
    about the size the model was trained at (BiT-M's upstream .npz files were pre-trained at 224 px)."""
    if ckpt is None or ckpt.format == "npz" or ckpt.preprocess is BIT_DEFAULT_PREPROCESS:
        return None
    return ckpt.preprocess


def own_size(pre: Preprocess | None) -> int | None:
    """The start model's own input size (px): its preprocessing's crop, else its resize (the shorter side
    of a non-square one); None when nothing says."""
    size = None if pre is None else pre.crop if pre.crop is not None else pre.resize
    if size is None:
        return None
    return size if isinstance(size, int) else min(size)


def _ratio(a: int, b: int) -> float:
    return max(a, b) / min(a, b)


def _size_notes(opts: FinetuneOptions, crop: int, own: int | None) -> tuple[str, ...]:
    """A note when the HyperRule's crop is far from the start model's own size, with the flag that keeps the
    model's size. Far: more than OWN_SIZE_RATIO x, and more than the rule itself moves a model of the 224 px
    it assumes (480 / 224 = 2.14x: a 224-px BiT-M at 480 is the rule as designed). The rule stays the
    default; a typed --resolution gets no note."""
    if opts.resolution is not None or own is None:
        return ()
    ratio = _ratio(crop, own)
    if ratio <= max(OWN_SIZE_RATIO, _ratio(crop, HYPERRULE_UPSTREAM)):
        return ()
    keep = hyperrule.resolution_for_crop(own)
    return (
        f"the HyperRule's crop of {crop} px differs by {ratio:.3g}x from the start model's own {own} px (its "
        f"preprocessing); a model can transfer badly far from its own size: --resolution {keep.resize}:{keep.crop} "
        "keeps it",
    )


def imbalance_ratio(sizes: tuple[int, ...]) -> float:
    """Largest over smallest class (of those with images): 1 for balanced data."""
    present = [n for n in sizes if n]
    return max(present) / min(present) if present else 1.0


def class_lines(plan: Plan) -> list[str]:
    """The class histogram in one line (histogram_line); above IMBALANCE_NOTE_RATIO without a balancing flag,
    the flags that weigh the classes equally (the HyperRule stays the default); with them, what they do."""
    sizes = plan.class_sizes
    if not sizes:  # a plan from before the histogram
        return []
    ratio = imbalance_ratio(sizes)
    lines = [histogram_line(plan.classes, sizes)]
    balance = []
    if plan.class_weights:
        weights = balanced_class_weights(np.repeat(np.arange(len(sizes)), sizes), len(sizes))
        balance.append(f"loss weighted by inverse class frequency, {weights.min():.3g} to {weights.max():.3g} "
                       "(--class-weights balanced)")  # fmt: skip
    if plan.sampler:
        balance.append("each step draws classes uniformly, then an image of the class (--sampler balanced)")
    if balance:
        lines.append(f"  balance     {'; '.join(balance)}")
    elif ratio > IMBALANCE_NOTE_RATIO:
        lines.append(f"  note        the classes are imbalanced: {imbalance_advice(plan)}")
    return lines


def imbalance_advice(plan: Plan) -> str:
    """What the imbalance note suggests: only flags this run would accept (the balancing flags are single-label
    only; --keep-best needs a validation set) by a measure that weighs every class equally (balanced accuracy
    counts one label an image: a multi-label run's is mAP, the mean of the classes' APs)."""
    if plan.multi_label:
        advice = "--class-weights and --sampler are single-label only"
        best = "; --keep-best mAP keeps the best model by the mean of the classes' APs"
    else:
        advice = "--class-weights balanced or --sampler balanced weigh them equally in training"
        best = "; --keep-best balanced_accuracy keeps the best model by the same measure"
    return advice + (best if plan.validation and not plan.keep_best else "")


def histogram_line(classes: Sequence[str], sizes: Sequence[int]) -> str:
    """`classes     3: smallest 'blue' (2 images), largest 'red' (18); imbalance ratio 9:1`; several classes of
    the smallest (or largest) size are counted (`smallest 3 classes of 1 image ('a', 'b', 'c')`), and classes
    all of one size are said to be (`classes     10, 50 images each`)."""
    low, high = min(sizes), max(sizes)
    if low == high:
        return f"  classes     {len(sizes)}, {_images(low)} each"
    named = {n: [c for c, size in zip(classes, sizes) if size == n] for n in (low, high)}  # (repr escapes them)
    small = _extreme("smallest", named[low], low, f"({_images(low)})")
    large = _extreme("largest", named[high], high, f"({high:,})")
    return f"  classes     {len(sizes)}: {small}, {large}; imbalance ratio {imbalance_ratio(tuple(sizes)):.3g}:1"


def _extreme(which: str, named: list[str], size: int, alone: str) -> str:
    """`smallest 'blue' (2 images)` (`alone`: its size), or for classes sharing the size `smallest 3 classes of
    2 images ('a', 'b', 'c')`, the first HISTOGRAM_NAMED of them named."""
    if len(named) == 1:
        return f"{which} {named[0]!r} {alone}"
    listed = ", ".join(repr(c) for c in named[:HISTOGRAM_NAMED]) + (", ..." if len(named) > HISTOGRAM_NAMED else "")
    return f"{which} {len(named):,} classes of {_images(size)} ({listed})"


def _images(n: int) -> str:
    return f"{n:,} image{'s' * (n != 1)}"


def selection_lines(plan: Plan) -> list[str]:
    """The temperature fit and --keep-best (runs with a validation set)."""
    if plan.multi_label:
        lines = ["  labels      multi-label (several labels a row): sigmoid outputs, binary cross-entropy on the "
                 "(MixUp-mixed) multi-hot targets"]  # fmt: skip
        if plan.validation:
            lines.append("  thresholds  per class, the F1-maximising one on the validation set, stored with the model")
        else:
            lines.append("  thresholds  0.5 for every class (no validation set to choose them on)")
    elif not plan.validation:
        return []
    else:
        lines = [
            "  calibrate   a temperature fitted on the validation set after the last step, stored with the model "
            "(--no-calibrate: off)"
            if plan.calibrate
            else "  calibrate   off (--no-calibrate): scores at temperature 1"
        ]
    if plan.keep_best:
        better = "lowest" if plan.keep_best == "loss" else "highest"
        lines.append(f"  keep best   the validated model of the {better} {plan.keep_best} also goes to best/ "
                     "(the final model stays the HyperRule's)")  # fmt: skip
    return lines


def _schedule(steps: int | None, n: int) -> tuple[hyperrule.Schedule, str]:
    regime = f"{n:,} training examples"
    if steps is None:
        return hyperrule.schedule(n), f"HyperRule for {regime}"
    reason = f"--steps {steps}: the HyperRule boundaries for {regime} scaled to {steps} step{'s' * (steps != 1)}"
    return hyperrule.scaled_schedule(n, steps), reason


def _mixup(alpha: float | None, n: int) -> tuple[float | None, str]:
    if alpha is None:
        return hyperrule.mixup_alpha(n), f"HyperRule for {n:,} training examples"
    return alpha or None, f"--mixup {alpha:g}"  # 0: off


def _batch_split(opts: FinetuneOptions, model, *, crop: int, info: Dist, device: torch.device, dtype: torch.dtype,
                 saved: dict[str, Any] | None) -> tuple[int, str]:  # fmt: skip
    per_rank = opts.batch_size // info.world
    if opts.batch_split is not None:
        return opts.batch_split, f"--batch-split {opts.batch_split}"
    if saved is not None and saved.get("world_size") == info.world and per_rank % int(saved["batch_split"]) == 0:
        return int(saved["batch_split"]), "auto: kept from the run being resumed"
    split, reason = auto_batch_split(model, per_rank, crop=crop, device=device, dtype=dtype, info=info)
    return split, f"auto: {reason}"


def make_plan(opts: FinetuneOptions, ds: Datasets, model, info: Dist, *, device: torch.device, dtype: torch.dtype,
              saved: dict[str, Any] | None, own: Preprocess | None = None) -> Plan:  # fmt: skip
    """The run's plan; `saved` is the plan of the run being resumed (its automatic batch split is kept);
    `own` is the start model's own preprocessing (None: --random-init)."""
    n = len(ds.train)
    why: dict[str, str] = {}
    res, why["resolution"] = _resolution(opts, ds)
    sched, why["steps"] = _schedule(opts.steps, n)
    alpha, why["mixup"] = _mixup(opts.mixup, n) if not opts.cache_features else (None, "off: --cache-features")
    split, why["batch_split"] = _batch_split(
        opts, model, crop=res.crop, info=info, device=device, dtype=dtype, saved=saved
    )
    eval_every, save_every = opts.eval_every, opts.save_every
    if eval_every is None:
        eval_every = math.ceil(sched.steps / 5)
        why["eval_every"] = "auto: 5 validations per run"
    if save_every is None:
        save_every = math.ceil(sched.steps / 10)
        why["save_every"] = "auto: 10 checkpoints per run"
    return Plan(
        data=str(opts.data),
        train_folder=ds.train.where(),
        validation=ds.validation,
        classes=ds.train.classes,
        train_examples=n,
        train_fingerprint=ds.train.fingerprint(),
        val_examples=len(ds.val) if ds.val is not None else 0,
        skipped=ds.skipped,
        model=opts.model,
        random_init=opts.random_init,
        head_only=opts.head_only,
        cache_features=opts.cache_features,
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
        micro_batch=opts.batch_size // info.world // split,
        mixup=alpha,
        device=str(device),
        precision=str(dtype).removeprefix("torch."),
        workers=opts.workers,
        eval_every=eval_every,
        save_every=save_every,
        why=why,
        notes=_size_notes(opts, res.crop, own_size(own)),
        tensorboard=opts.tensorboard,
        class_sizes=tuple(len(m) for m in ds.train.by_class()),
        class_weights=str(opts.class_weights) if opts.class_weights is not None else None,
        sampler=str(opts.sampler) if opts.sampler is not None else None,
        keep_best=str(opts.keep_best) if opts.keep_best is not None else None,
        calibrate=opts.calibrate and not ds.train.multi_label,  # multi-label: thresholds, not a temperature
        multi_label=ds.train.multi_label,
        flip=opts.flip,
    )


# ----------------------------------------------------------------------------------------------------------
# The plan for people


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
        f"  resolution  {train_transform(plan)}; eval resize {plan.crop}x{plan.crop}   [{plan.why['resolution']}]",
        f"  schedule    {plan.steps} step{'s' * (plan.steps != 1)}; {describe_schedule(plan.boundaries, plan.lr)}   "
        f"[{plan.why['steps']}]",
        f"  mixup       {'alpha ' + format(plan.mixup, 'g') if plan.mixup else 'off'}   [{plan.why['mixup']}]",
        f"  batch       {plan.batch_size} = {plan.world_size} process(es) x {plan.batch_split} micro-batch(es) of "
        f"{plan.micro_batch}   [{plan.why['batch_split']}]",
        f"  optimizer   SGD momentum {plan.momentum}, no weight decay, new head zero-initialised"
        + ("; backbone frozen (--head-only): only the head trains" if plan.head_only else "")
        + (", on cached features (--cache-features: no augmentation)" if plan.cache_features else ""),
        f"  device      {plan.device}, {plan.precision}; "
        + (f"validate every {plan.eval_every or plan.steps} steps, " if plan.validation else "")
        + f"checkpoint every {plan.save_every} steps",
    ]
    lines.append(f"  pictures    {pictures_line(bool(plan.validation))}"
                 + ("; TensorBoard events in tensorboard/" if plan.tensorboard else ""))  # fmt: skip
    lines[7:7] = class_lines(plan)  # before the optimizer
    lines[-1:-1] = selection_lines(plan)  # before the pictures
    lines[4:4] = [f"  note        {note}" for note in plan.notes]  # after the resolution line
    if plan.skipped:
        n = len(plan.skipped)
        lines.insert(3, f"  skipped     {n} image{'s' * (n != 1)} that do{'es' * (n == 1)} not decode (listed above; "
                        f"{SUMMARY_FILE} lists {'them' if n != 1 else 'it'} too)")  # fmt: skip
    return lines


def train_transform(plan: Plan) -> str:
    """The plan's words for what each training image goes through before the model."""
    if plan.cache_features:
        return "no crop or flip (--cache-features: each image's features of the eval transform, once)"
    mirrored = " + flip" if plan.flip else ", no flip (--no-flip)"
    return f"resize {plan.resize}x{plan.resize}, random crop {plan.crop}{mirrored}"


def pictures_line(has_validation: bool) -> str:
    """The plan's line about the pictures (bitcli.finetune.watch draws them)."""
    if not has_validation:
        return "none: no validation set"
    if not extras.available("plots"):
        return f"none: {extras.missing('plots')} is not installed ({extras.install('plots')})"
    return f"{', '.join(PICTURE_FILES)}: redrawn at every validation"


def describe_schedule(boundaries: tuple[int, ...], lr: float) -> str:
    """'lr 0.003 after a linear warm-up of 100 steps, /10 after steps 201, 301, 401' (short runs: less)."""
    warmup, decays = boundaries[0], boundaries[1:-1]
    text = f"lr {lr:g} " + (
        f"after a linear warm-up of {warmup} steps" if warmup else "from the first step (no warm-up)"
    )
    if not decays:
        return text + ", no decay"
    # Steps are counted from 1 here, as in the progress lines: the lr drops after boundary index d (0-based,
    # hyperrule.learning_rate), i.e. after the (d + 1)-th step.
    return text + f", /10 after step{'s' * (len(decays) > 1)} " + ", ".join(str(d + 1) for d in decays)
