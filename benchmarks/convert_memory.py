"""Peak memory of `bit convert` on BiT-M-R152x4 (~936M parameters, ~3.7 GB): the conversion streams.

Writes a random R152x4 checkpoint in Google's .npz layout one zip member at a time (generating it needs one
array's memory, not the checkpoint's), converts it with `python -m bitcli convert` in a child process, and
reports the child's own peak resident set size (see rss.py) against the checkpoint's size. A second child
that only imports bitcli and builds the R152x4 shape table gives the fixed cost of the interpreter and torch.
Afterwards a few tensors of the output are compared with the .npz, and the big files are deleted.

    .venv/bin/python benchmarks/convert_memory.py [--workdir DIR] [--format bitcli hf] [--keep]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rss import run_measured

VARIANTS = {"R152x4": ((3, 8, 36, 3), 4), "R50x1": ((3, 4, 6, 3), 1)}  # R50x1: a quick check of the script
CLASSES = 21843  # BiT-M's ImageNet-21k head


def google_shapes(depths: tuple[int, ...], width: int, classes: int = CLASSES) -> dict[str, tuple[int, ...]]:
    """Every array of Google's layout (HWIO kernels, `resnet/` prefix) with its shape."""
    shapes = {"resnet/root_block/standardized_conv2d/kernel": (7, 7, 3, 64 * width)}
    cin = 64 * width
    for s, depth in enumerate(depths):
        cout = 256 * width * 2**s
        mid = cout // 4
        for u in range(depth):
            unit = f"resnet/block{s + 1}/unit{u + 1:02d}/"
            shapes[unit + "a/group_norm/gamma"] = shapes[unit + "a/group_norm/beta"] = (cin,)
            if u == 0:
                shapes[unit + "a/proj/standardized_conv2d/kernel"] = (1, 1, cin, cout)
            shapes[unit + "a/standardized_conv2d/kernel"] = (1, 1, cin, mid)
            shapes[unit + "b/group_norm/gamma"] = shapes[unit + "b/group_norm/beta"] = (mid,)
            shapes[unit + "b/standardized_conv2d/kernel"] = (3, 3, mid, mid)
            shapes[unit + "c/group_norm/gamma"] = shapes[unit + "c/group_norm/beta"] = (mid,)
            shapes[unit + "c/standardized_conv2d/kernel"] = (1, 1, mid, cout)
            cin = cout
    shapes["resnet/group_norm/gamma"] = shapes["resnet/group_norm/beta"] = (cin,)
    shapes["resnet/head/conv2d/kernel"] = (1, 1, cin, classes)
    shapes["resnet/head/conv2d/bias"] = (classes,)
    return shapes


def write_npz(path: Path, shapes: dict[str, tuple[int, ...]], seed: int = 0) -> None:
    """Member by member with numpy's own .npy writer: one array in memory at a time (np.savez needs them all)."""
    rng = np.random.default_rng(seed)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, shape in shapes.items():
            array = rng.standard_normal(shape, dtype=np.float32)
            array *= np.float32(0.02)
            with zf.open(key + ".npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)
            del array


def read_member(npz: Path, key: str) -> np.ndarray:
    with zipfile.ZipFile(npz) as zf, zf.open(key + ".npy") as fh:
        return np.lib.format.read_array(fh, allow_pickle=False)


def spot_check(npz: Path, out: Path, fmt: str) -> int:
    """A few tensors of the output against the .npz, bit for bit; returns the output's tensor count."""
    import torch
    from safetensors import safe_open

    names = {
        "resnet/root_block/standardized_conv2d/kernel": {"bitcli": "stem.conv.weight", "hf": "bit.embedder.convolution.weight"},
        "resnet/block3/unit02/b/standardized_conv2d/kernel": {"bitcli": "stages.2.units.1.conv2.weight", "hf": "bit.encoder.stages.2.layers.1.conv2.weight"},
        "resnet/group_norm/gamma": {"bitcli": "norm.weight", "hf": "bit.norm.weight"},
        "resnet/head/conv2d/kernel": {"bitcli": "head.weight", "hf": "classifier.1.weight"},
    }  # fmt: skip
    path = out if fmt == "bitcli" else out / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        for key, name in names.items():
            want = torch.from_numpy(read_member(npz, key))
            want = (
                want[0, 0].t()
                if key.endswith("head/conv2d/kernel")
                else (want.permute(3, 2, 0, 1) if want.ndim == 4 else want)
            )
            got = f.get_tensor(name[fmt])
            assert torch.equal(got, want), (key, name[fmt])
        return len(list(f.keys()))


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    mem_kb = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    import numpy
    import safetensors
    import torch

    return (
        f"{os.cpu_count()} CPUs ({cpu}), {mem_kb / 2**20:.1f} GiB RAM, {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}, torch {torch.__version__}, numpy {numpy.__version__}, "
        f"safetensors {safetensors.__version__}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="Where the big files go (default: a temp dir).")
    parser.add_argument("--format", nargs="+", default=["bitcli", "hf"], choices=["bitcli", "hf"])
    parser.add_argument("--keep", action="store_true", help="Keep the generated and converted files.")
    parser.add_argument("--variant", default="R152x4", choices=sorted(VARIANTS))
    parser.add_argument("--classes", type=int, default=CLASSES, help="Head size: 21843 (BiT-M), 1000 (ILSVRC-2012).")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bitcli-bench-", dir=args.workdir))
    npz = work / f"BiT-M-{args.variant}.npz"
    depths, width = VARIANTS[args.variant]
    shapes = google_shapes(depths, width, args.classes)
    params = sum(int(np.prod(s)) for s in shapes.values())
    largest = max(shapes, key=lambda k: np.prod(shapes[k]))
    print(machine())
    print(
        f"{args.variant}, {args.classes} classes: {params / 1e6:.1f}M parameters in {len(shapes)} arrays; largest {largest} {shapes[largest]}"
    )
    try:
        start = time.perf_counter()
        write_npz(npz, shapes)
        size = npz.stat().st_size
        print(f"wrote {npz} ({size / 1e9:.3f} GB = {size / 2**30:.3f} GiB) in {time.perf_counter() - start:.0f} s")

        probe = (
            "import bitcli.commands.convert, bitcli.hub; from bitcli.config import BitConfig; from bitcli.formats import "
            f"expected_shapes; expected_shapes(BitConfig(depths={depths}, hidden_sizes={tuple(256 * width * 2**s for s in range(4))}, "
            f"embedding_size={64 * width}, num_classes={args.classes}))"
        )
        code, secs, base_mib, err = run_measured([sys.executable, "-c", probe])
        assert code == 0, err
        print(f"fixed cost (python + torch + bitcli + the shape table): peak RSS {base_mib:.0f} MiB")

        for fmt in args.format:
            out = work / ("out.safetensors" if fmt == "bitcli" else "out-hf")
            cmd = [sys.executable, "-m", "bitcli", "convert", str(npz), str(out), "--format", fmt]
            code, secs, peak_mib, err = run_measured(cmd)
            if code != 0:
                raise SystemExit(f"conversion failed ({code}):\n{err}")
            written = out.stat().st_size if fmt == "bitcli" else (out / "model.safetensors").stat().st_size
            tensors = spot_check(npz, out, fmt)
            print(
                f"bit convert --format {fmt}: {secs:.0f} s, {tensors} tensors, output {written / 1e9:.3f} GB; "
                f"peak RSS {peak_mib:.0f} MiB = {peak_mib * 2**20 / size:.3f} x the checkpoint "
                f"({peak_mib - base_mib:.0f} MiB above the fixed cost)"
            )
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work)


if __name__ == "__main__":
    main()
