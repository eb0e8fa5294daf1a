"""Class folders: one sub-folder of images per class, or train/ beside val/ (any split name of
bitcli.sources.splits: training/, valid/, validation/, dev/ too)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import cast

from bitcli.errors import BitError
from bitcli.images import list_images
from bitcli.preprocess import IMAGE_EXTENSIONS
from bitcli.sources.examples import ImageFolder, class_order
from bitcli.sources.splits import SPLIT_KEYWORDS, canonical_split
from bitcli.ui import log


def expected_layout(data: Path) -> str:
    return (
        "expected one sub-folder per class, with the images inside (any depth):\n"
        f"  {data}/\n"
        "    cat/   001.jpg 002.png ...\n"
        "    dog/   ...\n"
        "or a train split beside a validation split:\n"
        f"  {data}/\n"
        "    train/cat/...  train/dog/...\n"
        "    val/cat/...    val/dog/...     (or valid/, validation/, dev/)"
    )


def find_splits(data: Path) -> tuple[Path, Path | None]:
    """DATA -> (train folder, validation folder or None). A train folder (DATA/train) marks the split layout."""
    if not data.is_dir():
        raise BitError(f"{data}: no such folder; pass an image folder with one sub-folder per class")
    folders = _split_folders(data)
    if "train" not in folders:
        return data, None
    return folders["train"], folders.get("validation")


def test_split(data: Path) -> Path | None:
    """DATA/test (or testing/, eval/ ...) beside DATA/train, or None (a folder without train/ is all one split)."""
    folders = _split_folders(data) if data.is_dir() else {}
    return folders.get("test") if "train" in folders else None


def _split_folders(data: Path) -> dict[str, Path]:
    """{split: sub-folder} of DATA's sub-folders named a split (any case); where two name one split, the word
    the table lists first wins (val/ before valid/). Only names that are split words are looked at."""
    rank = {word: i for words in SPLIT_KEYWORDS.values() for i, word in enumerate(words)}
    try:
        names = [name for name in os.listdir(data) if name.lower() in rank]
    except OSError as exc:
        raise BitError(f"{data}: cannot list folder ({exc.strerror})") from None
    found: dict[str, Path] = {}
    for _, name in sorted((rank[name.lower()], name) for name in names if (data / name).is_dir()):
        found.setdefault(cast(str, canonical_split(name)), data / name)  # a split word: rank lists only those
    return found


def _class_dirs(root: Path) -> list[Path]:
    """The class sub-folders, in class order (examples.class_order: by number when every name is an integer)."""
    try:
        dirs = {p.name: p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    except OSError as exc:
        raise BitError(f"{root}: cannot list folder ({exc.strerror})") from None
    return [dirs[name] for name in class_order(dirs)]


def scan(root: Path, classes: Sequence[str] | None = None) -> ImageFolder:
    """One sub-folder per class. With `classes` (the training classes) the folder may hold a subset of them."""
    if not root.is_dir():
        raise BitError(f"{root}: no such folder; pass an image folder with one sub-folder per class")
    dirs = _class_dirs(root)
    if not dirs:
        loose = any(p.suffix.lower() in IMAGE_EXTENSIONS for p in root.iterdir())
        log(expected_layout(root))
        why = "holds images but no class sub-folders" if loose else "has no class sub-folders"
        raise BitError(f"{root}: {why}; put each class's images in a sub-folder named after the class (tree above)")
    names = tuple(d.name for d in dirs)
    if classes is None:
        classes = names
    else:
        unknown = [n for n in names if n not in classes]
        if unknown:
            raise BitError(
                f"{root / unknown[0]}: class {unknown[0]!r} is not among the {len(classes)} training classes; "
                "validation folders must use the training folder names"
            )
    index = {name: i for i, name in enumerate(classes)}
    paths: list[str] = []
    targets: list[int] = []
    for d in dirs:
        images = list_images(d)  # at any depth; names starting with "." are skipped
        if not images:
            log(expected_layout(root))
            raise BitError(
                f"{d}: class folder {d.name!r} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); "
                "add images or remove the folder"
            )
        paths.extend(images)
        targets.extend([index[d.name]] * len(images))
    return ImageFolder(root, tuple(classes), tuple(paths), tuple(targets))
