"""Real-world labels in fine-tuning: --class-weights balanced (scikit-learn's weights, the mean of weighted
losses), --sampler balanced (a function of seed and step: exact on resume and under torchrun), --keep-best
(best/ beside the final model, the same best after a resume), the temperature fitted on the validation set
(what `bit eval` then reports) and --no-calibrate, and the plan's class histogram."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import run_main, write_folder
from sklearn.utils.class_weight import compute_class_weight

from bitcli.data import StepSampler, balanced_class_weights
from bitcli.errors import BitError
from bitcli.finetune import loop
from bitcli.finetune.plan import check_same_run, describe
from bitcli.finetune.state import read_state

from .helpers import FAST, one_and_two_processes, read_metrics, read_weights
from .test_head_only import _interrupt_at
from .test_plan import _plan

COUNTS = {"red": 24, "green": 6, "blue": 3}  # 8:1


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("imbalanced")
    write_folder(root / "train", COUNTS)
    write_folder(root / "val", {"red": 4, "green": 4, "blue": 4}, seed=1)
    return root


def test_balanced_weights_equal_scikit_learn() -> None:
    y = np.random.default_rng(0).choice(5, size=300, p=[0.6, 0.2, 0.1, 0.07, 0.03])
    want = compute_class_weight("balanced", classes=np.arange(5), y=y)
    np.testing.assert_allclose(balanced_class_weights(y, 5), want, rtol=1e-15)
    assert balanced_class_weights([0, 0, 2], 3).tolist() == [0.5, 0.0, 1.0]  # a class without images: weight 0


def test_weighted_loss_is_the_mean_of_weighted_losses_and_splits_exactly() -> None:
    """With MixUp too: λ · mean(w[y] · CE(y)) + (1 - λ) · mean(w[y'] · CE(y')), computed directly; and the
    mean of two halves' losses is the whole batch's (PyTorch's weighted mean would divide each half by its
    own sum of weights)."""
    g = torch.Generator().manual_seed(0)
    logits, y, y_mix = torch.randn(8, 3, generator=g), torch.tensor([0, 0, 0, 0, 0, 1, 1, 2]), torch.arange(8) % 3
    w = torch.tensor([0.4, 1.3, 2.6])
    log_p = torch.log_softmax(logits.double(), dim=1)

    def direct(target: torch.Tensor) -> float:
        return float(torch.mean(-w.double()[target] * log_p[torch.arange(8), target]))

    got = loop.mixup_cross_entropy(logits, y, y_mix, 0.7, weight=w)
    assert float(got) == pytest.approx(0.7 * direct(y) + 0.3 * direct(y_mix), rel=1e-6)
    assert float(loop.mixup_cross_entropy(logits, y, None, 1.0, weight=w)) == pytest.approx(direct(y), rel=1e-6)
    halves = [loop.mixup_cross_entropy(logits[s], y[s], None, 1.0, weight=w) for s in (slice(0, 4), slice(4, 8))]
    assert float(sum(halves) / 2) == pytest.approx(direct(y), rel=1e-6)
    assert float(F.cross_entropy(logits, y, weight=w)) != pytest.approx(direct(y), rel=1e-3)  # not PyTorch's mean
    assert torch.equal(loop.mixup_cross_entropy(logits, y, None, 1.0), F.cross_entropy(logits, y))  # unweighted


def test_balanced_sampler_draws_classes_uniformly_as_a_function_of_seed_and_step() -> None:
    by_class = [np.arange(0, 60), np.arange(60, 66), np.arange(66, 69)]  # 60, 6 and 3 examples
    make = lambda seed: StepSampler(69, 30, seed, max_offset=4, mixup=None, by_class=by_class)  # noqa: E731
    a, b = make(0), make(0)
    forward = [a.sample(s).indices for s in range(400)]
    backward = [b.sample(s).indices for s in reversed(range(400))][::-1]  # any order: resumed, or another rank
    assert all(np.array_equal(x, y) for x, y in zip(forward, backward))
    drawn = np.concatenate(forward)
    classes = np.searchsorted([60, 66], drawn, side="right")
    np.testing.assert_allclose(np.bincount(classes) / len(drawn), [1 / 3] * 3, atol=0.015)  # 12,000 draws
    assert set(drawn[classes == 2]) == {66, 67, 68} and np.bincount(drawn[classes == 2] - 66).min() > 1200
    assert not np.array_equal(make(1).sample(0).indices, forward[0])
    plain = StepSampler(69, 30, 0, max_offset=4, mixup=None)
    assert np.bincount(np.searchsorted([60, 66], plain.sample(0).indices, side="right"), minlength=3)[0] > 15


def test_plan_shows_the_histogram_and_suggests_the_flags_when_imbalanced(tmp_path: Path) -> None:
    balanced = describe(_plan(tmp_path, (32, 32), 100))
    assert "  classes     2, 50 images each" in balanced
    assert not any(line.startswith("  note        the classes are imbalanced") for line in balanced)
    assert not any(line.startswith("  balance") for line in balanced)


def test_imbalanced_run_plans_and_trains_with_the_weights_of_its_training_labels(
    imbalanced: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After --val-split (which holds out a quarter of each class), the weights are scikit-learn's on the
    training labels that remain; the plan says so. Without the flags, the plan suggests them."""
    seen: list[tuple[np.ndarray, np.ndarray]] = []
    original = loop.balanced_class_weights

    def spy(targets, num_classes):
        weights = original(targets, num_classes)
        seen.append((np.asarray(targets), weights))
        return weights

    monkeypatch.setattr(loop, "balanced_class_weights", spy)
    out = tmp_path / "run"
    common = ["finetune", imbalanced / "train", "--val-split", "0.25", "--steps", "2", "--batch-size", "8",
              "--eval-every", "0", "--no-calibrate", *FAST]  # fmt: skip
    code, _, err = run_main(*common, "--output", out, "--class-weights", "balanced")
    assert code == 0, err
    ((targets, weights),) = seen
    plan = json.loads((out / "finetune_config.json").read_text())
    assert plan["classes"] == ["blue", "green", "red"] and plan["class_sizes"] == [2, 4, 18]  # 3, 6, 24 less 1/4
    assert np.bincount(targets).tolist() == plan["class_sizes"]
    np.testing.assert_allclose(weights, compute_class_weight("balanced", classes=np.arange(3), y=targets))
    assert plan["class_weights"] == "balanced" and plan["sampler"] is None
    assert "  classes     3: smallest 'blue' (2 images), largest 'red' (18); imbalance ratio 9:1\n" in err
    assert f"  balance     loss weighted by inverse class frequency, {weights.min():.3g} to {weights.max():.3g} " \
           "(--class-weights balanced)\n" in err  # fmt: skip

    code, _, err = run_main(*common, "--output", tmp_path / "plain")
    assert code == 0, err
    assert len(seen) == 1  # no weights without the flag
    assert (
        "  note        the classes are imbalanced: --class-weights balanced or --sampler balanced weigh them "
        "equally in training; --keep-best balanced_accuracy keeps the best model by the same measure\n"
    ) in err


SHORT = ["--steps", "8", "--batch-size", "8", "--batch-split", "2", "--mixup", "0.3", "--seed", "1", "--eval-every",
         "2", "--save-every", "2", "--sampler", "balanced", "--class-weights", "balanced", "--keep-best",
         "macro_f1", *FAST]  # fmt: skip


def _expected_best(run: Path, before: int) -> tuple[float, int]:
    """The first highest val_macro_f1 of the validations before step `before`, from metrics.jsonl."""
    records = [m for m in read_metrics(run) if "val_macro_f1" in m and m["step"] < before]
    best = max(records, key=lambda m: (m["val_macro_f1"], -m["step"]))
    return best["val_macro_f1"], best["step"]


def test_balanced_run_with_keep_best_resumes_bit_identical(imbalanced: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Balanced sampler, class weights, MixUp across micro-batches and --keep-best: stopped in step 5 (after its
    validation, so best/ may already hold a step the checkpoint of step 4 does not cover) and resumed, the
    run ends with the uninterrupted run's weights, metrics, best/ and summary, bit for bit."""
    straight = tmp_path / "straight"
    code, _, err = run_main("finetune", imbalanced, "--output", straight, *SHORT)
    assert code == 0, err
    summary = json.loads((straight / "summary.json").read_text())
    value, step = _expected_best(straight, 8)
    assert summary["best"]["metric"] == "macro_f1" and (summary["best"]["value"], summary["best"]["step"]) == (
        value,
        step,
    )
    assert sorted(p.name for p in (straight / "best").iterdir()) == ["config.json", "model.safetensors",
                                                                     "preprocessor_config.json"]  # fmt: skip

    stopped = tmp_path / "stopped"
    with monkeypatch.context() as patch:
        _interrupt_at(patch, 5)
        code, _, err = run_main("finetune", imbalanced, "--output", stopped, *SHORT)
    assert code == 130, err
    saved = read_state(stopped / "checkpoint.safetensors")[1]["best"]
    assert (saved["value"], saved["step"]) == _expected_best(straight, 4)  # what the straight run had then
    code, out, err = run_main("report", stopped)  # the interrupted run's best/, as its checkpoint records it
    assert code == 0, err
    (line,) = [line for line in out.splitlines() if line.startswith("best ")]
    bound = saved["calibration"].get("at_bound")
    note = f", at the bound {bound:.2f} of its range: the validation set is too small or too easy to fit it"
    assert line == (f"best        macro_f1 {saved['value']:.4f} after step {saved['step'] + 1} (temperature "
                    f"{saved['temperature']:.4f}{note if bound is not None else ''}): {stopped / 'best'} (as the "
                    "checkpoint of step 4 records it)")  # fmt: skip
    code, _, err = run_main("finetune", imbalanced, "--output", stopped, *SHORT, "--resume")
    assert code == 0, err
    assert "resuming at step 5 of 8" in err

    for name in ("model.safetensors", "best/model.safetensors"):
        a, b = read_weights(straight / name), read_weights(stopped / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert (stopped / "best" / "config.json").read_bytes() == (straight / "best" / "config.json").read_bytes()
    keys = ("lr", "loss", "val_macro_f1", "val_balanced_accuracy")
    assert [[m.get(k) for k in keys] for m in read_metrics(straight)] == [
        [m.get(k) for k in keys] for m in read_metrics(stopped)
    ]
    resumed = json.loads((stopped / "summary.json").read_text())
    assert resumed["best"] == summary["best"] and resumed["calibration"] == summary["calibration"]

    # best/ is a model of its own: its validation is what `bit eval` gives on the same images, at its temperature
    config = json.loads((straight / "best" / "config.json").read_text())
    assert config.get("bitcli_temperature", 1.0) == summary["best"]["temperature"]
    code, out, err = run_main("eval", imbalanced / "val", "--model", straight / "best", "--format", "json")
    assert code == 0, err
    assert json.loads(out)["macro_f1"] == summary["best"]["value"]
    code, out, err = run_main("report", straight)
    assert code == 0, err
    assert f"best        macro_f1 {value:.4f} after step {step + 1} (temperature " in out
    assert f"  {straight / 'best'}  the best validated model by macro_f1 (--keep-best)" in out


def test_calibration_is_what_eval_reports_and_no_calibrate_turns_it_off(imbalanced: Path, tmp_path: Path) -> None:
    common = ["finetune", imbalanced, "--steps", "4", "--batch-size", "8", "--eval-every", "0", "--lr", "0.05", *FAST]
    code, _, err = run_main(*common, "--output", tmp_path / "cal")
    assert code == 0, err
    cal = json.loads((tmp_path / "cal" / "summary.json").read_text())["calibration"]
    assert f"calibrated: temperature {cal['temperature']:.4g} fitted on 12 validation images; ECE " in err
    assert cal["val_nll_after"] <= cal["val_nll_before"]  # the fit minimises it; T = 1 is a candidate
    code, out, err = run_main("eval", imbalanced / "val", "--model", tmp_path / "cal", "--format", "json")
    assert code == 0, err
    result = json.loads(out)
    assert result["temperature"] == cal["temperature"]
    assert result["nll"] == pytest.approx(cal["val_nll_after"], rel=1e-5)
    assert result["ece"] == pytest.approx(cal["val_ece_after"], abs=1e-6)
    assert result["loss"] == pytest.approx(cal["val_nll_before"], rel=1e-5)  # the loss stays at temperature 1

    code, _, err = run_main(*common, "--output", tmp_path / "plain", "--no-calibrate")
    assert code == 0, err
    assert json.loads((tmp_path / "plain" / "summary.json").read_text())["calibration"] is None
    assert "bitcli_temperature" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    assert "  calibrate   off (--no-calibrate): scores at temperature 1\n" in err
    code, out, err = run_main("report", tmp_path / "plain")
    assert code == 0, err
    assert "\ncalibration none: --no-calibrate; scores at temperature 1\n" in out
    assert "calibrated  " not in out
    code, out, err = run_main("report", tmp_path / "cal")
    assert code == 0, err
    assert f"\ncalibrated  temperature {cal['temperature']:.4f}: validation ECE {cal['val_ece_before']:.4f} -> " in out
    a, b = read_weights(tmp_path / "cal" / "model.safetensors"), read_weights(tmp_path / "plain" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # calibration changes no weight


def test_keep_best_needs_a_validation_set_and_a_known_metric(imbalanced: Path, tmp_path: Path) -> None:
    args = ["finetune", imbalanced / "train", "--output", tmp_path / "run", "--steps", "2", *FAST]
    code, _, err = run_main(*args, "--keep-best", "top1")
    assert code == 2
    assert err == ("Error: --keep-best top1: selects on the validation set, and the run has none; pass --val DATA "
                   "or --val-split F\n")  # fmt: skip
    code, _, err = run_main(*args, "--keep-best", "accuracy")
    assert code == 2 and err == (
        "Error: --keep-best accuracy: not a metric; use top1, macro_f1, balanced_accuracy or loss (single-label "
        "data), mAP, macro_f1 or loss (multi-label data)\n"
    )  # the metrics spelt as the docs and every other message spell them (mAP, not map)
    code, _, err = run_main(*args, "--keep-best", "MAP")  # in any case
    assert code == 2 and err.startswith("Error: --keep-best mAP: "), err
    assert not (tmp_path / "run").exists()


def test_resume_refuses_changed_balance_flags_and_old_plans_resume(tmp_path: Path) -> None:
    plain = _plan(tmp_path, (32, 32), 100)
    saved = {k: v for k, v in plain.to_dict().items() if k not in ("class_weights", "sampler", "keep_best")}
    check_same_run(saved, plain, tmp_path)  # a plan from before these flags: none of them was on
    for flags, shown in (({"class_weights": "balanced"}, "class_weights None -> 'balanced'"),
                         ({"sampler": "balanced"}, "sampler None -> 'balanced'"),
                         ({"keep_best": "loss"}, "keep_best None -> 'loss'")):  # fmt: skip
        with pytest.raises(BitError, match=shown):
            check_same_run(saved, _plan(tmp_path, (32, 32), 100, **flags), tmp_path)


@pytest.mark.slow  # a torchrun launch
def test_balanced_sampler_and_weights_under_torchrun_match_one_process(imbalanced: Path, tmp_path: Path) -> None:
    one, two, _ = one_and_two_processes(imbalanced, tmp_path, "--steps", "3", "--mixup", "0.3", "--eval-every", "0",
                                        "--sampler", "balanced", "--class-weights", "balanced", "--no-calibrate",
                                        "--workers", "1", *FAST[:-2])  # fmt: skip
    a, b = read_weights(one / "model.safetensors"), read_weights(two / "model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    assert np.allclose([m["loss"] for m in read_metrics(one)], [m["loss"] for m in read_metrics(two)], rtol=1e-5)
