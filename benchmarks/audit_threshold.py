"""Issue 23: precision and recall of bit audit's near-duplicate threshold on a generated set, with a model
fine-tuned here (not random weights): a tiny BiT (bitcli's `tiny` preset) trained by `bit finetune
--random-init` to tell 15 photos apart from random crops of them (scikit-image's other photos), then used on
9 *other* photos (astronaut, cat, coffee, rocket, china, flower, motorcycle, retina, Hubble field), each cut into
3 x 3 tiles: 81 distinct images. Each tile gets four copies: a JPEG re-encode (quality 60-90), a resize
(0.5-2x), a 10% crop and a brightness shift (+-10-25%). Ground truth: images of one tile's group are duplicates
of each other (10 pairs a group), every other pair is not. Reported: precision and recall over all pairs at
each threshold, and at the default.

    .venv/bin/python benchmarks/audit_threshold.py [--steps 600]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, load, machine

TRAIN_PHOTOS = ["brick", "grass", "gravel", "ihc", "cell", "color", "camera", "page", "moon", "coins", "text",
                "horse", "clock_motion", "microaneurysms", "phantom"]  # fmt: skip
EVAL_PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "china", "flower", "motorcycle_left", "retina",
               "hubble_deep_field"]  # fmt: skip


def photo(name: str) -> Image.Image:
    import skimage.data
    import sklearn.datasets

    if name in ("china", "flower"):
        return Image.open(Path(sklearn.datasets.__file__).parent / "images" / f"{name}.jpg").convert("RGB")
    folder = Path(skimage.data.__file__).parent
    path = next(p for p in folder.iterdir() if p.stem == name)
    return Image.open(path).convert("RGB")


def training_set(root: Path, per_photo: int, rng: np.random.Generator) -> None:
    for name in TRAIN_PHOTOS:
        im = photo(name)
        (root / name).mkdir(parents=True)
        for i in range(per_photo):
            side = int(min(im.size) * rng.uniform(0.3, 0.8))
            x, y = rng.integers(0, im.width - side + 1), rng.integers(0, im.height - side + 1)
            im.crop((x, y, x + side, y + side)).resize((96, 96), Image.Resampling.BILINEAR).save(
                root / name / f"{i:03d}.png"
            )


def copies(tile: Image.Image, rng: np.random.Generator) -> list[Image.Image]:
    buf = io.BytesIO()
    tile.save(buf, "JPEG", quality=int(rng.integers(60, 91)))
    jpeg = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    scale = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
    resized = tile.resize(
        (max(8, round(tile.width * scale)), max(8, round(tile.height * scale))), Image.Resampling.BICUBIC
    )
    dx, dy = round(tile.width * 0.1), round(tile.height * 0.1)
    ox, oy = int(rng.integers(0, dx + 1)), int(rng.integers(0, dy + 1))
    cropped = tile.crop((ox, oy, ox + tile.width - dx, oy + tile.height - dy))
    factor = 1 + rng.choice([-1, 1]) * rng.uniform(0.10, 0.25)
    brighter = ImageEnhance.Brightness(tile).enhance(factor)
    return [jpeg, resized, cropped, brighter]


def evaluation_set(rng: np.random.Generator) -> tuple[list[Image.Image], np.ndarray]:
    images, groups = [], []
    for name in EVAL_PHOTOS:
        im = photo(name)
        w, h = im.width // 3, im.height // 3
        for r in range(3):
            for c in range(3):
                tile = im.crop((c * w, r * h, (c + 1) * w, (r + 1) * h))
                group = len(set(groups))
                for image in [tile, *copies(tile, rng)]:
                    images.append(image)
                    groups.append(group)
    return images, np.asarray(groups)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--per-photo", type=int, default=40)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--resolution", type=int, default=32)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    work = Path(tempfile.mkdtemp(prefix="audit-threshold-"))
    training_set(work / "train", args.per_photo, rng)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    started = time.monotonic()
    cmd = [sys.executable, "-m", "bitcli", "finetune", str(work / "train"), "--random-init", "--model", "tiny",
           "--output", str(work / "run"), "--steps", str(args.steps), "--batch-size", "32", "--resolution", str(args.resolution), "--lr", str(args.lr),
           "--val-split", "0.1", "--seed", "0"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(proc.stderr)
    trained_s = time.monotonic() - started
    summary = json.loads((work / "run/summary.json").read_text())

    import torch

    from bitcli.audit.duplicates import unit_rows
    from bitcli.engine import load_engine
    from bitcli.hub import load_checkpoint

    ckpt = load_checkpoint(str(work / "run"))
    engine = load_engine(ckpt, torch.device("cpu"), torch.float32, need_head=False)
    images, groups = evaluation_set(rng)
    vectors = np.concatenate([
        engine.features(np.stack([ckpt.preprocess.to_uint8(im) for im in images[i : i + 64]])).numpy()
        for i in range(0, len(images), 64)
    ])  # fmt: skip
    unit = unit_rows(vectors)
    sims = (unit @ unit.T).numpy()
    upper = np.triu_indices(len(images), k=1)
    scores, same = sims[upper], (groups[:, None] == groups[None, :])[upper]
    rows = []
    for t in [0.8, 0.85, 0.9, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99]:
        flagged = scores >= t
        tp = int((flagged & same).sum())
        rows.append({"threshold": t, "precision": round(tp / max(int(flagged.sum()), 1), 4),
                     "recall": round(tp / int(same.sum()), 4), "flagged_pairs": int(flagged.sum())})  # fmt: skip
    kinds = {}
    for k, kind in enumerate(["jpeg", "resize", "crop10", "brightness"]):
        originals = np.flatnonzero(np.arange(len(images)) % 5 == 0)
        kinds[kind] = {"min": round(float(sims[originals, originals + k + 1].min()), 4),
                       "median": round(float(np.median(sims[originals, originals + k + 1])), 4)}  # fmt: skip
    print(json.dumps({
        "model": f"bitcli tiny preset, random init, trained {args.steps} steps (batch 32, lr {args.lr}, "
        f"{args.resolution} px) to tell {len(TRAIN_PHOTOS)} other photos apart",
        "model_val_top1": summary["val_top1"], "train_s": round(trained_s, 1), "images": len(images),
        "positive_pairs": int(same.sum()), "negative_pairs": int((~same).sum()),
        "negative_similarity_quantiles": {q: round(float(np.quantile(scores[~same], q)), 4) for q in (0.5, 0.99, 0.999, 1.0)},
        "copy_similarity_by_kind": kinds, "by_threshold": rows, "load": load(), "machine": machine(),
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
