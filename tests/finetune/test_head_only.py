"""--head-only: the linear probe on a frozen backbone. Every backbone tensor of the written model is the start
model's, bit for bit, while the head trains; no autograd before the head; exact resume; the plan says so, and a
run is not resumed with the setting changed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import run_main

from bitcli.distributed import Dist
from bitcli.errors import BitError
from bitcli.finetune import rundir
from bitcli.finetune.plan import check_same_run, describe
from bitcli.finetune.start import (
    build_start_model,
    freeze_backbone,
    random_init_config,
    start_point,
    trainable_parameters,
)
from bitcli.hub import load_checkpoint
from bitcli.model import BitModel

from .helpers import FAST, one_and_two_processes, read_metrics, read_weights
from .test_plan import _plan

FROZEN_LINE = "; backbone frozen (--head-only): only the head trains"
HEAD_KEYS = {"classifier.1.weight", "classifier.1.bias"}  # the head in the transformers layout bit writes
# MixUp on (partners cross micro-batches), two micro-batches, a warm-up and decays: the whole loop is exercised.
SHORT = ["--steps", "8", "--batch-size", "8", "--batch-split", "2", "--mixup", "0.3", "--seed", "2", "--eval-every", "4",
         "--save-every", "2", "--head-only"]  # fmt: skip


def test_the_backbone_runs_without_autograd() -> None:
    """Frozen: the features record no graph (no activations kept, no backward through the backbone), a step's
    backward reaches the head only, and the optimizer is given the head's parameters only."""
    torch.manual_seed(0)
    model = BitModel(random_init_config("tiny", 3)).train()
    freeze_backbone(model)
    assert trainable_parameters(model) == [model.head.weight, model.head.bias]
    x = torch.randn(2, 3, 16, 16)
    assert model.pre_logits(x).grad_fn is None
    torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 2])).backward()
    assert all(p.grad is None for name, p in model.named_parameters() if not name.startswith("head."))
    assert model.head.weight.grad is not None and torch.count_nonzero(model.head.weight.grad) > 0


def test_head_only_keeps_every_backbone_tensor(dataset: Path, tmp_path: Path, tiny_dir: Path) -> None:
    """From a pre-trained checkpoint: the written model's backbone equals the start model's bit for bit (every
    parameter and buffer, in the model and in the file), the head moved away from zero, the checkpoint holds
    momentum for the head only, and the plan says the backbone is frozen."""
    out = tmp_path / "run"
    code, _, err = run_main("finetune", dataset, "--output", out, "--model", tiny_dir, "--resolution", "16",
                            "--workers", "2", *SHORT)  # fmt: skip
    assert code == 0, err
    assert "  optimizer   SGD momentum 0.9, no weight decay, new head zero-initialised" + FROZEN_LINE + "\n" in err
    assert json.loads((out / "finetune_config.json").read_text())["head_only"] is True

    start, _, _ = build_start_model(start_point(str(tiny_dir), False, None, 3), 3, seed=0)
    before, after = start.state_dict(), load_checkpoint(str(out)).build_model().state_dict()
    assert before.keys() == after.keys()
    assert {name for name, _ in start.named_buffers()} <= before.keys()  # buffers compared too (BiT has none)
    backbone = [k for k in before if not k.startswith("head.")]
    assert len(backbone) == len(before) - 2
    for k in backbone:
        assert after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]), k
    assert torch.count_nonzero(after["head.weight"]) > 0 and torch.count_nonzero(after["head.bias"]) > 0

    # The files themselves: model.safetensors beside the start checkpoint's, tensor by tensor.
    written, original = read_weights(out / "model.safetensors"), read_weights(tiny_dir / "model.safetensors")
    assert written.keys() == original.keys()
    for k in written.keys() - HEAD_KEYS:
        assert torch.equal(written[k], original[k]), k
    assert not torch.equal(written["classifier.1.weight"], torch.zeros_like(written["classifier.1.weight"]))

    state = read_weights(out / "checkpoint.safetensors")
    assert {k for k in state if k.startswith("momentum.")} == {"momentum.head.weight", "momentum.head.bias"}


def _interrupt_at(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Ctrl-C while the metrics line of `step` is written (its checkpoint, if due, is not saved yet)."""
    write = rundir.MetricsLog.write

    def write_then_stop(self, record: dict) -> None:
        if record["step"] == step:
            raise KeyboardInterrupt
        write(self, record)

    monkeypatch.setattr(rundir.MetricsLog, "write", write_then_stop)


def test_head_only_resume_is_bit_identical(dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A head-only run stopped at step 5 and resumed (from the checkpoint of step 4) ends with the weights and
    metrics of the uninterrupted run, bit for bit."""
    straight = tmp_path / "straight"
    code, _, err = run_main("finetune", dataset, "--output", straight, *SHORT, *FAST)
    assert code == 0, err

    stopped = tmp_path / "stopped"
    with monkeypatch.context() as patch:
        _interrupt_at(patch, 5)
        code, _, err = run_main("finetune", dataset, "--output", stopped, *SHORT, *FAST)
    assert code == 130, err
    assert "stopped during step 6; `--resume` continues from the checkpoint of step 4" in err
    code, _, err = run_main("finetune", dataset, "--output", stopped, *SHORT, *FAST, "--resume")
    assert code == 0, err
    assert "resuming at step 5 of 8" in err

    a, b = read_weights(straight / "model.safetensors"), read_weights(stopped / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    ma, mb = read_metrics(straight), read_metrics(stopped)
    assert [m["step"] for m in mb] == list(range(8))
    assert [(m["lr"], m["loss"], m.get("val_top1")) for m in ma] == [
        (m["lr"], m["loss"], m.get("val_top1")) for m in mb
    ]


@pytest.mark.parametrize("first, then", [(["--head-only"], []), ([], ["--head-only"])])
def test_resume_refuses_a_changed_head_only(dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            first: list[str], then: list[str]) -> None:  # fmt: skip
    run = tmp_path / "run"
    common = ["finetune", dataset, "--output", run, "--steps", "4", "--batch-size", "8", "--eval-every", "0", *FAST]
    with monkeypatch.context() as patch:
        _interrupt_at(patch, 3)
        code, _, err = run_main(*common, *first)
    assert code == 130, err
    checkpoint = (run / "checkpoint.safetensors").read_bytes()
    code, _, err = run_main(*common, *then, "--resume")
    assert code == 1
    was, now = bool(first), bool(then)
    assert f"Error: --resume: {run} was started with other settings (head_only {was} -> {now}); repeat the original " \
           "flags or pass --overwrite to start again" in err  # fmt: skip
    assert (run / "checkpoint.safetensors").read_bytes() == checkpoint  # nothing touched
    code, _, err = run_main(*common, *first, "--resume")
    assert code == 0, err


def test_plans_from_before_head_only_still_resume(tmp_path: Path) -> None:
    """A plan written before --head-only existed has no head_only field: it was a full run."""
    full, probe = _plan(tmp_path, (64, 64), 100), _plan(tmp_path, (64, 64), 100, head_only=True)
    saved = {k: v for k, v in full.to_dict().items() if k != "head_only"}
    check_same_run(saved, full, tmp_path)
    with pytest.raises(BitError, match=r"\(head_only False -> True\)"):
        check_same_run(saved, probe, tmp_path)
    assert not any("frozen" in line for line in describe(full))
    assert [line for line in describe(probe) if "frozen" in line] == [
        "  optimizer   SGD momentum 0.9, no weight decay, new head zero-initialised" + FROZEN_LINE
    ]


def test_auto_batch_split_counts_no_backward_activations(tmp_path: Path) -> None:
    """With the backbone frozen nothing is kept for a backward: the CPU estimate per image for R50x1 is several
    times smaller (at 224 px 18 MiB against 154; a no_grad forward measured 16 MiB of peak RSS per image)."""
    from bitcli.finetune.memory import auto_batch_split

    model = BitModel(random_init_config("R50x1", 3))
    mib = {}
    for frozen in (False, True):
        if frozen:
            freeze_backbone(model)
        _, why = auto_batch_split(model, 8, crop=64, device=torch.device("cpu"), dtype=torch.float32, info=Dist())
        mib[frozen] = float(re.search(r"~([\d.]+) MiB", why).group(1))
    assert 0 < mib[True] < mib[False] / 4


@pytest.mark.slow  # a torchrun launch: about 8 s on 2 cores
def test_head_only_torchrun_two_processes_match_one(dataset: Path, tmp_path: Path) -> None:
    """DDP over a model whose backbone does not require gradients: it reduces the head's gradients only (no
    find_unused_parameters needed) and trains what one process trains; both keep the backbone."""
    one, two, stderr = one_and_two_processes(dataset, tmp_path, "--steps", "4", "--mixup", "0.3", "--eval-every", "0",
                                             "--head-only", *FAST[:-2], "--workers", "1")  # fmt: skip
    assert FROZEN_LINE in stderr
    a, b = read_weights(one / "model.safetensors"), read_weights(two / "model.safetensors")
    for key in a.keys() - HEAD_KEYS:
        assert torch.equal(a[key], b[key]), key  # the same random backbone, untouched in both
    for key in HEAD_KEYS:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(b["classifier.1.weight"]) > 0
