"""Class folders: one sub-folder of images per class, or train/ beside val/ (valid/, validation/)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from bitcli.errors import BitError
from bitcli.images import list_images
from bitcli.preprocess import IMAGE_EXTENSIONS
from bitcli.sources.examples import ImageFolder, class_order
from bitcli.ui import log

VAL_SPLIT_NAMES = ("val", "valid", "validation")


def expected_layout(data: Path) -> str:
    return (
        "expected one sub-folder per class, with the images inside (any depth):\n"
        f"  {data}/\n"
        "    cat/   001.jpg 002.png ...\n"
        "    dog/   ...\n"
        "or a train split beside a validation split:\n"
        f"  {data}/\n"
        "    train/cat/...  train/dog/...\n"
        "    val/cat/...    val/dog/...     (or valid/, validation/)"
    )


def find_splits(data: Path) -> tuple[Path, Path | None]:
    """DATA -> (train folder, validation folder or None). DATA/train marks the split layout."""
    if not data.is_dir():
        raise BitError(f"{data}: no such folder; pass an image folder with one sub-folder per class")
    train = data / "train"
    if not train.is_dir():
        return data, None
    for name in VAL_SPLIT_NAMES:
        if (data / name).is_dir():
            return train, data / name
    return train, None


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
