"""Generate bitcli's packaged ImageNet class names (bitcli/labels/*.txt) from timm's package data.

    python scripts/make_labels.py            # rewrites bitcli/labels/imagenet1k.txt and imagenet21k.txt
    python scripts/make_labels.py --out DIR  # writes them into DIR instead

timm (a test dependency, Apache-2.0) ships the synset lists in the order the checkpoints use and the WordNet
lemmas of every synset; this script only joins the two. Each output has one name per line, so line i (from 0)
names class i. The files are data: regenerate them with this script, never edit them by hand.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import sys
from pathlib import Path

# output file -> (timm synset list, number of classes); the 21k list is Google's order (BiT-M upstream heads)
OUTPUTS = {
    "imagenet1k.txt": ("imagenet_synsets.txt", 1000),
    "imagenet21k.txt": ("imagenet21k_goog_synsets.txt", 21843),
}
LEMMA_FILE = "imagenet_synset_to_lemma.txt"
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "bitcli" / "labels"


def timm_info_dir() -> Path:
    """timm/data/_info, found without importing timm (which would import torch)."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("timm is not installed; install the test extras: pip install -e '.[test]'")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "_info"


def read_lines(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def read_lemmas(path: Path) -> dict[str, str]:
    lemmas: dict[str, str] = {}
    for number, line in enumerate(read_lines(path), 1):
        fields = line.split("\t")
        if len(fields) != 2 or fields[0] in lemmas:
            raise SystemExit(f"{path}:{number}: expected one 'synset<TAB>lemmas' line per synset, got {line!r}")
        lemmas[fields[0]] = fields[1]
    return lemmas


def check_name(name: str, where: str) -> str:
    # A loader splits on "\n" and eval matches folder names, so a name must be one clean line
    if not name or name != name.strip() or name.splitlines() != [name] or "\t" in name or not name.isprintable():
        raise SystemExit(
            f"{where}: class name {name!r} is empty, padded or holds a line break, tab or control character"
        )
    return name


def label_names(info: Path, synset_file: str, count: int, lemmas: dict[str, str]) -> list[str]:
    synsets = read_lines(info / synset_file)
    if len(synsets) != count or len(set(synsets)) != count:
        raise SystemExit(f"{info / synset_file}: expected {count} distinct synsets, got {len(synsets)}")
    missing = [s for s in synsets if s not in lemmas]
    if missing:
        raise SystemExit(f"{info / LEMMA_FILE}: no lemmas for {len(missing)} synsets, e.g. {missing[:3]}")
    return [check_name(lemmas[s], f"{synset_file} line {i + 1} ({s})") for i, s in enumerate(synsets)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    info = timm_info_dir()
    lemmas = read_lemmas(info / LEMMA_FILE)
    args.out.mkdir(parents=True, exist_ok=True)
    for filename, (synset_file, count) in OUTPUTS.items():
        names = label_names(info, synset_file, count, lemmas)
        data = "".join(name + "\n" for name in names).encode("utf-8")
        target = args.out / filename
        partial = target.with_name(target.name + ".partial")  # never leave a half-written label file
        partial.write_bytes(data)
        partial.replace(target)
        print(
            f"{target}: {count} names, {len(data)} bytes (from timm {importlib.metadata.version('timm')})",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
