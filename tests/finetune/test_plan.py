"""The plan: the HyperRule applied to real folders, explicit flags and where each choice came from, the
architectures --random-init accepts, the checks of typed options, and --resume against other settings."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BIT50_PREPROCESSOR, run_main, save_hf_model, write_folder
from PIL import Image

from bitcli.architectures import from_name
from bitcli.config import BitConfig
from bitcli.distributed import Dist
from bitcli.errors import BitError, UsageError
from bitcli.finetune.datasets import Datasets
from bitcli.finetune.plan import check_flags, describe, make_plan, stated_preprocess
from bitcli.finetune.start import random_init_config
from bitcli.formats import BIT_DEFAULT_PREPROCESS
from bitcli.hub import load_checkpoint
from bitcli.hyperrule import Resolution, resolution_for_crop
from bitcli.model import BitModel
from bitcli.options import FinetuneOptions
from bitcli.preprocess import Preprocess
from bitcli.sources.examples import ImageFolder

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
    opts = FinetuneOptions(
        data=ds.root, model="tiny", output=tmp_path / "out", random_init=True, batch_split=1, **flags
    )
    model = BitModel(random_init_config("tiny", 2))
    return make_plan(
        opts, Datasets(ds, None, None), model, Dist(), device=torch.device("cpu"), dtype=torch.float32, saved=None
    )


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
    assert random_init_config("tiny", 3) == BitConfig(
        depths=(1, 1), hidden_sizes=(32, 64), embedding_size=16, num_groups=8, num_classes=3
    )
    assert random_init_config("R50x1", 7) == from_name("R50x1", num_classes=7)
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


def _own_note(crop: int, ratio: str, own: int, flag: str) -> str:
    return (f"the HyperRule's crop of {crop} px differs by {ratio}x from the start model's own {own} px (its "
            f"preprocessing); a model can transfer badly far from its own size: --resolution {flag} keeps it")  # fmt: skip


@pytest.mark.parametrize(
    "own, image, note",
    [
        (Preprocess(resize=32, crop=(32, 32)), (32, 32), _own_note(128, "4", 32, "40:32")),  # issue 12's 32-px model
        (Preprocess(resize=64, crop=(64, 64)), (32, 32), None),  # 128 / 64 = 2: not more than 2x
        (Preprocess(resize=64, crop=(64, 64)), (96, 96), _own_note(480, "7.5", 64, "80:64")),
        (Preprocess(resize=448, crop=(448, 448)), (32, 32), _own_note(128, "3.5", 448, "560:448")),  # google/bit-50
        (Preprocess(resize=256, crop=(224, 224)), (96, 96), None),  # BiT-M at 224 -> 480: the rule as designed
        (Preprocess(resize=256, crop=(224, 224)), (32, 32), None),
        (Preprocess(resize=30, crop=None), (32, 32), _own_note(128, "4.27", 30, "38:30")),  # no crop: the resize
        (Preprocess(resize=(40, 60), crop=None), (32, 32), _own_note(128, "3.2", 40, "50:40")),
        (None, (32, 32), None),  # --random-init, a .npz: nothing says the model's size
    ],
)
def test_plan_notes_a_start_model_far_from_the_hyperrule_crop(tmp_path: Path, own, image, note) -> None:
    ds = _folder(tmp_path, image, 10)
    opts = FinetuneOptions(data=ds.root, model="m", output=tmp_path / "out", batch_split=1)
    plan = make_plan(opts, Datasets(ds, None, None), BitModel(random_init_config("tiny", 2)), Dist(),
                     device=torch.device("cpu"), dtype=torch.float32, saved=None, own=own)  # fmt: skip
    assert plan.notes == ((note,) if note else ())
    assert plan.to_dict()["notes"] == ([note] if note else [])  # finetune_config.json keeps it
    lines = describe(plan)
    assert lines[3].startswith("  resolution  ")
    assert [line for line in lines if line.startswith("  note ")] == ([f"  note        {note}"] if note else [])
    if note:
        assert lines[4] == f"  note        {note}"  # right under the resolution it is about
    typed = dataclasses.replace(opts, resolution=Resolution(160, 128))  # a typed --resolution: the user chose
    assert make_plan(typed, Datasets(ds, None, None), BitModel(random_init_config("tiny", 2)), Dist(),
                     device=torch.device("cpu"), dtype=torch.float32, saved=None, own=own).notes == ()  # fmt: skip


def test_only_preprocessing_a_checkpoint_states_counts_as_its_own(tiny_dir: Path) -> None:
    from types import SimpleNamespace

    assert stated_preprocess(load_checkpoint(str(tiny_dir))).crop == (64, 64)
    assert stated_preprocess(None) is None  # --random-init
    stated = Preprocess.square(480, 480)
    assert stated_preprocess(SimpleNamespace(format="npz", preprocess=stated)) is None  # bit's default for a .npz
    assert stated_preprocess(SimpleNamespace(format="hf", preprocess=BIT_DEFAULT_PREPROCESS)) is None
    assert stated_preprocess(SimpleNamespace(format="hf", preprocess=stated)) is stated


def test_finetune_prints_and_records_the_start_models_own_resolution(tmp_path: Path, tiny_dir: Path) -> None:
    """A model trained at 32 px on 32-px images: the rule picks 128 (4x), the plan says so and how to keep
    32; the same data from tiny_dir's 64 px (2x) gets no note."""
    write_folder(tmp_path / "data", {"red": 3, "green": 3}, size=32)
    small = save_hf_model(tmp_path / "own32", {**BIT50_PREPROCESSOR, "size": {"shortest_edge": 32},
                                               "crop_size": {"height": 32, "width": 32}},
                          embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1], num_groups=8)  # fmt: skip
    note = _own_note(128, "4", 32, "40:32")
    for model, want in ((small, [note]), (tiny_dir, [])):
        out = tmp_path / f"run-{model.name}"
        code, _, err = run_main("finetune", tmp_path / "data", "--output", out, "--model", model, "--steps", "1",
                                "--batch-size", "2", "--batch-split", "1", "--eval-every", "0", "--workers", "0")  # fmt: skip
        assert code == 0, err
        assert "resize 160x160, random crop 128" in err and "[HyperRule: median image area 1,024 px < 96x96]" in err
        assert [line for line in err.splitlines() if line.startswith("  note ")] == [f"  note        {n}" for n in want]
        assert json.loads((out / "finetune_config.json").read_text())["notes"] == want


@pytest.mark.parametrize(
    "sizes, line",
    [
        ((1, 7), "  classes     2: smallest 'c0' (1 image), largest 'c1' (7); imbalance ratio 7:1"),
        ((50, 50, 50), "  classes     3, 50 images each"),
        ((1, 1), "  classes     2, 1 image each"),
        (
            (1, 9, 1, 9, 1),
            "  classes     5: smallest 3 classes of 1 image ('c0', 'c2', 'c4'), largest 2 classes of 9 "
            "images ('c1', 'c3'); imbalance ratio 9:1",
        ),
        (
            (2, 2, 2, 2, 1200),
            "  classes     5: smallest 4 classes of 2 images ('c0', 'c1', 'c2', ...), largest 'c4' "
            "(1,200); imbalance ratio 600:1",
        ),
    ],
)
def test_plan_class_histogram_line(tmp_path: Path, sizes: tuple[int, ...], line: str) -> None:
    """One image is `1 image`; classes all of one size say so instead of naming a smallest and a largest that are
    equal; classes sharing the smallest or largest size are counted, the first three named."""
    plan = dataclasses.replace(_plan(tmp_path, (32, 32), 100), classes=tuple(f"c{i}" for i in range(len(sizes))),
                               class_sizes=sizes)  # fmt: skip
    assert [x for x in describe(plan) if x.startswith("  classes ")] == [line]


@pytest.mark.parametrize(
    "multi_label, validation, keep_best, advice",
    [
        (False, "split 0.1 of the training folder", None,
         "--class-weights balanced or --sampler balanced weigh them equally in training; --keep-best "
         "balanced_accuracy keeps the best model by the same measure"),
        (False, None, None, "--class-weights balanced or --sampler balanced weigh them equally in training"),
        (False, "split 0.1 of the training folder", "macro_f1",
         "--class-weights balanced or --sampler balanced weigh them equally in training"),
        (True, "split 0.1 of the training folder", None,
         "--class-weights and --sampler are single-label only; --keep-best mAP keeps the best model by the mean of "
         "the classes' APs"),
        (True, None, None, "--class-weights and --sampler are single-label only"),
    ],
)  # fmt: skip
def test_imbalance_note_suggests_only_flags_the_run_accepts(
    tmp_path: Path, multi_label: bool, validation: str | None, keep_best: str | None, advice: str
) -> None:
    """--keep-best needs a validation set and the balancing flags single-label data: the note never suggests a
    flag this run would refuse, and it is shown for multi-label data too."""
    plan = dataclasses.replace(_plan(tmp_path, (32, 32), 100), classes=("a", "b"), class_sizes=(3, 18),
                               multi_label=multi_label, validation=validation, keep_best=keep_best)  # fmt: skip
    notes = [x for x in describe(plan) if x.startswith("  note        the classes")]
    assert notes == [f"  note        the classes are imbalanced: {advice}"]


def test_plan_quotes_class_names_with_control_characters_once(tmp_path: Path) -> None:
    plan = dataclasses.replace(_plan(tmp_path, (32, 32), 100), classes=("line\nbreak", "b"), class_sizes=(1, 2))
    assert [x for x in describe(plan) if x.startswith("  classes ")] == [
        "  classes     2: smallest 'line\\nbreak' (1 image), largest 'b' (2); imbalance ratio 2:1"
    ]
