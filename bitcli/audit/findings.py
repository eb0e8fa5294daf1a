"""What an audit found, as data: the inventory (images per class and split, imbalance, small classes,
undecodable files, images far from the model's resolution), the duplicate pairs (exact or near, within a split
or across splits: leakage; labels that disagree) and the likely label errors, each with the action it
suggests; then audit.json, one CSV per kind of finding and the counts that `--fail-on` rules test.

Multi-label data (an image may carry several classes): a class counts every image that carries it, the
inventory says `"multi_label": true` with each split's labels per image (min, median, max), a pair's labels
disagree when their label sets differ, and duplicates and label issues carry label lists (`labels_a`,
`labels_b`; `labels`, `suggested`: JSON lists, in the CSVs too) where single-label data has one label."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

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
        only: an undecodable file is no image to train on, and is listed apart (`undecodable`). Multi-label: the
        images that carry the class (an image counts in each of its classes)."""
        ex = self.examples
        counts = {}
        for s, split in enumerate(ex.splits):
            chosen = (ex.split == s) & self.decodable()
            if ex.multi_hot is None:
                per = np.bincount(ex.labels[chosen], minlength=len(ex.classes))
            else:
                per = ex.multi_hot[chosen].sum(axis=0, dtype=np.int64)
            counts[split] = {c: int(n) for c, n in zip(ex.classes, per)}
        return counts

    def decodable(self) -> np.ndarray:
        ok = np.ones(len(self.examples), dtype=bool)
        ok[list(self.errors)] = False
        return ok

    def labels_per_image(self, s: int) -> dict[str, float | int | None]:
        """Split s's decodable images' numbers of labels: min, median, max (None without an image)."""
        ex = self.examples
        assert ex.multi_hot is not None
        n = ex.multi_hot[(ex.split == s) & self.decodable()].sum(axis=1, dtype=np.int64)
        if not len(n):
            return {"min": None, "median": None, "max": None}
        median = float(np.median(n))
        return {"min": int(n.min()), "median": int(median) if median.is_integer() else median, "max": int(n.max())}

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
        decodable = self.decodable()
        for s, (split, per) in enumerate(self.class_counts().items()):
            present = [n for n in per.values() if n]
            splits[split] = {
                "images": int(np.count_nonzero((ex.split == s) & decodable)),
                "classes": per,
                "imbalance": round(max(present) / min(present), 4) if present else None,
                "undecodable": sum(1 for i in self.errors if ex.split_name(i) == split),
            }
            if ex.multi_label:
                splits[split]["labels_per_image"] = self.labels_per_image(s)
        multi = {"multi_label": True} if ex.multi_label else {}  # (single-label reports: as before)
        return {
            "model": {"name": self.model, "input_side": self.input_side},
            **multi,
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
        conflict = not ex.same_labels(p.a, p.b)
        if leak:
            action = f"drop a from {ex.split_name(p.a)} ({ex.split_name(p.b)} holds a copy)"
        else:
            action = "drop b (a copy of a)"
        if conflict:
            action += "; the labels disagree: check which is right"
        labels: dict[str, object]
        if ex.multi_label:
            labels = {"labels_a": ex.label_set(p.a), "labels_b": ex.label_set(p.b)}
        else:
            labels = {"label_a": ex.label(p.a), "label_b": ex.label(p.b)}
        return {
            "a": ex.names[p.a], "b": ex.names[p.b], "split_a": ex.split_name(p.a), "split_b": ex.split_name(p.b),
            "similarity": p.similarity, "exact": p.exact, **labels,
            "leak": bool(leak), "conflict": bool(conflict), "action": action,
        }  # fmt: skip

    def label_issue(self, issue: LabelIssue) -> dict:
        ex, i = self.examples, issue.example
        if ex.multi_label:
            wanted = [ex.classes[c] for c in issue.suggested_set]
            return {
                "path": ex.names[i], "split": ex.split_name(i), "labels": ex.label_set(i), "suggested": wanted,
                "score": issue.score, "action": f"relabel as {json.dumps(wanted, ensure_ascii=False)}, or drop",
            }  # fmt: skip
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
            "conflicts": sum(not ex.same_labels(p.a, p.b) for p in self.pairs),
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
    """A CSV of `rows`' `head` columns; a list (a multi-label image's labels) as a JSON list."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(head)
    writer.writerows([_cell(row[h]) for h in head] for row in rows)
    return buf.getvalue().encode("utf-8", "surrogateescape")


def _cell(value: object) -> object:
    return json.dumps(value, ensure_ascii=False) if isinstance(value, list) else value


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
    multi = inv.get("multi_label", False)
    duplicates = (
        [{"label_a": "labels_a", "label_b": "labels_b"}.get(c, c) for c in DUPLICATE_COLUMNS]
        if multi
        else DUPLICATE_COLUMNS
    )
    return {
        "inventory.csv": csv_bytes(("split", "class", "images"), per_class),
        "duplicates.csv": csv_bytes(duplicates, report["duplicates"]),
        "label_issues.csv": csv_bytes(
            ("path", "split", "labels" if multi else "label", "suggested", "score", "action"), report["label_issues"]
        ),
        "undecodable.csv": csv_bytes(("path", "split", "error"), inv["undecodable"]),
        "off_size.csv": csv_bytes(("path", "split", "width", "height"), inv["off_size"]),
    }
