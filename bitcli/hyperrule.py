"""BiT-HyperRule: the fine-tuning resolution, schedule, learning rate and MixUp chosen from the data alone.

The numbers are those of Google's `big_transfer/bit_hyperrule.py` (see BIT_FACTS.md). Optimizer steps are
counted from 0; the run takes exactly `steps` optimizer steps (0 .. steps-1).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bitcli.errors import BitError

BASE_LR = 0.003
BATCH_SIZE = 512
MOMENTUM = 0.9
SMALL_IMAGE_AREA = 96 * 96  # strictly below: "small" images
SMALL_DATASET = 20_000  # strictly below: 500 steps, no MixUp
MEDIUM_DATASET = 500_000  # strictly below: 10k steps
MIXUP_ALPHA = 0.1
MIN_WARMUP = 2  # steps; a scaled warm-up shorter than this is dropped (see scaled_schedule)

SMALL_SCHEDULE = (100, 200, 300, 400, 500)
MEDIUM_SCHEDULE = (500, 3000, 6000, 9000, 10000)
LARGE_SCHEDULE = (500, 6000, 12000, 18000, 20000)


@dataclass(frozen=True)
class Resolution:
    resize: int  # training images are resized to a (resize, resize) square, then randomly cropped
    crop: int  # the training crop; evaluation resizes straight to (crop, crop)


@dataclass(frozen=True)
class Schedule:
    boundaries: tuple[int, ...]  # [end of warm-up (0: none), decay, ..., total steps]; short runs have fewer decays

    @property
    def steps(self) -> int:
        return self.boundaries[-1]


def resolution(area: float) -> Resolution:
    """Images smaller than 96x96 pixels train at 128 (from 160), the rest at 480 (from 512)."""
    return Resolution(160, 128) if area < SMALL_IMAGE_AREA else Resolution(512, 480)


def resolution_for_crop(crop: int) -> Resolution:
    """`--resolution CROP`: resize to CROP x 160/128 (the HyperRule's small-image ratio), then crop CROP."""
    if crop < 1:
        raise BitError(f"--resolution {crop}: the crop must be at least 1 pixel")
    return Resolution(round(crop * 160 / 128), crop)


def schedule(num_examples: int) -> Schedule:
    """500 steps below 20k training examples, 10k below 500k, 20k otherwise."""
    if num_examples < SMALL_DATASET:
        return Schedule(SMALL_SCHEDULE)
    if num_examples < MEDIUM_DATASET:
        return Schedule(MEDIUM_SCHEDULE)
    return Schedule(LARGE_SCHEDULE)


def scaled_schedule(num_examples: int, steps: int) -> Schedule:
    """`--steps N`: the HyperRule's boundaries for this data set, scaled by N / its length and rounded.

    A scaled warm-up under MIN_WARMUP steps is dropped: the ramp's first step always has lr 0, so a one-step
    warm-up would be one step that trains nothing (all of `--steps 1`). From two steps on, step 0 (lr 0, as
    in Google's schedules) still counts: its gradient starts the momentum that step 1 applies. Decays stay
    after the warm-up and after each other, and one that no step would feel (after step N-2) is left out, so
    every step of a short run has lr > 0 and the description lists each decay once. N = the rule's own
    length gives the rule exactly.
    """
    if steps < 1:
        raise BitError(f"--steps {steps}: a run needs at least one optimizer step")
    base = schedule(num_examples)
    warmup = round(base.boundaries[0] * steps / base.steps)
    warmup = warmup if warmup >= MIN_WARMUP else 0
    decays: list[int] = []
    for b in base.boundaries[1:-1]:
        at = max(round(b * steps / base.steps), (decays[-1] if decays else warmup) + 1)
        if at <= steps - 2:  # the decay applies from step at+1 on, which must be one of 0 .. steps-1
            decays.append(at)
    return Schedule((warmup, *decays, steps))


def learning_rate(step: int, sched: Schedule, base_lr: float = BASE_LR) -> float:
    """The lr of optimizer step `step` (from 0): linear warm-up, then ÷10 once for every later boundary < step."""
    warmup = sched.boundaries[0]
    if step < 0 or step >= sched.steps:
        raise ValueError(f"step {step} is outside the schedule (0 .. {sched.steps - 1})")
    if step < warmup:
        return base_lr * step / warmup
    lr = base_lr
    for boundary in sched.boundaries[1:]:
        if boundary < step:
            lr /= 10
    return lr


def mixup_alpha(num_examples: int) -> float | None:
    """MixUp with alpha 0.1 from 20k training examples up; none below."""
    return MIXUP_ALPHA if num_examples >= SMALL_DATASET else None


def mirrors(plan: Mapping[str, Any]) -> bool:
    """Whether a run mirrored half its training crops, as the rule does, from its plan (finetune_config.json as a
    dict): not with --no-flip. Plans written before --no-flip existed have no "flip": those runs mirrored. (A
    --cache-features run augments nothing; its readers say so before asking.)"""
    return bool(plan.get("flip", True))
