"""The resumable state: torch.optim.SGD with BiT's update, its momentum buffers saved and restored through
checkpoint.safetensors (no pickle), the fp16 loss scaler, and a run killed twice that resumes bit-identical."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from conftest import run_main

from bitcli.finetune.loop import bit_sgd
from bitcli.finetune.start import random_init_config
from bitcli.finetune.state import load_state, save_state
from bitcli.model import BitModel

from .helpers import FAST, PROCESS_ENV, bit_process, read_metrics, read_weights

PLAN = SimpleNamespace(seed=0, train_fingerprint="f" * 64, train_examples=10, batch_size=4)  # what the state records


def test_sgd_is_bits_momentum_update() -> None:
    """The buffer starts as the first gradient (also at lr 0), then buf = 0.9 buf + g and p -= lr buf: BiT's
    (and the MomentumSGD that bitcli had before torch.optim.SGD) update, bit for bit."""
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3, generator=g)), torch.nn.Parameter(torch.randn(7, generator=g))]
    expected = [p.detach().clone() for p in params]
    bufs: list[torch.Tensor | None] = [None, None]
    opt = bit_sgd(params)
    for step, lr in enumerate([0.0, 0.003, 0.003, 0.0003, 0.1]):
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=g)
            bufs[i] = p.grad.clone() if bufs[i] is None else bufs[i].mul(0.9).add(p.grad)
            expected[i] = expected[i].add(bufs[i], alpha=-lr)
        opt.param_groups[0]["lr"] = lr
        opt.step()
        opt.zero_grad()
        assert all(torch.equal(p, e) for p, e in zip(params, expected)), step
        assert all(torch.equal(opt.state[p]["momentum_buffer"], b) for p, b in zip(params, bufs)), step
        assert all(p.grad is None for p in params)
    assert {k: opt.defaults[k] for k in ("momentum", "dampening", "weight_decay", "nesterov")} == {
        "momentum": 0.9, "dampening": 0, "weight_decay": 0, "nesterov": False}  # fmt: skip


def _steps(model: BitModel, opt: torch.optim.SGD, seeds: range) -> None:
    for seed in seeds:
        x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
        torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1])).backward()
        opt.param_groups[0]["lr"] = 0.01
        opt.step()
        opt.zero_grad()


def test_momentum_survives_the_state_file(tmp_path: Path) -> None:
    """Weights and every momentum buffer go through checkpoint.safetensors and back into a fresh optimizer's
    state: the next steps are bit-identical to those of the optimizer that never stopped."""
    torch.manual_seed(0)
    model = BitModel(random_init_config("tiny", 2)).train()
    with torch.no_grad():
        model.head.weight.normal_()  # a non-zero head, so that every backbone parameter gets a gradient
    opt = bit_sgd(model.parameters())
    _steps(model, opt, range(3))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    save_state(tmp_path / "state.safetensors", model, opt, 3, plan=PLAN, scaler=scaler)

    resumed = BitModel(random_init_config("tiny", 2)).train()  # other weights, no momentum yet
    resumed_opt = bit_sgd(resumed.parameters())
    assert load_state(tmp_path / "state.safetensors", resumed, resumed_opt, PLAN, scaler=scaler) == 3
    named = dict(resumed.named_parameters())
    assert {n for n, p in model.named_parameters()} == set(named)
    for name, p in model.named_parameters():
        assert torch.equal(resumed_opt.state[named[name]]["momentum_buffer"], opt.state[p]["momentum_buffer"]), name
    _steps(model, opt, range(3, 5))
    _steps(resumed, resumed_opt, range(3, 5))
    assert all(torch.equal(p, named[n]) for n, p in model.named_parameters())

    from bitcli.formats import read_safetensors

    refs, meta = read_safetensors(tmp_path / "state.safetensors")
    assert json.loads(meta["state"])["scaler"] is None  # fp32 and bf16 keep no loss scale
    assert sum(k.startswith("momentum.") for k in refs) == len(named)


def test_grad_scaler_drives_sgd() -> None:
    """The fp16 path (GPU only in the CLI) steps SGD through a GradScaler: the same update as without it, and
    a step with an infinite gradient is skipped. Disabled (every other precision) it changes nothing."""
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    q = torch.nn.Parameter(p.detach().clone())
    plain, scaled = bit_sgd([p]), bit_sgd([q])
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for opt in (plain, scaled):
        opt.param_groups[0]["lr"] = 0.1
    (p * torch.tensor([3.0, 0.5])).sum().backward()
    plain.step()
    scaler.scale((q * torch.tensor([3.0, 0.5])).sum()).backward()
    scaler.step(scaled)
    scaler.update()
    assert torch.equal(p, q)
    scaled.zero_grad()
    scaler.scale((q * torch.tensor([float("inf"), 0.5])).sum()).backward()
    before = q.detach().clone()
    scaler.step(scaled)
    scaler.update()
    assert torch.equal(q, before) and scaler.get_scale() < 1024.0

    off = torch.amp.GradScaler("cpu", enabled=False)
    r = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = bit_sgd([r])
    opt.param_groups[0]["lr"] = 0.1
    loss = (r * torch.tensor([3.0, 0.5])).sum()
    assert off.scale(loss) is loss
    loss.backward()
    off.step(opt)
    off.update()
    assert torch.equal(r.detach(), torch.tensor([1.0 - 0.1 * 3.0, -2.0 - 0.1 * 0.5]))


KILL_ARGS = ["--steps", "30", "--batch-size", "16", "--batch-split", "2", "--mixup", "0.2", "--seed", "3",
             "--eval-every", "0", "--save-every", "1", *FAST]  # fmt: skip


def _checkpoint_is_whole(run: Path) -> int:
    """Every file the run has in place parses completely; returns the checkpoint's next step (0 if none)."""
    from bitcli.formats import read_safetensors

    if (run / "finetune_config.json").exists():
        json.loads((run / "finetune_config.json").read_text())
    state = run / "checkpoint.safetensors"
    if not state.exists():
        return 0
    refs, meta = read_safetensors(state)
    for ref in refs.values():
        ref.load()
    return json.loads(meta["state"])["next_step"]


def test_sigkill_and_resume_is_bit_identical(dataset: Path, tmp_path: Path) -> None:
    """Two SIGKILLs (real processes: a kill is what is tested), then a resume in this process: the weights and
    the metrics equal those of an uninterrupted run."""
    straight = tmp_path / "straight"
    code, _, err = run_main("finetune", dataset, "--output", straight, *KILL_ARGS)
    assert code == 0, err

    killed = tmp_path / "killed"
    resumed_from = []
    for kill_after in (10, 20):  # two kills, each once the run has logged that many steps
        args = ["finetune", dataset, "--output", killed, *KILL_ARGS] + (["--resume"] if resumed_from else [])
        proc = subprocess.Popen(bit_process(*args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=PROCESS_ENV)
        metrics = killed / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.exists() and metrics.read_bytes().count(b"\n") >= kill_after:
                break
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL, proc.stderr.read().decode()
        proc.stderr.close()
        assert not (killed / "summary.json").exists()
        next_step = _checkpoint_is_whole(killed)
        assert 0 < next_step < 30
        resumed_from.append(next_step)

    code, _, err = run_main("finetune", dataset, "--output", killed, *KILL_ARGS, "--resume")
    assert code == 0, err
    assert f"resuming at step {resumed_from[-1] + 1} of 30" in err
    assert [
        p.name for p in killed.iterdir() if p.name.startswith(".")
    ] == []  # interrupted writes cleaned up, lock gone

    a, b = read_weights(straight / "model.safetensors"), read_weights(killed / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    ma, mb = read_metrics(straight), read_metrics(killed)
    assert [m["step"] for m in mb] == list(range(30))  # lines after the checkpoint were dropped on resume
    assert [(m["lr"], m["loss"]) for m in ma] == [(m["lr"], m["loss"]) for m in mb]
    assert json.loads((killed / "summary.json").read_text())["resumed_from_step"] == resumed_from[-1]
