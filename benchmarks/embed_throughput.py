"""`bit embed` against transformers' BitModel on R50x1 at 448 px, in one run: model-only images/s on the same
uint8 batch (contenders in their own processes, taking turns), how far apart their vectors are, and end to
end over the same folder of JPEGs (`bit embed` as a process; transformers' PIL processor and BitModel in a loop).

    .venv/bin/python benchmarks/embed_throughput.py                       # batch 16, 5 rounds, 64 JPEGs
    .venv/bin/python benchmarks/embed_throughput.py --repeats 3 --e2e-images 32
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    ROOT,
    Contender,
    jpeg_folders,
    load,
    machine,
    median,
    r50_checkpoint,
    realistic_images,
    serve,
    uint8_batch,
)
from rss import run_measured

ROLES = {
    "bit": "bitcli TorchEngine.features, fp32: exactly what `bit embed` runs",
    "transformers": "transformers BitModel pooler_output, eager, channels-first",
}


def build(role: str, a: dict):
    """The contender's forward: uint8 [B, H, W, 3] -> float32 vectors [B, 2048]."""
    import torch

    if role == "bit":
        from bitcli.engine import load_engine
        from bitcli.hub import load_checkpoint

        engine = load_engine(load_checkpoint(a["hf"]), torch.device("cpu"), torch.float32, need_head=False)
        return engine.features
    import transformers

    model = transformers.BitModel.from_pretrained(a["hf"]).eval()

    def forward(b: np.ndarray):  # the pixels its processor gives for this checkpoint (mean = std = 0.5)
        with torch.inference_mode():
            return model(
                pixel_values=(torch.from_numpy(b).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
            ).pooler_output.flatten(1)

    return forward


def contender(role: str, a: dict) -> None:
    batch = np.load(a["batch"])
    forward = build(role, a)
    forward(batch)  # warm-up

    def handle(request: dict) -> dict:
        if request["cmd"] == "time":
            t0 = time.perf_counter()
            vectors = forward(batch)
            return {"seconds": time.perf_counter() - t0, "vectors": vectors.tolist()}
        if request["cmd"] == "e2e":  # transformers' own pipeline over the JPEG folder: decode, process, embed
            return {"seconds": transformers_folder(a["hf"], Path(request["folder"]), a["batch_size"])}
        raise ValueError(request)

    serve(handle)


def transformers_folder(hf: str, folder: Path, batch_size: int) -> float:
    """Seconds for transformers to embed every JPEG of `folder` (PIL decode, BitImageProcessorPil, BitModel)."""
    import torch
    import transformers
    from PIL import Image

    model = transformers.BitModel.from_pretrained(hf).eval()
    processor = transformers.BitImageProcessorPil.from_pretrained(hf)
    paths = sorted(folder.iterdir())
    t0 = time.perf_counter()
    for k in range(0, len(paths), batch_size):
        pixels = processor([Image.open(p) for p in paths[k : k + batch_size]], return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            model(pixel_values=pixels).pooler_output.flatten(1)
    return time.perf_counter() - t0


def model_only(a: dict, repeats: int) -> dict:
    script = Path(__file__).resolve()
    procs = [Contender(script, role, a) for role in ROLES]
    times: dict[str, list[float]] = {r: [] for r in ROLES}
    worst = 0.0
    try:
        for rep in range(repeats):
            order = procs[rep % 2 :] + procs[: rep % 2]
            replies = {p.role: p.ask({"cmd": "time"}) for p in order}
            for role, reply in replies.items():
                times[role].append(reply["seconds"])
            got, ref = np.array(replies["bit"]["vectors"]), np.array(replies["transformers"]["vectors"])
            worst = max(worst, float((np.linalg.norm(got - ref, axis=1) / np.linalg.norm(ref, axis=1)).max()))
            print(f"  round {rep + 1}/{repeats}  load {load():.2f}  " + "  ".join(
                f"{r} {a['batch_size'] / t[-1]:.3f}" for r, t in times.items()), flush=True)  # fmt: skip
        e2e = {}
        if a.get("folder"):
            e2e = procs[1].ask({"cmd": "e2e", "folder": a["folder"]})
    finally:
        rss = {p.role: p.close()["peak_rss_mib"] for p in procs}
    return {
        "images_per_s": {r: a["batch_size"] / median(t) for r, t in times.items()},
        "seconds": times,
        "peak_rss_mib": rss,
        "max_relative_l2": worst,
        "transformers_folder_seconds": e2e.get("seconds"),
    }


def bit_embed_folder(hf: Path, folder: Path, first: Path, batch_size: int, workdir: Path) -> dict:
    """`bit embed` over the folder, and over its first batch (`first`): the difference is the steady rate
    (start-up and model load cancel)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = workdir / "embeddings.safetensors"

    def timed(images: Path) -> tuple[float, float]:
        cmd = [sys.executable, "-m", "bitcli", "embed", str(images), "--model", str(hf), "--device", "cpu",
               "-b", str(batch_size), "-o", str(out)]  # fmt: skip
        code, seconds, peak, err = run_measured(cmd, env=env, cwd=ROOT)
        if code != 0:
            raise RuntimeError(f"bit embed failed with exit {code}: {err}")
        return seconds, peak

    n = len(list(folder.iterdir()))
    t_full, rss = timed(folder)
    t_first, _ = timed(first)
    return {"images_per_s": (n - batch_size) / (t_full - t_first), "peak_rss_mib": rss, "images": n}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=16, help="`bit embed`'s default")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--e2e-images", type=int, default=64, help="0 skips the end-to-end runs")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/bitcli-bench"))
    p.add_argument("--serve", help=argparse.SUPPRESS)
    p.add_argument("--serve-args", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        contender(args.serve, json.loads(args.serve_args))
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    info = machine()
    print(json.dumps(info), flush=True)
    load_before = load()
    hf = r50_checkpoint(args.workdir)
    from bitcli.hub import load_checkpoint

    batch_path = args.workdir / f"batch{args.batch_size}.npy"
    np.save(batch_path, uint8_batch(realistic_images(args.batch_size), load_checkpoint(str(hf)).preprocess))
    folder, first = jpeg_folders(args.workdir, args.e2e_images, args.batch_size) if args.e2e_images else (None, None)
    a = {
        "hf": str(hf),
        "batch": str(batch_path),
        "batch_size": args.batch_size,
        "folder": str(folder) if folder else None,
    }
    print(f"model only: R50x1 448 px, batch {args.batch_size}, {args.repeats} rounds; images/s per round", flush=True)
    r = model_only(a, args.repeats)
    rates = r["images_per_s"]
    print(f"\nmodel only, images/s: bit {rates['bit']:.3f}, transformers {rates['transformers']:.3f} "
          f"({rates['bit'] / rates['transformers']:.2f}x); vectors apart by at most {r['max_relative_l2']:.1e} (relative L2); "
          f"peak RSS MiB {r['peak_rss_mib']}")  # fmt: skip
    if folder is not None:
        e2e = bit_embed_folder(hf, folder, first, args.batch_size, args.workdir)
        peer = args.e2e_images / r["transformers_folder_seconds"]
        print(f"end to end over {args.e2e_images} JPEGs, images/s: bit embed {e2e['images_per_s']:.3f} "
              f"(peak RSS {e2e['peak_rss_mib']:.0f} MiB), transformers PIL processor + BitModel {peer:.3f} "
              f"({e2e['images_per_s'] / peer:.2f}x)")  # fmt: skip
    print(f"load {load_before:.2f} -> {load():.2f}")


if __name__ == "__main__":
    main()
