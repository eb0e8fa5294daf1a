"""What an audit found, as data: the inventory (images per class and split, imbalance, small classes,
undecodable files, images far from the model's resolution), the duplicate pairs (exact or near, within a split
or across splits: leakage; labels that disagree) and the likely label errors, each with the action it
suggests; then audit.json, one CSV per kind of finding, the counts that `--fail-on` rules test and the clean
label file of `--write-clean`."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bitcli.audit.duplicates import Pair
from bitcli.audit.examples import Examples
from bitcli.audit.labels import LabelIssue
from bitcli.tool_options import FailRule

FAR_BELOW = 0.5  # an image whose shorter side is under half the model's input side is upscaled (blurred) ...
FAR_ABOVE = 8.0  # ... and one over 8 times it is mostly thrown away by the resize


@dataclass
class Findings:
    examples: Examples
    model: str
    input_side: int  # the model's input (crop, or resize) side in pixels
    min_images: int
    errors: dict[int, str]
    sizes: np.ndarray  # [N, 2]
    pairs: list[Pair] = field(default_factory=list)
    issues: list[LabelIssue] = field(default_factory=list)

    # ---- inventory

    def class_counts(self) -> dict[str, dict[str, int]]:
        """{split: {class: images}} over every class of the audit (0 where a split lacks one); decodable images
        only: an undecodable file is no image to train on, and is listed apart (`undecodable`)."""
        ex = self.examples
        decodable = np.ones(len(ex), dtype=bool)
        decodable[list(self.errors)] = False
        counts = {}
        for s, split in enumerate(ex.splits):
            per = np.bincount(ex.labels[(ex.split == s) & decodable], minlength=len(ex.classes))
            counts[split] = {c: int(n) for c, n in zip(ex.classes, per)}
        return counts

    def small_classes(self) -> list[tuple[str, str, int]]:
        """(split, class, images) of every class with fewer than min_images images in a split that has it (a
        class a split lacks shows as 0 in the inventory)."""
        counts = self.class_counts().items()
        return [(split, c, n) for split, per in counts for c, n in per.items() if 0 < n < self.min_images]

    def off_size(self) -> list[int]:
        """Decoded images whose shorter side is far from the model's input side."""
        short = self.sizes.min(axis=1)
        far = (short > 0) & ((short < FAR_BELOW * self.input_side) | (short > FAR_ABOVE * self.input_side))
        return [int(i) for i in np.flatnonzero(far)]

    def inventory(self) -> dict:
        ex = self.examples
        splits = {}
        for split, per in self.class_counts().items():
            present = [n for n in per.values() if n]
            splits[split] = {
                "images": sum(per.values()),
                "classes": per,
                "imbalance": round(max(present) / min(present), 4) if present else None,
                "undecodable": sum(1 for i in self.errors if ex.split_name(i) == split),
            }
        return {
            "model": {"name": self.model, "input_side": self.input_side},
            "classes": list(ex.classes),
            "splits": splits,
            "small_classes": [{"split": s, "class": c, "images": n} for s, c, n in self.small_classes()],
            "min_images": self.min_images,
            "undecodable": [
                {"path": ex.names[i], "split": ex.split_name(i), "error": e} for i, e in sorted(self.errors.items())
            ],
            "off_size": [
                {
                    "path": ex.names[i],
                    "split": ex.split_name(i),
                    "width": int(self.sizes[i, 0]),
                    "height": int(self.sizes[i, 1]),
                }
                for i in self.off_size()
            ],
        }

    # ---- findings

    def duplicate(self, p: Pair) -> dict:
        ex = self.examples
        leak = ex.split[p.a] != ex.split[p.b]
        conflict = ex.labels[p.a] != ex.labels[p.b]
        if leak:
            action = f"drop a from {ex.split_name(p.a)} ({ex.split_name(p.b)} holds a copy)"
        else:
            action = "drop b (a copy of a)"
        if conflict:
            action += "; the labels disagree: check which is right"
        return {
            "a": ex.names[p.a], "b": ex.names[p.b], "split_a": ex.split_name(p.a), "split_b": ex.split_name(p.b),
            "similarity": p.similarity, "exact": p.exact, "label_a": ex.label(p.a), "label_b": ex.label(p.b),
            "leak": bool(leak), "conflict": bool(conflict), "action": action,
        }  # fmt: skip

    def label_issue(self, issue: LabelIssue) -> dict:
        ex, i = self.examples, issue.example
        suggested = ex.classes[issue.suggested]
        return {
            "path": ex.names[i], "split": ex.split_name(i), "label": ex.label(i), "suggested": suggested,
            "score": issue.score, "action": f"relabel as {suggested}, or drop",
        }  # fmt: skip

    def dropped(self) -> set[int]:
        """The examples --write-clean leaves out: undecodable, the dropped copy of each duplicate pair (b, or
        across splits the earlier split's a) and every likely label error."""
        ex = self.examples
        out = set(self.errors) | {i.example for i in self.issues}
        out |= {p.a if ex.split[p.a] != ex.split[p.b] else p.b for p in self.pairs}
        return out

    def counts(self) -> dict[str, int]:
        """Each finding's number, by the names --fail-on takes (tool_options.AUDIT_COUNTS)."""
        ex = self.examples
        return {
            "duplicates": len(self.pairs),
            "exact": sum(p.exact for p in self.pairs),
            "near": sum(not p.exact for p in self.pairs),
            "leaks": sum(bool(ex.split[p.a] != ex.split[p.b]) for p in self.pairs),
            "conflicts": sum(bool(ex.labels[p.a] != ex.labels[p.b]) for p in self.pairs),
            "label-issues": len(self.issues),
            "undecodable": len(self.errors),
            "small-classes": len(self.small_classes()),
            "off-size": len(self.off_size()),
        }

    def to_dict(self, threshold: float) -> dict:
        return {
            "format": "bit-audit/1",
            "near_threshold": threshold,
            "counts": self.counts(),
            "inventory": self.inventory(),
            "duplicates": [self.duplicate(p) for p in self.pairs],
            "label_issues": [self.label_issue(i) for i in self.issues],
        }


def broken(rules: Sequence[FailRule], counts: dict[str, int]) -> list[str]:
    """The --fail-on rules the counts exceed, as `leaks: 3 > 0`."""
    return [f"{r.name}: {counts[r.name]} > {r.limit}" for r in rules if counts[r.name] > r.limit]


def to_json(report: dict) -> bytes:
    return (json.dumps(report, ensure_ascii=False, indent=1) + "\n").encode("utf-8", "surrogateescape")


def csv_bytes(head: Sequence[str], rows: Sequence[dict]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(head)
    writer.writerows([row[h] for h in head] for row in rows)
    return buf.getvalue().encode("utf-8", "surrogateescape")


DUPLICATE_COLUMNS = (
    "a",
    "b",
    "split_a",
    "split_b",
    "similarity",
    "exact",
    "label_a",
    "label_b",
    "leak",
    "conflict",
    "action",
)


def csv_files(report: dict) -> dict[str, bytes]:
    """One CSV per kind of finding (and the inventory's counts)."""
    inv = report["inventory"]
    per_class = [
        {"split": s, "class": c, "images": n} for s, v in inv["splits"].items() for c, n in v["classes"].items()
    ]
    return {
        "inventory.csv": csv_bytes(("split", "class", "images"), per_class),
        "duplicates.csv": csv_bytes(DUPLICATE_COLUMNS, report["duplicates"]),
        "label_issues.csv": csv_bytes(
            ("path", "split", "label", "suggested", "score", "action"), report["label_issues"]
        ),
        "undecodable.csv": csv_bytes(("path", "split", "error"), inv["undecodable"]),
        "off_size.csv": csv_bytes(("path", "split", "width", "height"), inv["off_size"]),
    }


def clean_label_file(findings: Findings, target: Path) -> tuple[bytes, int]:
    """A label file (path,label[,split]; paths relative to the file's folder where they can be) of every
    example that no finding drops, and how many it keeps."""
    ex = findings.examples
    drop = findings.dropped()
    keep = [i for i in range(len(ex)) if i not in drop]
    with_split = ex.splits != ["data"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(("path", "label", "split") if with_split else ("path", "label"))
    folder = os.path.abspath(target.parent)
    for i in keep:
        path = os.fspath(ex.ref(i))
        try:
            path = os.path.relpath(os.path.abspath(path), folder)
        except ValueError:  # another drive (Windows): keep it absolute
            path = os.path.abspath(path)
        label = ex.label_text(i)  # a multi-label example's every label
        row = (path, label, _split_word(ex.split_name(i))) if with_split else (path, label)
        writer.writerow(row)
    return buf.getvalue().encode("utf-8", "surrogateescape"), len(keep)


def _split_word(split: str) -> str:
    return {"validation": "val"}.get(split, split)
