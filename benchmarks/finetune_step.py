"""One fine-tuning step (R50x1, 128 px, batch 64, SGD momentum 0.9, cross-entropy): bitcli's model trained the
way `bit finetune` trains it, against a plain timm + torch SGD loop. Same weights, same images, same labels;
contenders take turns in their own processes. Reports steps/s, the ratio, peak memory and a loss check.
With --head-only: bitcli's full step against its `bit finetune --head-only` step (the backbone frozen).

    .venv/bin/python benchmarks/finetune_step.py
    .venv/bin/python benchmarks/finetune_step.py --head-only --resolution 64
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    Contender,
    flops,
    load,
    machine,
    matmul_peaks,
    matmul_server,
    median,
    r50_checkpoint,
    realistic_images,
    serve,
    timm_copy,
)

ROLES = {
    "bit": "BitModel trained as bitcli/finetune/ does on a CPU (its setup, optimizer and NCHW input)",
    "timm": "timm resnetv2_50x1_bit + torch.optim.SGD, the plain loop",
    "bit-cl": "ablation: as bit, with the model and batches channels_last",
    "bit-default-alloc": "ablation: as bit, without reuse_freed_memory (glibc's default allocator settings)",
    "timm-tuned": "ablation: the timm loop with bitcli's reuse_freed_memory",
    "bit-head-only": "as bit, with --head-only: the backbone frozen, SGD over the head (finetune/start.py)",
}
TARGET = 1.5
LR, MOMENTUM = 0.003, 0.9


def contender(role: str, a: dict) -> None:
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.load(a["batch"])).permute(0, 3, 1, 2).float().div(255).sub(0.5).div(0.5)
    y = torch.from_numpy(np.load(a["labels"]))
    if role.startswith("bit"):
        from bitcli.finetune.loop import bit_sgd
        from bitcli.finetune.prepare import use_deterministic_algorithms
        from bitcli.finetune.start import freeze_backbone, trainable_parameters
        from bitcli.hub import load_checkpoint
        from bitcli.runtime import reuse_freed_memory

        use_deterministic_algorithms()  # what finetune sets up on a CPU, in its words
        if role != "bit-default-alloc":
            reuse_freed_memory()
        model = load_checkpoint(a["hf"]).build_model().train()
        if role == "bit-cl":
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        else:
            x = x.contiguous()  # what Engine.to_input gives fine-tuning on a CPU
        if role == "bit-head-only":
            freeze_backbone(model)
        optimizer = bit_sgd(trainable_parameters(model))  # torch.optim.SGD, momentum 0.9
        optimizer.param_groups[0]["lr"] = LR
    else:
        import timm

        if role == "timm-tuned":
            from bitcli.runtime import reuse_freed_memory

            reuse_freed_memory()

        model = timm.create_model(
            "resnetv2_50x1_bit", pretrained=True, num_classes=1000,
            pretrained_cfg_overlay={"file": str(Path(a["timm"]) / "model.safetensors")},
        ).train()  # fmt: skip
        optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)

    with torch.no_grad():  # BiT fine-tuning starts from a zero head
        head = model.head if role.startswith("bit") else model.head.fc
        head.weight.zero_()
        head.bias.zero_()

    def step() -> float:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        optimizer.step()
        return loss.item()

    losses = [step()]  # warm-up, and the first loss for the cross-check

    def handle(request: dict) -> dict:
        t0 = time.perf_counter()
        losses.append(step())
        return {"seconds": time.perf_counter() - t0, "losses": losses}

    serve(handle)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-ablations", action="store_true", help="only bit and timm")
    p.add_argument("--head-only", action="store_true", help="only bit and bit-head-only (bit finetune --head-only)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/bitcli-bench"))
    p.add_argument("--json", type=Path)
    p.add_argument("--serve", help=argparse.SUPPRESS)
    p.add_argument("--serve-args", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        matmul_server() if args.serve == "matmul" else contender(args.serve, json.loads(args.serve_args))
        return

    args.workdir.mkdir(parents=True, exist_ok=True)
    info = machine()
    print(json.dumps(info), flush=True)
    load_before = load()
    hf = r50_checkpoint(args.workdir)
    from bitcli.preprocess import Preprocess

    crop = Preprocess.square(args.resolution, args.resolution)  # what finetune's pipeline hands the model
    batch = np.stack([crop.to_uint8(im) for im in realistic_images(args.batch_size, seed=3)])
    a = {"hf": str(hf), "timm": str(timm_copy(hf, args.workdir)),
         "batch": str(args.workdir / "train_batch.npy"), "labels": str(args.workdir / "train_labels.npy")}  # fmt: skip
    np.save(a["batch"], batch)
    np.save(a["labels"], np.random.default_rng(0).integers(0, 1000, args.batch_size))

    if args.head_only:
        roles = ["bit", "bit-head-only"]
    else:
        roles = ["bit", "timm"] + ([] if args.no_ablations else ["bit-cl", "bit-default-alloc", "timm-tuned"])
    print(
        f"train step: R50x1 {args.resolution} px, batch {args.batch_size}, {args.repeats} rounds; steps/s per round",
        flush=True,
    )
    procs = [Contender(Path(__file__).resolve(), role, a) for role in roles]
    times: dict[str, list[float]] = {r: [] for r in roles}
    try:
        for rep in range(args.repeats):
            order = procs[rep % len(procs) :] + procs[: rep % len(procs)]
            replies = {c.role: c.ask({"cmd": "step"}) for c in order}
            for role, reply in replies.items():
                times[role].append(reply["seconds"])
            print(f"  round {rep + 1}/{args.repeats}  load {load():.2f}  "
                  + "  ".join(f"{r} {1 / t[-1]:.4f}" for r, t in times.items()), flush=True)  # fmt: skip
        losses = {r: replies[r]["losses"] for r in roles}
    finally:
        rss = {c.role: c.close()["peak_rss_mib"] for c in procs}

    gflop_per_step = flops(hf, args.resolution, train=True) * args.batch_size / 1e9
    # --head-only: the backbone's forward (the head's backward is a [batch, 2048] x [2048, 1000] product or two)
    gflop = {
        r: flops(hf, args.resolution) * args.batch_size / 1e9 if r == "bit-head-only" else gflop_per_step for r in roles
    }
    peak = matmul_peaks(Path(__file__))["float32"]
    results = {
        "machine": info, "batch_size": args.batch_size, "resolution": args.resolution,
        "gflop_per_step": gflop_per_step, "matmul_gflops": {"float32": peak},
        "steps": {r: {"steps_per_s": 1 / median(t), "seconds": t, "peak_rss_mib": rss[r]} for r, t in times.items()},
        "losses": losses, "load": [load_before, load()],
    }  # fmt: skip
    print(f"\nmachine: {info['cpu']}, {info['cores']} cores; load {results['load'][0]:.2f} -> {results['load'][1]:.2f}")
    print(f"forward + backward: {gflop_per_step:.0f} GFLOP per step; matmul peak (torch.mm 4096^2) {peak:.1f} GFLOP/s")
    print(f"{'contender':18s} {'steps/s':>8s} {'img/s':>7s} {'GFLOP/s':>8s} {'% peak':>7s} {'peak RSS MiB':>13s}  what")
    for role, st in results["steps"].items():
        rate = st["steps_per_s"] * gflop[role]
        print(f"{role:18s} {st['steps_per_s']:8.4f} {st['steps_per_s'] * args.batch_size:7.2f} {rate:8.1f} {100 * rate / peak:6.1f}% "
              f"{st['peak_rss_mib']:13.0f}  {ROLES[role]}")  # fmt: skip
    (compare_head_only if args.head_only else compare_with_timm)(results, losses)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def compare_with_timm(results: dict, losses: dict[str, list[float]]) -> None:
    for role in losses:
        if role.startswith("bit"):
            ratio = results["steps"][role]["steps_per_s"] / results["steps"]["timm"]["steps_per_s"]
            print(f"{role} / timm: {ratio:.2f}x (target >= {TARGET}x: {'met' if ratio >= TARGET else 'NOT met'})")
    # The same weights, data and optimizer must give the same losses, step after step.
    ref = np.array(losses["timm"])
    drift = {r: float(np.abs(np.array(v) - ref).max()) for r, v in losses.items() if r != "timm"}
    print(
        f"losses (timm): {np.round(ref, 4).tolist()}; max |loss - timm's|: "
        + ", ".join(f"{r} {d:.1e}" for r, d in drift.items())
    )
    results["loss_drift"] = drift


def compare_head_only(results: dict, losses: dict[str, list[float]]) -> None:
    """Speed-up of the head-only step, and a check that it trains the same head: both start from the same model
    with a zero head, which passes no gradient to the backbone, so the first update moves only the head in
    both and the first two losses must agree; from the second update on, only the full step moves the backbone."""
    ratio = results["steps"]["bit-head-only"]["steps_per_s"] / results["steps"]["bit"]["steps_per_s"]
    print(f"bit-head-only / bit: {ratio:.2f}x the steps/s of a full fine-tuning step")
    first = float(np.abs(np.array(losses["bit-head-only"][:2]) - np.array(losses["bit"][:2])).max())
    print(f"losses: bit {np.round(losses['bit'], 4).tolist()}, bit-head-only {np.round(losses['bit-head-only'], 4).tolist()}; "
          f"max |difference| over the first two {first:.1e}")  # fmt: skip
    results["head_only_speedup"], results["first_losses_difference"] = ratio, first


if __name__ == "__main__":
    main()
