"""BiT-HyperRule: lr at every step, schedule/resolution/MixUp at the regime boundaries, and a whole run that
follows the rule. (The planner that applies it to folders: tests/finetune/test_plan.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_main
from PIL import Image

from bitcli import hyperrule
from bitcli.errors import BitError


def google_get_schedule(dataset_size: int) -> list[int]:
    """Verbatim logic of big_transfer/bit_hyperrule.py (the oracle)."""
    if dataset_size < 20_000:
        return [100, 200, 300, 400, 500]
    elif dataset_size < 500_000:
        return [500, 3000, 6000, 9000, 10_000]
    else:
        return [500, 6000, 12_000, 18_000, 20_000]


def google_get_lr(step: int, dataset_size: int, base_lr: float = 0.003) -> float | None:
    supports = google_get_schedule(dataset_size)
    if step < supports[0]:
        return base_lr * step / supports[0]
    elif step >= supports[-1]:
        return None
    else:
        for s in supports[1:]:
            if s < step:
                base_lr /= 10
        return base_lr


@pytest.mark.parametrize("size, steps", [(1_000, 500), (50_000, 10_000), (1_281_167, 20_000)])
def test_lr_at_every_step_matches_google(size: int, steps: int) -> None:
    sched = hyperrule.schedule(size)
    assert sched.steps == steps
    for step in range(steps):
        assert hyperrule.learning_rate(step, sched) == google_get_lr(step, size)
    assert google_get_lr(steps, size) is None  # the run is exactly `steps` optimizer steps long
    with pytest.raises(ValueError):
        hyperrule.learning_rate(steps, sched)


def test_lr_landmarks_small_regime() -> None:
    sched = hyperrule.schedule(100)
    lr = [hyperrule.learning_rate(s, sched) for s in range(500)]
    assert lr[0] == 0.0
    assert lr[50] == pytest.approx(0.0015)
    assert lr[99] == pytest.approx(0.003 * 99 / 100)
    assert lr[100] == lr[200] == 0.003  # the decay applies strictly after a boundary
    assert lr[201] == pytest.approx(0.0003)
    assert lr[301] == pytest.approx(0.00003)
    assert lr[401] == lr[499] == pytest.approx(0.000003)


@pytest.mark.parametrize(
    "n, boundaries, mixup",
    [
        (1, hyperrule.SMALL_SCHEDULE, None),
        (19_999, hyperrule.SMALL_SCHEDULE, None),
        (20_000, hyperrule.MEDIUM_SCHEDULE, 0.1),
        (499_999, hyperrule.MEDIUM_SCHEDULE, 0.1),
        (500_000, hyperrule.LARGE_SCHEDULE, 0.1),
        (10_000_000, hyperrule.LARGE_SCHEDULE, 0.1),
    ],
)
def test_schedule_and_mixup_at_boundaries(n: int, boundaries: tuple[int, ...], mixup: float | None) -> None:
    assert hyperrule.schedule(n).boundaries == boundaries
    assert tuple(google_get_schedule(n)) == boundaries
    assert hyperrule.mixup_alpha(n) == mixup


@pytest.mark.parametrize(
    "area, resize, crop", [(1, 160, 128), (96 * 96 - 1, 160, 128), (96 * 96, 512, 480), (4000 * 3000, 512, 480)]
)
def test_resolution_at_boundary(area: int, resize: int, crop: int) -> None:
    assert hyperrule.resolution(area) == hyperrule.Resolution(resize, crop)


def test_recipe_constants() -> None:
    assert (hyperrule.BASE_LR, hyperrule.BATCH_SIZE, hyperrule.MOMENTUM) == (0.003, 512, 0.9)


def test_scaled_schedule() -> None:
    assert hyperrule.scaled_schedule(100, 500) == hyperrule.schedule(100)
    assert hyperrule.scaled_schedule(100, 300).boundaries == (60, 120, 180, 240, 300)
    assert hyperrule.scaled_schedule(50_000, 1000).boundaries == (50, 300, 600, 900, 1000)
    assert hyperrule.scaled_schedule(100, 1000).boundaries == (200, 400, 600, 800, 1000)
    for n in (100, 50_000, 1_000_000):  # the three regimes
        for steps in range(1, 300):
            sched = hyperrule.scaled_schedule(n, steps)
            warmup, *decays, total = sched.boundaries
            assert total == steps
            assert warmup == 0 or warmup >= hyperrule.MIN_WARMUP  # never a "warm-up" that is one step at lr 0
            assert [warmup, *decays] == sorted({warmup, *decays}) and all(d <= steps - 2 for d in decays)
            lrs = [hyperrule.learning_rate(s, sched) for s in range(steps)]
            assert all(lr > 0 for lr in lrs[1:]) and (lrs[0] > 0) == (warmup == 0)
            assert len(set(lrs[warmup:])) == len(decays) + 1  # every decay is felt by some step
    with pytest.raises(BitError):
        hyperrule.scaled_schedule(100, 0)


def test_short_schedules_train_at_every_step() -> None:
    """`--steps 1` was one step at lr 0 (nothing trained); `--steps 3` decayed "after steps 1, 2, 2"."""

    def lrs(steps: int) -> list[float]:
        sched = hyperrule.scaled_schedule(100, steps)
        return [hyperrule.learning_rate(s, sched) for s in range(steps)]

    assert hyperrule.scaled_schedule(100, 1).boundaries == (0, 1) and lrs(1) == [0.003]
    assert hyperrule.scaled_schedule(100, 2).boundaries == (0, 2) and lrs(2) == [0.003, 0.003]
    assert hyperrule.scaled_schedule(100, 3).boundaries == (0, 1, 3) and lrs(3) == pytest.approx([0.003, 0.003, 0.0003])
    assert hyperrule.scaled_schedule(100, 5).boundaries == (0, 2, 3, 5)
    assert hyperrule.scaled_schedule(100, 7).boundaries == (0, 3, 4, 7)
    assert hyperrule.scaled_schedule(100, 8).boundaries == (2, 3, 5, 6, 8)  # from here on a real ramp (0, half, full)
    assert hyperrule.scaled_schedule(50_000, 10).boundaries == (0, 3, 6, 10)


def test_resolution_for_crop() -> None:
    assert hyperrule.resolution_for_crop(128) == hyperrule.Resolution(160, 128)
    assert hyperrule.resolution_for_crop(32) == hyperrule.Resolution(40, 32)


# ----------------------------------------------------------------------------------------------------------
# A whole run


def test_auto_schedule_run_logs_the_rule_lr_at_every_step(tmp_path: Path) -> None:
    """`bit finetune` with the automatic schedule (500 steps for a small data set) uses the rule's lr at every
    optimizer step, as metrics.jsonl records it."""
    import torch

    rng = np.random.default_rng(0)
    for c in range(3):
        (tmp_path / "data" / f"c{c}").mkdir(parents=True)
        for i in range(7):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
                tmp_path / "data" / f"c{c}" / f"{i}.png"
            )
    tiny = '{"depths": [1, 1], "hidden_sizes": [32, 64], "embedding_size": 16, "num_groups": 8}'
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code, _, err = run_main("finetune", tmp_path / "data", "--output", tmp_path / "run", "--batch-size", "2",
                                "--eval-every", "0", "--save-every", "500", "--random-init", "--model", tiny,
                                "--resolution", "8", "--workers", "0")  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    assert "500 steps" in err and "HyperRule for 21 training examples" in err
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(500))
    assert [m["lr"] for m in metrics] == [google_get_lr(s, 21) for s in range(500)]
