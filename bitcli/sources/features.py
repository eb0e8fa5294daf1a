"""Which columns of a Hugging Face data set hold the image and the label, from its features (an `Image`, a
`ClassLabel` and its names) or from --image-column / --label-column, and what an image cell holds."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bitcli.errors import BitError, UsageError

HF_METADATA_KEY = b"huggingface"  # parquet/Arrow schema metadata: {"info": {"features": {...}}}
FALLBACK_LABEL = "label"  # the label column when no column is a ClassLabel


@dataclass(frozen=True)
class Columns:
    """A data set's image and label columns: as --image-column and --label-column give them (None: found from
    the features), or as choose_columns found them (both named). Its repr is part of a run's fingerprint."""

    image: str | None = None
    label: str | None = None
    names: tuple[str, ...] | None = None  # the ClassLabel's names (classes in index order); None: values, by name
    # A Sequence(ClassLabel) column: a list of class indices a row (multi-label). Not in the repr: the
    # fingerprints of runs from before it stay what they were.
    multi: bool = field(default=False, repr=False)


def schema_features(schema) -> dict[str, Any] | None:
    """The HF features that `datasets` stores in a parquet or Arrow schema's metadata, if any."""
    raw = (schema.metadata or {}).get(HF_METADATA_KEY)
    if raw is None:
        return None
    try:
        features = json.loads(raw).get("info", {}).get("features")
    except (ValueError, AttributeError):
        return None
    return features if isinstance(features, dict) else None


def check_features(features: dict[str, Any] | None, where: str, fix: str) -> None:
    """Every ClassLabel's names must be a list of distinct strings (its classes, in index order): a number or a
    string there is no list of classes ("abc" would be three classes a, b, c), and a name given twice would
    make two classes that no one can tell apart. One line naming `where` (the file the features come from)
    and `fix`."""
    for column, feature in (features or {}).items():
        if _type(feature) != "ClassLabel":
            continue
        names = feature.get("names")
        if names is None:
            continue  # no names: the label values are read as they are
        shown = json.dumps(names, ensure_ascii=False)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise BitError(
                f"{where}: the ClassLabel names of column {column!r} are {shown}, not a list of class names; {fix}"
            )
        seen: set[str] = set()
        for name in names:
            if name in seen:
                raise BitError(f"{where}: the ClassLabel of column {column!r} names class {name!r} twice; {fix}")
            seen.add(name)


def choose_columns(
    schema, features: dict[str, Any] | None, *, image: str | None, label: str | None, where: str
) -> Columns:
    """The image and label columns: named by the flags, else found from the features (see docs/data-sources.md)."""
    import pyarrow as pa

    present = list(schema.names)
    listing = ", ".join(present)
    features = features or {}
    for flag, name in (("--image-column", image), ("--label-column", label)):
        if name is not None and name not in present:
            raise UsageError(f"{flag} {name}: {where} has no such column (columns: {listing})")
    if image is None:
        found = [n for n in present if _type(features.get(n)) == "Image"] or (
            [] if features else [n for n in present if _encoded_images(schema.field(n).type)]
        )
        if len(found) != 1:
            why = f"several image columns ({', '.join(found)})" if found else "no image column (an Image feature)"
            raise BitError(f"{where}: {why}; name it with --image-column (columns: {listing})")
        image = found[0]
    if not _holds_images(schema.field(image).type):
        raise BitError(
            f"{where}: column {image!r} holds {schema.field(image).type}, not images; name the image column with --image-column"
        )
    if label is None:
        found = [n for n in present if _type(features.get(n)) == "ClassLabel" or _class_list(features.get(n))]
        if len(found) > 1:
            raise BitError(
                f"{where}: several ClassLabel columns ({', '.join(found)}); name the label column with --label-column"
            )
        if not found and FALLBACK_LABEL not in present:
            raise BitError(
                f"{where}: no label column (a ClassLabel, or a column named 'label'); name it with --label-column (columns: {listing})"
            )
        label = found[0] if found else FALLBACK_LABEL
    kind = schema.field(label).type
    listed = _class_list(features.get(label))
    if listed is not None:  # Sequence(ClassLabel): multi-label, a list of class indices a row
        if not ((pa.types.is_list(kind) or pa.types.is_large_list(kind)) and pa.types.is_integer(kind.value_type)):
            raise BitError(f"{where}: label column {label!r} is a Sequence(ClassLabel) but holds {kind}")
        return Columns(image=image, label=label, names=listed, multi=True)
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):  # several labels a row, named by their values
        inner = kind.value_type
        if not (pa.types.is_integer(inner) or pa.types.is_string(inner) or pa.types.is_large_string(inner)):
            raise BitError(
                f"{where}: label column {label!r} holds {kind}; a list of labels a row (multi-label) holds class "
                "names or integers, or is a Sequence(ClassLabel)"
            )
        return Columns(image=image, label=label, names=None, multi=True)
    if not (pa.types.is_integer(kind) or pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise BitError(
            f"{where}: label column {label!r} holds {kind}; labels must be class names or integers (--label-column)"
        )
    feature = features.get(label)
    check_features({label: feature}, where, "write the data set again with datasets, or name another --label-column")
    names = (
        tuple(str(n) for n in feature.get("names") or ())
        if isinstance(feature, dict) and _type(feature) == "ClassLabel"
        else None
    )
    return Columns(image=image, label=label, names=names or None)


def _class_list(feature: Any) -> tuple[str, ...] | None:
    """A Sequence (or List, datasets 4) of ClassLabel feature's class names; None for any other feature."""
    if _type(feature) not in ("Sequence", "List"):
        return None
    inner = feature.get("feature")
    if _type(inner) != "ClassLabel" or not inner.get("names"):
        return None
    return tuple(str(n) for n in inner["names"])


def _type(feature: Any) -> str | None:
    return feature.get("_type") if isinstance(feature, dict) else None


def _encoded_images(kind) -> bool:
    """An Image feature's struct<bytes, path>, or encoded bytes: what is taken for images without features."""
    import pyarrow as pa

    if pa.types.is_struct(kind):
        return kind.get_field_index("bytes") >= 0 or kind.get_field_index("path") >= 0
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)


def _holds_images(kind) -> bool:
    """An image column: encoded images, or (named with --image-column) the paths of image files."""
    import pyarrow as pa

    return _encoded_images(kind) or pa.types.is_string(kind) or pa.types.is_large_string(kind)


def image_cell(value: Any, folder: Path, name: str) -> bytes | str:
    """An image cell's encoded bytes, or the path of its file (relative paths: to the data set's folder)."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)) and len(value):
        return bytes(value)
    if isinstance(value, str) and value:
        return str(folder / value)
    raise BitError(f"{name}: image cell is empty (no bytes and no path)")
