"""`bit audit DATA`: inventory, exact and near-duplicates within and across splits (leakage), and likely label
errors, from one embedding pass with the model's pre-logit features (bitcli.audit). Prints the summary table;
with -o DIR also audit.json, a CSV per finding and index.html; --write-clean writes a label file without the
flagged rows; exit 1 when a --fail-on rule is broken."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any

import numpy as np
import torch

from bitcli import extras, pipeline
from bitcli.audit import clean
from bitcli.audit.cache import EmbeddingCache, model_key
from bitcli.audit.duplicates import SKETCH_ABOVE, find_pairs, unit_rows
from bitcli.audit.embedding import Embeddings, Interrupted, embed_examples
from bitcli.audit.examples import Examples, audit_parts, gather
from bitcli.audit.findings import Findings, broken, csv_files, to_json
from bitcli.audit.labels import LabelIssue, find_issues, find_multi_label_issues, out_of_sample_probs
from bitcli.audit.page import MAX_ISSUES, MAX_PAIRS, TYPICAL, PageInput, render, thumb
from bitcli.engine import load_engine
from bitcli.errors import BitError, UsageError
from bitcli.hub import bitcli_cache, load_checkpoint
from bitcli.pages.folder import write_page_folder
from bitcli.pages.html import Html
from bitcli.pages.pictures import THUMB, encode, fit
from bitcli.preprocess import Preprocess
from bitcli.runtime import resolve_device
from bitcli.sources.locate import Columns
from bitcli.sources.rows import load_example
from bitcli.tool_options import AUDIT_COUNTS, AuditOptions
from bitcli.ui import display, log, visible
from bitcli.writes import atomic_write

KIND = "bit audit"


def run(opts: AuditOptions) -> int:
    """The whole command; returns the exit code (0, or 1 when a --fail-on rule is broken)."""
    extras.require("audit", "bit audit")  # before any work
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("bit audit runs in one process: drop torchrun (it decodes a batch ahead on --workers threads)")
    started = time.monotonic()
    examples = gather(audit_parts(opts.data, opts.val, opts.test, Columns(opts.image_column, opts.label_column)))
    if opts.write_clean is not None and not examples.files_only():
        raise BitError(f"--write-clean {display(opts.write_clean)}: DATA's images are rows of a data set, not files, "
                       "so a label file cannot list them; audit a class folder or a label file to write one")  # fmt: skip
    if not len(examples):
        raise BitError(f"{display(str(opts.data))}: no images to audit")
    if opts.write_clean is not None:
        clean.check_format(opts.write_clean, examples)
    ckpt = load_checkpoint(opts.model, opts.revision)
    engine = load_engine(ckpt, resolve_device(opts.device), torch.float32, need_head=False)
    cache = EmbeddingCache(
        bitcli_cache(),
        model_key({k: r.load for k, r in ckpt.tensors.items()}, (ckpt.preprocess, torch.float32), ckpt.graph),
        ckpt.config.num_features,
    )
    try:
        found = embed_examples(examples, engine, cache, batch_size=opts.batch_size, workers=opts.workers)
    except Interrupted as stop:
        log(interrupted_line(stop, cache))
        return 130
    log(f"embedded {images(len(examples))} ({found.computed} computed, "
        f"{len(examples) - found.computed - len(found.errors)} from the cache, {len(found.errors)} undecodable) "
        f"in {time.monotonic() - started:.1f} s")  # fmt: skip
    findings = Findings(examples=examples, model=opts.model, input_side=_input_side(ckpt.preprocess),
                        min_images=opts.min_images, errors=found.errors, sizes=found.sizes)  # fmt: skip
    findings.pairs = find_pairs(found.vectors, found.pixels, opts.threshold,
                                sketch_above=None if opts.exact_search else SKETCH_ABOVE)  # fmt: skip
    findings.issues = label_issues(examples, found)
    report = findings.to_dict(opts.threshold)
    sys.stdout.write(summary(report))
    sys.stdout.flush()
    if opts.output is not None:
        _write_folder(opts, report, examples, found)
    if opts.write_clean is not None:
        data, kept = clean.clean_label_file(findings, opts.write_clean)
        atomic_write(opts.write_clean, lambda f: f.write(data))
        log(f"--write-clean: {display(opts.write_clean)} lists {kept} of {len(examples)} images")
    failed = broken(opts.fail_on, report["counts"])
    for line in failed:
        print(f"fail: {line}", file=sys.stderr)
    return 1 if failed else 0


def label_issues(examples: Examples, found: Embeddings) -> list[LabelIssue]:
    """The likely label errors among the decodable examples: the k-fold head's out-of-sample probabilities
    (softmax; one-vs-rest sigmoids for multi-label data) and cleanlab's rule."""
    ok = np.flatnonzero(found.ok)
    multi_hot = None if examples.multi_hot is None else examples.multi_hot[ok]
    probs = out_of_sample_probs(found.vectors[ok], examples.labels[ok], len(examples.classes), multi_hot=multi_hot)
    issues = find_issues(examples.labels[ok], probs) if multi_hot is None else find_multi_label_issues(multi_hot, probs)
    # the head saw the decodable examples only: their positions back to example numbers
    return [dataclasses.replace(i, example=int(ok[i.example])) for i in issues]


def images(n: int) -> str:
    return f"{n} image" if n == 1 else f"{n} images"


def interrupted_line(stop: Interrupted, cache: EmbeddingCache) -> str:
    """What Ctrl-C kept (the embeddings computed so far, in the cache) and how to go on (pipeline.exit_code's
    wording: the interrupted line of the other commands)."""
    head = f"interrupted: {stop.done} of {images(stop.total)} embedded, nothing written"
    if cache.folder is None:
        return f"{head}; the embedding cache could not be written, so the same command starts again"
    return (f"{head}; the {stop.computed} computed are kept in the embedding cache "
            f"{visible(display(cache.folder))}, so the same command computes only the rest")  # fmt: skip


def _input_side(preprocess: Preprocess) -> int:
    if preprocess.crop is not None:
        return min(preprocess.crop)
    resize = preprocess.resize
    return resize if isinstance(resize, int) else min(resize) if resize is not None else 224


def summary(report: dict) -> str:
    """The table on stdout: images per split, then every finding's count. Multi-label data adds each split's
    labels per image (min/median/max) and a line saying how classes are counted."""
    splits, multi = report["inventory"]["splits"], report["inventory"].get("multi_label", False)
    lines = [f"{'split':<12}{'images':>8}{'classes':>9}{'imbalance':>11}{'undecodable':>13}"]
    if multi:
        lines[0] += f"{'labels/image':>15}"
    for name, s in splits.items():
        classes = sum(1 for n in s["classes"].values() if n)
        imbalance = "n/a" if s["imbalance"] is None else f"{s['imbalance']:.2f}"
        lines.append(f"{name:<12}{s['images']:>8}{classes:>9}{imbalance:>11}{s['undecodable']:>13}")
        if multi:
            lines[-1] += f"{labels_per_image(s['labels_per_image']):>15}"
    if multi:
        lines.append("multi-label: a class counts every image that carries it; labels/image is min/median/max")
    lines.append("")
    lines.append(f"{'finding':<16}{'count':>7}")
    lines += [f"{name:<16}{report['counts'][name]:>7}" for name in AUDIT_COUNTS]
    return "\n".join(lines) + "\n"


def labels_per_image(stats: dict) -> str:
    """`1/2/3` (min/median/max), `n/a` for a split without a decodable image."""
    if stats["min"] is None:
        return "n/a"
    return f"{stats['min']}/{stats['median']:g}/{stats['max']}"


def typical_images(examples: Examples, found: Embeddings, per_class: int = TYPICAL) -> dict[str, list[int]]:
    """Each class's examples nearest its mean embedding direction (cosine), most typical first."""
    unit = unit_rows(found.vectors).numpy()
    typical = {}
    for c, name in enumerate(examples.classes):
        members = np.flatnonzero(examples.members(c) & found.ok)
        if not len(members):
            continue
        centre = unit[members].mean(axis=0)
        order = np.argsort(-(unit[members] @ centre), kind="stable")
        typical[name] = [int(members[j]) for j in order[:per_class]]
    return typical


def _write_folder(opts: AuditOptions, report: dict, examples: Examples, found: Embeddings) -> None:
    """audit.json, the CSVs, index.html and its thumbnails into -o DIR (bitcli.pages.folder's rules)."""
    assert opts.output is not None
    typical = typical_images(examples, found)
    number = {name: i for i, name in reversed(list(enumerate(examples.names)))}  # the first example of a name
    shown = {number[d[k]] for d in report["duplicates"][:MAX_PAIRS] for k in ("a", "b")}
    shown |= {number[i["path"]] for i in report["label_issues"][:MAX_ISSUES]}
    shown |= {i for ids in typical.values() for i in ids}
    files = {"audit.json": to_json(report), **csv_files(report)}
    problems = _thumbnails(examples, sorted(shown), files, batch_size=opts.batch_size, workers=opts.workers)

    def picture(path: str) -> Html:
        i = number[path]
        name = f"images/{i:06d}.jpg"
        return thumb(name if name in files else None, path, problems.get(i))

    title = f"{display(str(opts.data))} with {opts.model}"
    page = PageInput(title=title, report=report, thumbnail=picture,
                     typical={c: [examples.names[i] for i in ids] for c, ids in typical.items()})  # fmt: skip
    files["index.html"] = render(page).encode("utf-8")
    write_page_folder(opts.output, files, KIND)
    log(f"audit: {visible(display(opts.output / 'index.html'))}")


def _thumbnails(examples: Examples, shown: list[int], files: dict[str, bytes], *, batch_size: int,
                workers: int) -> dict[int, str]:  # fmt: skip
    """The thumbnails of `shown` examples into `files` (images/NNNNNN.jpg); example -> why it has none."""
    problems = {}

    def decode(i: int) -> Any:  # the thumbnail's JPEG bytes, made on a decoding thread
        return encode(fit(load_example(examples.ref(i)), THUMB))

    batches = pipeline.run(shown, decode, None, batch_size=batch_size, workers=workers, name=examples.names.__getitem__)
    for batch in batches:
        for outcome in batch:
            if outcome.error is not None:
                problems[outcome.ref] = outcome.error
            else:
                files[f"images/{outcome.ref:06d}.jpg"] = outcome.value
    return problems
