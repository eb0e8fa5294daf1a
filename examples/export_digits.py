"""Export scikit-learn's handwritten digits (1,797 8x8 images, shipped with the package) as an image folder.

    python examples/export_digits.py OUT [--size 32] [--test-fraction 0.2]

writes OUT/train/<digit>/*.png and a held-out OUT/test/<digit>/*.png (stratified, fixed seed), each image
upscaled from 8x8 to SIZE x SIZE grey-scale PNG so that the CLI sees ordinary image files.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
from PIL import Image


def export(out: Path, size: int = 32, test_fraction: float = 0.2, seed: int = 0) -> tuple[int, int]:
    """Write the folder under a temporary name and rename it at the end: an interrupted export leaves
    nothing that looks finished."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    final, out = out, out.with_name(f".{out.name}.tmp")
    shutil.rmtree(out, ignore_errors=True)
    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)  # 0..16 -> 0..255
    train_idx, test_idx = train_test_split(
        np.arange(len(images)), test_size=test_fraction, stratify=digits.target, random_state=seed
    )
    for split, indices in (("train", train_idx), ("test", test_idx)):
        for i in indices:
            folder = out / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(images[i], mode="L").resize((size, size), Image.Resampling.BICUBIC)
            image.save(folder / f"{i:04d}.png")
    shutil.rmtree(final, ignore_errors=True)
    out.rename(final)
    return len(train_idx), len(test_idx)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    args = parser.parse_args()
    if (args.out / "train").is_dir() and (args.out / "test").is_dir():
        print(f"{args.out}: already exported")
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    n_train, n_test = export(args.out, args.size, args.test_fraction)
    print(f"{args.out}: {n_train} training and {n_test} held-out test images ({args.size}x{args.size} PNG)")


if __name__ == "__main__":
    main()
