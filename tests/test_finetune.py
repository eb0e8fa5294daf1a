"""`bit finetune` end to end: outputs, HyperRule lr per step, output-folder rules, micro-batching, exact
resume after SIGKILL, torchrun (gloo) against one process, divergence, and accuracy on a real data set."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_main, write_folder
from PIL import Image

from bitcli import hyperrule
from bitcli.config import BitConfig
from bitcli.errors import BitError
from bitcli.finetune import random_init_config

REPO = Path(__file__).resolve().parents[1]
TINY = '{"depths": [1, 1], "hidden_sizes": [32, 64], "embedding_size": 16, "num_groups": 8}'
FAST = ["--random-init", "--model", TINY, "--resolution", "16", "--workers", "2"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_folder(root / "train", {"red": 12, "green": 12, "blue": 12})
    write_folder(root / "val", {"red": 4, "green": 4, "blue": 4}, seed=1)
    return root


@pytest.fixture(autouse=True)
def one_thread():
    """In-process runs use one intra-op thread: tiny models gain nothing from more, and on a shared 2-core
    machine two spinning OpenMP threads can be several times slower. (Subprocess runs keep torch's default.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cli():
    """Run the real `bit` entry point in this process: (exit code, stdout, stderr)."""
    return run_main


def bit_subprocess(*args: object) -> list[str]:
    return [sys.executable, "-m", "bitcli", *map(str, args)]


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


# ----------------------------------------------------------------------------------------------------------


def test_finetune_end_to_end(dataset: Path, tmp_path: Path, cli) -> None:
    out = tmp_path / "run"
    code, stdout, err = cli("finetune", dataset, "--output", out, "--steps", "8", "--batch-size", "8",
                            "--eval-every", "4", "--save-every", "3", *FAST)  # fmt: skip
    assert code == 0, err
    assert stdout == ""  # stdout is for data; the plan and progress go to stderr
    for word in ("train       36 images", "validation  12 images", "resize 20x20, random crop 16", "8 steps",
                 "mixup       off", "batch       8 = 1 process(es) x", "SGD momentum 0.9"):  # fmt: skip
        assert word in err, word
    assert {p.name for p in out.iterdir()} == {
        "config.json", "model.safetensors", "preprocessor_config.json", "metrics.jsonl", "summary.json",
        "finetune_config.json", "checkpoint.safetensors",
    }  # fmt: skip (no .lock: it goes when the run ends)

    plan = json.loads((out / "finetune_config.json").read_text())
    assert plan["classes"] == ["blue", "green", "red"]
    assert (plan["steps"], plan["boundaries"], plan["resize"], plan["crop"]) == (8, [2, 3, 5, 6, 8], 20, 16)
    assert plan["mixup"] is None and plan["batch_split"] >= 1 and plan["train_examples"] == 36
    assert set(plan["why"]) == {"resolution", "steps", "mixup", "batch_split"}  # every choice says where it came from
    assert (plan["eval_every"], plan["save_every"], plan["world_size"]) == (4, 3, 1)

    metrics = read_metrics(out)
    sched = hyperrule.Schedule(tuple(plan["boundaries"]))
    assert [m["step"] for m in metrics] == list(range(8))
    assert [m["lr"] for m in metrics] == [hyperrule.learning_rate(s, sched) for s in range(8)]
    assert all(np.isfinite(m["loss"]) for m in metrics)
    assert [m["step"] for m in metrics if "val_top1" in m] == [3, 7]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["val_top1"] == metrics[-1]["val_top1"] and summary["val_top5"] == 1.0
    assert summary["steps"] == 8 and summary["val_examples"] == 12 and set(summary["val_per_class"]) == {"blue", "green", "red"}

    # The model is a transformers folder: bitcli and transformers load it and agree on the logits.
    from transformers import BitForImageClassification

    from bitcli.hub import load_checkpoint

    ckpt = load_checkpoint(str(out))
    assert ckpt.labels == ["blue", "green", "red"] and ckpt.preprocess.crop == (16, 16)
    ours = ckpt.build_model()
    theirs = BitForImageClassification.from_pretrained(out).eval()
    assert theirs.config.id2label == {0: "blue", 1: "green", 2: "red"}
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ours(x), rtol=1e-5, atol=1e-6)
    assert not torch.equal(ours.head.weight, torch.zeros_like(ours.head.weight))  # the head was trained

    code, stdout, err = cli("predict", dataset / "val" / "red" / "000.png", "--model", out, "--format", "json")
    assert code == 0, err
    assert json.loads(stdout)[0]["predictions"][0]["label"] in {"blue", "green", "red"}


def test_finished_unfinished_and_foreign_output_folders(dataset: Path, tmp_path: Path, cli) -> None:
    out = tmp_path / "run"
    args = ["finetune", dataset, "--output", out, "--steps", "2", "--batch-size", "4", "--eval-every", "0", *FAST]
    assert cli(*args)[0] == 0
    code, _, err = cli(*args)
    assert code == 1 and "holds a finished run; pass --overwrite" in err
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    code, _, err = cli(*args, "--resume")
    assert code == 0 and "already finished (summary.json is there): nothing to resume" in err, err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing touched, no .lock left
    code, _, err = cli(*args, "--resume", "--overwrite")
    assert code == 2 and "pass only one" in err
    before = (out / "summary.json").stat().st_mtime_ns
    code, _, err = cli(*args, "--overwrite")
    assert code == 0, err
    assert (out / "summary.json").stat().st_mtime_ns != before

    (out / "summary.json").unlink()  # now it looks like a run that stopped before the end
    code, _, err = cli(*args)
    assert code == 1 and "unfinished run; pass --resume" in err

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    code, _, err = cli("finetune", dataset, "--output", foreign, "--steps", "2", "--overwrite", *FAST)
    assert code == 1 and "holds no bit finetune run" in err
    assert (foreign / "thesis.tex").read_text() == "precious"
    code, _, err = cli("finetune", dataset, "--output", tmp_path / "new", "--steps", "2", "--resume", *FAST)
    assert code == 1 and "holds no bit finetune run" in err


def test_resume_refuses_other_settings(dataset: Path, tmp_path: Path, cli) -> None:
    out = tmp_path / "run"
    args = ["finetune", dataset, "--output", out, "--batch-size", "4", "--eval-every", "0", *FAST]
    assert cli(*args, "--steps", "3")[0] == 0
    (out / "summary.json").unlink()
    code, _, err = cli(*args, "--steps", "5", "--resume")
    assert code == 1 and "started with other settings" in err and "steps 3 -> 5" in err


def test_flag_errors(dataset: Path, tmp_path: Path, cli) -> None:
    out = tmp_path / "run"
    cases = [
        (["--val", dataset / "val", "--val-split", "0.2"], 2, "pass only one"),
        (["--batch-size", "16", "--batch-split", "3"], 2, "--batch-split 3: must divide the 16 images"),
        (["--steps", "many"], 2, "--steps 'many': use auto or a whole number"),
        (["--resolution", "8:16"], 2, "RESIZE:CROP"),
        (["--shots", "13"], 1, "class 'blue' has only 12 training image(s)"),
    ]
    for flags, want_code, message in cases:
        code, _, err = cli("finetune", dataset, "--output", out, *FAST, *flags)
        assert (code, message in err) == (want_code, True), err
        assert err.startswith("Error: ") and len(err.strip().splitlines()) == 1
    code, _, err = cli("finetune", tmp_path / "missing", "--output", out, *FAST)
    assert code == 1 and "no such folder" in err
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (8, 8)).save(flat / "a.png")
    code, _, err = cli("finetune", flat, "--output", out, *FAST)
    assert code == 1 and "one sub-folder per class" in err and "train/cat/" in err  # the expected tree
    assert not out.exists()


def test_few_shot_run_uses_k_per_class(dataset: Path, tmp_path: Path, cli) -> None:
    out = tmp_path / "run"
    code, _, err = cli("finetune", dataset, "--output", out, "--shots", "2", "--seed", "5", "--steps", "1",
                       "--batch-size", "4", *FAST)  # fmt: skip
    assert code == 0, err
    plan = json.loads((out / "finetune_config.json").read_text())
    assert plan["train_examples"] == 6 and plan["shots"] == 2 and "(2 per class, seed 5)" in err


def test_val_split(dataset: Path, tmp_path: Path, cli) -> None:
    train_only = tmp_path / "only"
    write_folder(train_only, {"a": 10, "b": 10})
    out = tmp_path / "run"
    code, _, err = cli("finetune", train_only, "--output", out, "--val-split", "0.2", "--steps", "1", "--batch-size", "4", *FAST)
    assert code == 0, err
    plan = json.loads((out / "finetune_config.json").read_text())
    assert (plan["train_examples"], plan["val_examples"]) == (16, 4)
    assert json.loads((out / "summary.json").read_text())["val_examples"] == 4


def test_random_init_specs() -> None:
    assert random_init_config("tiny", 3) == BitConfig(depths=(1, 1), hidden_sizes=(32, 64), embedding_size=16, num_groups=8, num_classes=3)
    assert random_init_config("R50x1", 7) == BitConfig.resnet(50, 1, num_classes=7)
    assert random_init_config(TINY, 2).num_classes == 2
    for bad, message in [("R51x1", "use a preset"), ("{nope", "not valid JSON"), ('{"depth": [1]}', "unknown field")]:
        with pytest.raises(BitError, match=message):
            random_init_config(bad, 2)


def test_divergence_stops_without_writing_nan_weights(dataset: Path, tmp_path: Path, cli) -> None:
    out = tmp_path / "run"
    code, _, err = cli("finetune", dataset, "--output", out, "--steps", "30", "--batch-size", "8", "--lr", "1e30",
                       "--eval-every", "0", "--save-every", "1000", *FAST)  # fmt: skip
    assert code == 1, err
    assert "Error: loss became" in err and "diverged" in err
    assert not (out / "model.safetensors").exists() and not (out / "summary.json").exists()
    assert all(np.isfinite(m["loss"]) for m in read_metrics(out))


# ----------------------------------------------------------------------------------------------------------
# Equivalences: micro-batching, processes, interruption


def test_batch_split_gives_the_same_update(dataset: Path, tmp_path: Path, cli) -> None:
    """Gradient accumulation over 4 micro-batches == one full batch (MixUp on: partners cross micro-batches)."""
    runs = {}
    for split in ("1", "4"):
        out = tmp_path / f"split{split}"
        code, _, err = cli("finetune", dataset, "--output", out, "--steps", "4", "--batch-size", "16", "--batch-split",
                           split, "--mixup", "0.4", "--eval-every", "0", *FAST)  # fmt: skip
        assert code == 0, err
        assert f"1 process(es) x {split} micro-batch(es) of {16 // int(split)}" in err
        runs[split] = (read_weights(out / "model.safetensors"), read_metrics(out))
    (w1, m1), (w4, m4) = runs["1"], runs["4"]
    for key in w1:
        torch.testing.assert_close(w4[key], w1[key], rtol=1e-5, atol=1e-6)
    assert [m["lr"] for m in m1] == [m["lr"] for m in m4]
    assert np.allclose([m["loss"] for m in m1], [m["loss"] for m in m4], rtol=1e-5, atol=1e-6)
    assert not torch.equal(w1["classifier.1.weight"], torch.zeros_like(w1["classifier.1.weight"]))


KILL_ARGS = ["--steps", "30", "--batch-size", "16", "--batch-split", "2", "--mixup", "0.2", "--seed", "3",
             "--eval-every", "0", "--save-every", "1", *FAST]  # fmt: skip


def _checkpoint_is_whole(run: Path) -> int:
    """Every file the run has in place parses completely; returns the checkpoint's next step (0 if none)."""
    from bitcli.checkpoints import read_safetensors

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
    straight = tmp_path / "straight"
    done = subprocess.run(bit_subprocess("finetune", dataset, "--output", straight, *KILL_ARGS), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr

    killed = tmp_path / "killed"
    resumed_from = []
    for kill_after in (10, 20):  # two kills, each once the run has logged that many steps
        args = ["finetune", dataset, "--output", killed, *KILL_ARGS] + (["--resume"] if resumed_from else [])
        proc = subprocess.Popen(bit_subprocess(*args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
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

    done = subprocess.run(bit_subprocess("finetune", dataset, "--output", killed, *KILL_ARGS, "--resume"),
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"resuming at step {resumed_from[-1]} of 30" in done.stderr
    assert [p.name for p in killed.iterdir() if p.name.startswith(".")] == []  # interrupted writes cleaned up, lock gone

    a, b = read_weights(straight / "model.safetensors"), read_weights(killed / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    ma, mb = read_metrics(straight), read_metrics(killed)
    assert [m["step"] for m in mb] == list(range(30))  # lines after the checkpoint were dropped on resume
    assert [(m["lr"], m["loss"]) for m in ma] == [(m["lr"], m["loss"]) for m in mb]
    assert json.loads((killed / "summary.json").read_text())["resumed_from_step"] == resumed_from[-1]


def test_torchrun_two_processes_match_one(dataset: Path, tmp_path: Path) -> None:
    common = ["--steps", "4", "--batch-size", "16", "--mixup", "0.3", "--eval-every", "0", "--workers", "1", *FAST[:-2]]
    one = tmp_path / "one"
    done = subprocess.run(bit_subprocess("finetune", dataset, "--output", one, "--batch-split", "2", *common),
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "bitcli", "finetune", str(dataset), "--output", str(two), "--batch-split", "1", *common],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "16 = 2 process(es) x 1 micro-batch(es) of 8" in done.stderr
    assert done.stderr.count("bit finetune:") == 1  # only rank 0 talks ...
    assert len(read_metrics(two)) == 4  # ... and writes
    plan = json.loads((two / "finetune_config.json").read_text())
    assert plan["world_size"] == 2
    a, b = read_weights(one / "model.safetensors"), read_weights(two / "model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    assert np.allclose([m["loss"] for m in read_metrics(one)], [m["loss"] for m in read_metrics(two)], rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# A real data set


DIGITS_MIN_TOP1 = 0.85  # measured 0.894 (tiny BiT from random weights, 200 steps, 16 px); see examples/README.md


def test_digits_from_random_init_reaches_documented_accuracy(tmp_path: Path, cli) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("export_digits", REPO / "examples" / "export_digits.py")
    export_digits = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(export_digits)
    export_digits.export(tmp_path / "digits", size=16)
    out = tmp_path / "run"
    started = time.monotonic()
    code, _, err = cli("finetune", tmp_path / "digits", "--output", out, "--random-init", "--model", "tiny",
                       "--val", tmp_path / "digits" / "test", "--steps", "200", "--batch-size", "64",
                       "--resolution", "18:16", "--lr", "0.1", "--eval-every", "0")  # fmt: skip
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    print(f"digits: held-out top-1 {summary['val_top1']:.4f} in {time.monotonic() - started:.1f} s")
    assert summary["val_examples"] == 360
    assert summary["val_top1"] >= DIGITS_MIN_TOP1


def test_momentum_sgd_matches_torch_bit_for_bit() -> None:
    from bitcli.finetune import MomentumSGD

    g = torch.Generator().manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(5, 3, generator=g)), torch.nn.Parameter(torch.randn(7, generator=g))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    mine, reference = MomentumSGD(ours, 0.9), torch.optim.SGD(theirs, lr=0.0, momentum=0.9)
    for step, lr in enumerate([0.0, 0.003, 0.003, 0.0003, 0.1]):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        mine.param_groups[0]["lr"] = reference.param_groups[0]["lr"] = lr
        mine.step()
        reference.step()
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs)), step
        assert all(torch.equal(mine.state[a]["momentum_buffer"], reference.state[b]["momentum_buffer"]) for a, b in zip(ours, theirs))


def test_grad_scaler_drives_momentum_sgd() -> None:
    """The fp16 path (GPU only in the CLI) steps MomentumSGD through a GradScaler: same update, and a step
    with an infinite gradient is skipped."""
    from bitcli.finetune import MomentumSGD

    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    q = torch.nn.Parameter(p.detach().clone())
    plain, scaled = MomentumSGD([p], 0.9), MomentumSGD([q], 0.9)
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


def test_bf16_autocast_run_on_cpu(dataset: Path, tmp_path: Path, cli) -> None:
    out = tmp_path / "run"
    code, _, err = cli("finetune", dataset, "--output", out, "--steps", "3", "--batch-size", "8", "--precision", "bf16",
                       "--eval-every", "0", *FAST)  # fmt: skip
    assert code == 0, err
    assert "cpu, bfloat16" in err
    weights = read_weights(out / "model.safetensors")
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in weights.values())  # fp32 master weights




def test_full_disk_is_a_user_error_and_leaves_nothing_half_written(dataset: Path, tmp_path: Path) -> None:
    """A file-size limit makes writes fail as a full disk does: exit 1 with a one-line reason (not an internal
    error), no temporary file left behind, and the run resumes once there is room."""
    import resource

    out = tmp_path / "run"
    args = ["finetune", dataset, "--output", out, "--steps", "4", "--batch-size", "4", "--eval-every", "0",
            "--random-init", "--model", "small", "--resolution", "32", "--workers", "0"]  # fmt: skip
    # `small` has 0.13 M float32 weights (0.5 MB): the checkpoint (weights + momentum) cannot be written.
    limit = 800_000

    def small_files_only() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    done = subprocess.run(bit_subprocess(*args), capture_output=True, text=True, preexec_fn=small_files_only, timeout=300)
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: ") and "cannot write" in last and "File too large" in last
    assert "internal error" not in done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["finetune_config.json", "metrics.jsonl"]
    done = subprocess.run(bit_subprocess(*args, "--resume"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "no checkpoint in" in done.stderr and (out / "summary.json").is_file()


def test_hostile_class_names_stay_labels_and_never_name_files(tmp_path: Path, cli) -> None:
    """Folder names from a data set become label strings only: every file the run writes has a fixed name
    inside --output, whatever the class folders are called."""
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    names = ["x..y", "-rf", "a\nb", "café ☕", "$(touch pwned)"]  # (hidden ".name" folders are skipped by design)
    for name in names:
        folder = data / name
        folder.mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    out = tmp_path / "run"
    code, _, err = cli("finetune", data, "--output", out, "--steps", "2", "--batch-size", "4", *FAST)
    assert code == 0, err
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert [p for p in after if p not in before and p.parts[0] != "run"] == []  # nothing outside --output
    assert {p.name for p in out.iterdir()} == {
        "config.json", "model.safetensors", "preprocessor_config.json", "metrics.jsonl", "summary.json",
        "finetune_config.json", "checkpoint.safetensors",
    }  # fmt: skip (no .lock: it goes when the run ends)
    labels = json.loads((out / "config.json").read_text())["id2label"]
    assert sorted(labels.values()) == sorted(names)
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()
