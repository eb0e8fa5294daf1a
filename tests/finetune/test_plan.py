"""The plan: the HyperRule applied to real folders, explicit flags and where each choice came from, the
architectures --random-init accepts, the checks of typed options, and --resume against other settings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_main
from PIL import Image

from bitcli.config import BitConfig
from bitcli.data import ImageFolder
from bitcli.errors import BitError, UsageError
from bitcli.finetune.datasets import Datasets
from bitcli.finetune.distributed import Dist
from bitcli.finetune.plan import check_flags, describe, make_plan
from bitcli.finetune.start import random_init_config
from bitcli.hyperrule import Resolution, resolution_for_crop
from bitcli.model import BitModel
from bitcli.options import FinetuneOptions

from .helpers import FAST, TINY

GOOGLE_SCHEDULES = {500: [100, 200, 300, 400, 500], 10_000: [500, 3000, 6000, 9000, 10_000],
                    20_000: [500, 6000, 12_000, 18_000, 20_000]}  # big_transfer/bit_hyperrule.py  # fmt: skip


def _folder(tmp_path: Path, size: tuple[int, int], n: int) -> ImageFolder:
    """An ImageFolder of n entries (the same few real files repeated): the planner only counts and
    reads image headers, so this exercises it at data-set sizes too large to write to disk."""
    root = tmp_path / f"{size[0]}x{size[1]}"
    files = []
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        p = root / f"c{c}" / "a.png"
        Image.fromarray(np.zeros((size[1], size[0], 3), np.uint8)).save(p)
        files.append(str(p))
    paths = tuple(files[i % 2] for i in range(n))
    return ImageFolder(root, ("c0", "c1"), paths, tuple(i % 2 for i in range(n)))


def _plan(tmp_path: Path, size: tuple[int, int], n: int, **flags):
    ds = _folder(tmp_path, size, n)
    opts = FinetuneOptions(data=ds.root, model="tiny", output=tmp_path / "out", random_init=True, batch_split=1, **flags)
    model = BitModel(random_init_config("tiny", 2))
    return make_plan(opts, Datasets(ds, None, None), model, Dist(), torch.device("cpu"), torch.float32, None)


@pytest.mark.parametrize(
    "n, steps, mixup",
    [(19_999, 500, None), (20_000, 10_000, 0.1), (499_999, 10_000, 0.1), (500_000, 20_000, 0.1)],
)
def test_plan_steps_and_mixup_at_boundaries(tmp_path: Path, n: int, steps: int, mixup: float | None) -> None:
    plan = _plan(tmp_path, (32, 32), n)
    assert (plan.steps, plan.mixup) == (steps, mixup)
    assert list(plan.boundaries) == GOOGLE_SCHEDULES[steps]
    assert plan.lr == 0.003 and plan.batch_size == 512 and plan.momentum == 0.9
    assert plan.why["steps"] == f"HyperRule for {n:,} training examples" == plan.why["mixup"]


@pytest.mark.parametrize("size, resize, crop", [((95, 97), 160, 128), ((96, 96), 512, 480), ((120, 77), 512, 480)])
def test_plan_resolution_from_image_sizes(tmp_path: Path, size: tuple[int, int], resize: int, crop: int) -> None:
    plan = _plan(tmp_path, size, 10)
    assert (plan.resize, plan.crop) == (resize, crop)
    side = "<" if size[0] * size[1] < 96 * 96 else ">="
    assert plan.why["resolution"] == f"HyperRule: median image area {size[0] * size[1]:,} px {side} 96x96"


def test_plan_overrides(tmp_path: Path) -> None:
    plan = _plan(tmp_path, (32, 32), 100, steps=300, mixup=0.2, resolution=Resolution(40, 32), lr=0.01)
    assert plan.boundaries == (60, 120, 180, 240, 300)
    assert (plan.mixup, plan.resize, plan.crop, plan.lr) == (0.2, 40, 32, 0.01)
    assert json.loads(json.dumps(plan.to_dict()))["boundaries"] == [60, 120, 180, 240, 300]
    assert plan.why == {
        "resolution": "--resolution 32",  # 40:32 is what `--resolution 32` means: shown as typed
        "steps": "--steps 300: the HyperRule boundaries for 100 training examples scaled to 300 steps",
        "mixup": "--mixup 0.2",
        "batch_split": "--batch-split 1",
        "eval_every": "auto: 5 validations per run",
        "save_every": "auto: 10 checkpoints per run",
    }
    assert (plan.eval_every, plan.save_every) == (60, 30)
    assert _plan(tmp_path, (32, 32), 100, mixup=0.0).mixup is None
    assert _plan(tmp_path, (32, 32), 100, resolution=Resolution(48, 32)).why["resolution"] == "--resolution 48:32"
    lines = describe(_plan(tmp_path, (32, 32), 100, resolution=resolution_for_crop(16), steps=1))
    assert "  resolution  resize 20x20, random crop 16 + flip; eval resize 16x16   [--resolution 16]" in lines


def test_typed_options_are_checked_for_callers_other_than_the_cli() -> None:
    """finetune.run(FinetuneOptions(...)) from Python: out-of-range values are refused as the CLI refuses them."""
    config = random_init_config("tiny", 2)
    base = {"data": Path("d"), "model": "tiny", "output": Path("o")}
    cases = [
        ({"steps": 0}, "--steps 0: must be at least 1"),
        ({"save_every": 0}, "--save-every 0: must be at least 1"),
        ({"eval_every": -1}, "--eval-every -1: must be at least 0"),
        ({"mixup": float("nan")}, "--mixup nan: must be a number >= 0"),
        ({"lr": 0.0}, "--lr 0.0: must be a positive number"),
        ({"batch_size": 9}, "--batch-size 9: must divide evenly over the 2 processes"),
        ({"batch_size": 8, "batch_split": 3}, "--batch-split 3: must divide the 4 images each process takes per step"),
        ({"resolution": Resolution(5, 4)}, "a 4-px crop is below this model's total stride of 8 px"),
    ]
    for fields, message in cases:
        with pytest.raises(UsageError) as info:
            check_flags(FinetuneOptions(**base, **fields), Dist(0, 2), config)
        assert message in str(info.value), fields
    check_flags(FinetuneOptions(**base, batch_size=8, batch_split=2, resolution=Resolution(10, 8)), Dist(0, 2), config)


def test_random_init_specs() -> None:
    assert random_init_config("tiny", 3) == BitConfig(depths=(1, 1), hidden_sizes=(32, 64), embedding_size=16, num_groups=8, num_classes=3)
    assert random_init_config("R50x1", 7) == BitConfig.resnet(50, 1, num_classes=7)
    assert random_init_config(TINY, 2) == random_init_config("tiny", 2)
    for bad, message in [("R51x1", "use a preset"), ("{nope", "not valid JSON"), ('{"depth": [1]}', "unknown field")]:
        with pytest.raises(BitError, match=message):
            random_init_config(bad, 2)


def test_resume_refuses_other_settings(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["finetune", dataset, "--output", out, "--batch-size", "4", "--eval-every", "0", *FAST]
    assert run_main(*args, "--steps", "3")[0] == 0
    (out / "summary.json").unlink()
    code, _, err = run_main(*args, "--steps", "5", "--resume")
    assert code == 1 and "started with other settings" in err and "steps 3 -> 5" in err
