"""The model card (`README.md`) that `bit push` publishes: YAML metadata that the Hub reads (pipeline_tag,
library_name, tags, base_model, datasets, license, model-index with the validation metrics, written by
huggingface_hub's ModelCardData and EvalResult), then what a reader needs: how to use the model, the start model,
the plan, the data (fingerprint, classes), the metrics and the pictures.

A run is read with bitcli.finetune.runfiles' readers (no torch). Local paths are never published: a folder is
named by its last part only (`/home/alice/photos/train` is "train"); Hub data sets (hf://...) keep their ids.
Text from data (class and folder names) is escaped, so that a name cannot become Markdown or HTML on the Hub.
"""

from __future__ import annotations

import html
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

from bitcli import hyperrule
from bitcli.architectures import is_published_name
from bitcli.errors import BitError, one_line
from bitcli.finetune.runfiles import CONFIG_FILE, PICTURE_FILES, SUMMARY_FILE, VALIDATION_FILE
from bitcli.formats.checkpoint import Checkpoint
from bitcli.reads import inside, read_bounded, read_json
from bitcli.sources import hub as hub_data
from bitcli.ui import log, visible

TAGS = ["bit", "bitcli", "image-classification"]
PICTURE_TITLES = {"curves.png": "Training curves", "confusion.png": "Confusion matrix (validation)"}
MAX_PICTURE = 20 * 2**20  # bytes: bit finetune's pictures are tens of KiB; a bigger file is no picture it drew
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_HELD_OUT = re.compile(r"(?P<fraction>\S+) of every class of .* \(seed (?P<seed>\d+)\)")
_MARKDOWN = re.compile(r"([\\`*_{}\[\]()#+!|~])")


@dataclass(frozen=True)
class RunRecord:
    """What a `bit finetune` run folder says about its model: the plan, the final summary, the last
    validation (None when the run had no validation set) and the pictures it drew ({name: PNG bytes}).

    Every file is read through `reads.inside`, so a symlink in the folder cannot publish a file from elsewhere
    on disk, and only if it is a regular file (`reads.open_regular`). A picture that breaks a rule is left out
    with a warning (the card is complete without it); a JSON file that does is an error, as a malformed one is.
    The pictures are read here, once: what was checked is what is uploaded."""

    plan: dict[str, Any]
    summary: dict[str, Any] | None
    validation: dict[str, Any] | None
    pictures: dict[str, bytes]

    @classmethod
    def read(cls, folder: Path) -> RunRecord | None:
        """The record of a run folder; None for anything else (a model file or folder, a Hub id)."""
        if not (folder / CONFIG_FILE).is_file():
            return None
        summary, validation = (folder / SUMMARY_FILE), (folder / VALIDATION_FILE)
        return cls(
            plan=read_json(inside(folder, CONFIG_FILE)),
            summary=read_json(inside(folder, SUMMARY_FILE)) if summary.is_file() else None,
            validation=read_json(inside(folder, VALIDATION_FILE)) if validation.is_file() else None,
            pictures={name: data for name in PICTURE_FILES if (data := read_picture(folder, name)) is not None},
        )


def read_picture(folder: Path, name: str) -> bytes | None:
    """The PNG `folder/name`, or None: missing, or (with a warning naming it) not a regular PNG file of at most
    MAX_PICTURE inside the folder."""
    path = folder / name
    if not os.path.lexists(path):
        return None
    try:
        data = read_bounded(inside(folder, name), MAX_PICTURE)
        if not data.startswith(PNG_SIGNATURE):
            raise BitError(f"{path}: is not a PNG picture")
    except BitError as exc:
        log(f"warning: pushing without {name}: {visible(str(exc))}")
        return None
    return data


@dataclass(frozen=True)
class CardInput:
    repo_id: str  # OWNER/NAME the card is published under
    ckpt: Checkpoint
    src: str  # the model spec or run folder as given (only its last part is shown for a local path)
    run: RunRecord | None
    license: str | None
    files: tuple[str, ...]  # the names the repo will hold besides README.md


def model_card(card: CardInput) -> str:
    """README.md: the metadata block, then the text."""
    try:
        return f"---\n{metadata(card).to_yaml()}\n---\n\n{body(card)}"
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # a hand-edited plan or validation.json
        raise BitError(
            f"{public_name(card.src)}: its run files are not what bit finetune writes ({one_line(exc)})"
        ) from None


def metadata(card: CardInput):
    """huggingface_hub's ModelCardData for the card (imported here: huggingface_hub only when pushing)."""
    from huggingface_hub import ModelCardData

    run = card.run
    datasets = (
        sorted({d for d in (hub_dataset(run.plan["data"]), hub_dataset(run.plan.get("validation"))) if d})
        if run
        else []
    )
    results = eval_results(run) if run is not None and run.validation is not None else None
    return ModelCardData(
        pipeline_tag="image-classification",
        library_name="transformers",
        tags=TAGS,
        base_model=base_model(run.plan) if run is not None else None,
        datasets=datasets or None,
        license=card.license,
        model_name=card.repo_id.split("/")[1] if results else None,
        eval_results=results,
    )


def eval_results(run: RunRecord) -> list[Any]:
    """model-index: the last validation's top-1 (and top-5, macro F1) on the validation data."""
    from huggingface_hub import EvalResult

    val = run.validation or {}
    source = run.plan.get("validation") or ""
    dataset = hub_dataset(source) or hub_dataset(run.plan["data"])
    dataset_name = dataset or public_name(run.plan["data"])
    metrics = [("accuracy", "Top-1 accuracy", val.get("top1")), ("top_5_accuracy", "Top-5 accuracy", val.get("top5")),
               ("f1", "Macro F1", val.get("macro_f1"))]  # fmt: skip
    return [
        EvalResult(
            task_type="image-classification",
            task_name="Image Classification",
            dataset_type=dataset or "imagefolder",
            dataset_name=dataset_name,
            dataset_split=hub_split(source) or "validation",
            metric_type=kind,
            metric_name=name,
            metric_value=round(float(value), 4),
        )
        for kind, name, value in metrics
        if isinstance(value, (int, float)) and math.isfinite(value)
    ]


def base_model(plan: dict[str, Any]) -> str | None:
    """The start model when it is a Hub repo id (`google/bit-50`); a published name, a local file and a
    random initialisation have none the Hub could link to."""
    spec = str(plan["model"])
    if plan.get("random_init") or is_published_name(spec.removesuffix(".npz")) or Path(spec).expanduser().exists():
        return None
    return spec if re.fullmatch(r"[\w.-]+/[\w.-]+", spec) and not spec.startswith(".") else None


def hub_dataset(spec: str | None) -> str | None:
    found = hub_data.SPEC.fullmatch(spec or "")
    return found["repo"] if found else None


def hub_split(spec: str) -> str | None:
    found = hub_data.SPEC.fullmatch(spec)
    return found["split"] if found else None


def public_name(text: str) -> str:
    """A data or model location as it may be published: Hub ids as they are, a local path by its last part."""
    if text.startswith("hf://") or hub_data.SPEC.fullmatch(text):
        return text
    if found := _HELD_OUT.fullmatch(text):
        return f"{found['fraction']} of every class of the training data (seed {found['seed']})"
    return PurePath(text).name or text


def md(text: object) -> str:
    """Text from data, shown literally in Markdown (and in a table cell): on one line, HTML's & < > as entities,
    Markdown's punctuation escaped."""
    return _MARKDOWN.sub(r"\\\1", html.escape(visible(str(text)), quote=False))


def code(text: str) -> str:
    """Text from data as inline code (escaped text when it holds a backtick, which would end the span)."""
    return md(text) if "`" in text else f"`{visible(text)}`"


# ----------------------------------------------------------------------------------------------------------
# The text


def body(card: CardInput) -> str:
    ckpt, run = card.ckpt, card.run
    name = card.repo_id.split("/")[1]
    cfg = ckpt.config
    what = (f"A BiT (Big Transfer, ResNetV2 with GroupNorm and weight standardisation) image classifier: "
            f"{len(cfg.depths)} stages {list(cfg.depths)}, {cfg.num_features} features, {cfg.num_classes} classes.")  # fmt: skip
    origin = (
        f"Fine-tuned with bitcli (`bit finetune`) from {start_model(run.plan)}."
        if run is not None
        else f"Published with bitcli `bit push` from {md(public_name(card.src))}."
    )
    sections = [f"# {md(name)}", f"{what}\n{origin}", usage(card)]
    if run is not None:
        sections += [plan_section(run.plan), data_section(run), metrics_section(run)]
        sections += [f"![{PICTURE_TITLES[name]}]({name})" for name in run.pictures]
    else:
        sections.append(classes_section(ckpt.labels))
    sections += [preprocessing_section(ckpt), files_section(card)]
    return "\n\n".join(sections) + "\n"


def start_model(plan: dict[str, Any]) -> str:
    spec = str(plan["model"])
    if plan.get("random_init"):
        return f"random weights (architecture {code(public_name(spec))})"
    base = base_model(plan)
    named = f"[{md(base)}](https://huggingface.co/{base})" if base else code(public_name(spec))
    return named + (" (head only: the backbone is the start model's, unchanged)" if plan.get("head_only") else "")


def usage(card: CardInput) -> str:
    repo = card.repo_id
    lines = [
        "## Use",
        "",
        "With transformers (no bitcli needed):",
        "",
        "```python",
        "from transformers import pipeline",
        "",
        f'classifier = pipeline("image-classification", model="{repo}")',
        'print(classifier("photo.jpg", top_k=5))',
        "```",
        "",
        f"With bitcli: `bit predict photo.jpg --model {repo}`.",
    ]
    if "model.onnx" in card.files:
        lines += ["", "`model.onnx` is the same model for onnxruntime (input: a float32 NCHW batch preprocessed as below; "
                      "output: logits). `bit predict photo.jpg --model model.onnx` runs it with its preprocessing."]  # fmt: skip
    return "\n".join(lines)


def card_train_transform(plan: dict[str, Any]) -> str:
    if plan.get("cache_features"):
        return "features of the eval transform, no crop or flip (cached)"
    mirrored = " and flip" if hyperrule.mirrors(plan) else ", no flip"
    return f"resize to {plan['resize']} px, random crop {plan['crop']} px{mirrored}"


def plan_section(plan: dict[str, Any]) -> str:
    """The BiT-HyperRule's choices as the run made them, with where each came from."""
    why = plan.get("why") or {}
    shots = plan.get("shots")
    rows = [
        ("Start model", start_model(plan)),
        ("Steps", f"{plan['steps']} (schedule boundaries {', '.join(map(str, plan['boundaries']))})"),
        ("Learning rate", f"{plan['lr']:g}, momentum {plan['momentum']:g}: linear warm-up, then ÷10 at each boundary"),
        ("Batch size", str(plan["batch_size"])),
        (
            "Resolution",
            f"train: {card_train_transform(plan)}; eval: resize to {plan['crop']} x {plan['crop']} px",
        ),
        ("MixUp", "off" if plan.get("mixup") in (None, 0) else f"alpha {plan['mixup']:g}"),
        ("Few-shot", f"{shots} examples per class" if shots else "all training examples"),
        ("Seed", str(plan["seed"])),
    ]
    lines = ["## Training plan (BiT-HyperRule)", "", "| | |", "| --- | --- |"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    if why:
        lines += ["", "Where the automatic values came from:", ""]
        lines += [f"- {md(key)}: {md(reason)}" for key, reason in why.items()]
    return "\n".join(lines)


def data_section(run: RunRecord) -> str:
    plan = run.plan
    validation = plan.get("validation")
    skipped = len(plan.get("skipped") or ())
    lines = [
        "## Data",
        "",
        f"- training: {plan['train_examples']} images from {md(public_name(plan['data']))}"
        + (f" ({skipped} left out: they do not decode)" if skipped else ""),
        f"- validation: {plan['val_examples']} images from {md(public_name(validation))}"
        if validation
        else "- validation: none",
        f"- fingerprint of the training data: {code(str(plan['train_fingerprint']))}",
        f"- {len(plan['classes'])} classes, in the model's order: "
        + ", ".join(f"{i}: {md(name)}" for i, name in enumerate(plan["classes"])),
    ]
    return "\n".join(lines)


def metrics_section(run: RunRecord) -> str:
    val = run.validation
    if val is None:
        return "## Validation\n\nThe run had no validation set: no metrics."
    number = _number
    lines = [
        "## Validation",
        "",
        f"On {val['count']} validation images, after step {int(val['step']) + 1} of {run.plan['steps']}:",
        "",
        "| metric | value |",
        "| --- | --- |",
        f"| top-1 accuracy | {number(val.get('top1'))} |",
        f"| top-5 accuracy | {number(val.get('top5'))} |",
        f"| macro F1 | {number(val.get('macro_f1'))} |",
        f"| loss | {number(val.get('loss'))} |",
        "",
        "| class | accuracy | precision | recall | F1 |",
        "| --- | --- | --- | --- | --- |",
    ]
    for label in val["labels"]:
        cells = [number((val.get(key) or {}).get(label)) for key in ("per_class", "precision", "recall", "f1")]
        lines.append(f"| {md(label)} | {' | '.join(cells)} |")
    return "\n".join(lines)


def _number(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and math.isfinite(value) else "n/a"


def classes_section(labels: list[str]) -> str:
    return f"## Classes\n\n{len(labels)} classes, in the model's order: " + ", ".join(
        f"{i}: {md(name)}" for i, name in enumerate(labels)
    )


def preprocessing_section(ckpt: Checkpoint) -> str:
    pre = ckpt.preprocess
    if isinstance(pre.resize, int):
        resize = f"resize the shorter side to {pre.resize} px ({pre.interpolation})"
    elif pre.resize is not None:
        resize = f"resize to {pre.resize[0]} x {pre.resize[1]} px ({pre.interpolation}, not keeping the aspect ratio)"
    else:
        resize = "no resize"
    crop = f"centre-crop {pre.crop[0]} x {pre.crop[1]} px" if pre.crop else "no crop"
    return (
        "## Preprocessing\n\n"
        f"RGB; {resize}; {crop}; scale to [0, 1]; normalise with mean {list(pre.mean)} and std {list(pre.std)} "
        "(`preprocessor_config.json`, which transformers' BitImageProcessor reads)."
    )


def files_section(card: CardInput) -> str:
    license_line = f"License: {md(card.license)}." if card.license else "License: not stated by the publisher."
    return "## Files\n\n" + "\n".join(f"- `{name}`" for name in ("README.md", *card.files)) + f"\n\n{license_line}"
