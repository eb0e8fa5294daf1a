"""BiT-HyperRule: the fine-tuning resolution, schedule, learning rate and MixUp chosen from the data alone.

The numbers are those of Google's `big_transfer/bit_hyperrule.py` (see BIT_FACTS.md). Optimizer steps are
counted from 0; the run takes exactly `steps` optimizer steps (0 .. steps-1).
"""

from __future__ import annotations

from dataclasses import dataclass

from bitcli.errors import BitError

BASE_LR = 0.003
BATCH_SIZE = 512
MOMENTUM = 0.9
SMALL_IMAGE_AREA = 96 * 96  # strictly below: "small" images
SMALL_DATASET = 20_000  # strictly below: 500 steps, no MixUp
MEDIUM_DATASET = 500_000  # strictly below: 10k steps
MIXUP_ALPHA = 0.1

SMALL_SCHEDULE = (100, 200, 300, 400, 500)
MEDIUM_SCHEDULE = (500, 3000, 6000, 9000, 10000)
LARGE_SCHEDULE = (500, 6000, 12000, 18000, 20000)


@dataclass(frozen=True)
class Resolution:
    resize: int  # training images are resized to a (resize, resize) square, then randomly cropped
    crop: int  # the training crop; evaluation resizes straight to (crop, crop)


@dataclass(frozen=True)
class Schedule:
    boundaries: tuple[int, ...]  # [end of warm-up, decay, decay, ..., total steps]

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

    Warm-up keeps at least one step (so step 0 still has lr 0) and the last boundary is exactly N; for
    very short runs two boundaries may coincide, which simply applies both decays at once.
    """
    if steps < 1:
        raise BitError(f"--steps {steps}: a run needs at least one optimizer step")
    base = schedule(num_examples)
    scaled = [max(1, round(b * steps / base.steps)) for b in base.boundaries[:-1]]
    return Schedule((*(min(b, steps) for b in scaled), steps))


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
