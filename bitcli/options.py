"""What each command was asked to do, as typed values: choices as Enums, `auto|N` flags parsed.

This module imports neither torch nor any command module, so the CLI checks every flag value (exit 2, with
the allowed values in `--help`) before anything heavy is imported.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TypeVar

from bitcli.architectures import DEFAULT_MODEL
from bitcli.errors import BitError, UsageError
from bitcli.hyperrule import BASE_LR, BATCH_SIZE, Resolution, resolution_for_crop
from bitcli.ui import display, mb_to_bytes
from bitcli.writes import names_a_folder

# Image-decoding threads for every command (0: decode in the calling thread); results never depend on it.
DEFAULT_WORKERS = min(4, os.cpu_count() or 1)


class Choice(str, Enum):
    """A flag's allowed values, listed in --help and matched case-insensitively (`-f JSON`). A choice is a str:
    it compares equal to its lower-case value, and `str(choice)` is that value."""

    def __str__(self) -> str:
        return self.value


class Precision(Choice):
    """--precision (bitcli.runtime.resolve_precision picks the dtype each means on a device)."""

    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class PredictFormat(Choice):
    table = "table"
    json = "json"
    jsonl = "jsonl"
    csv = "csv"


class EvalFormat(Choice):
    table = "table"
    json = "json"


class EmbedFormat(Choice):
    safetensors = "safetensors"
    npy = "npy"
    jsonl = "jsonl"


class ConvertFormat(Choice):
    bitcli = "bitcli"
    hf = "hf"
    timm = "timm"
    onnx = "onnx"


class Quantize(Choice):
    int8 = "int8"


class Tta(Choice):
    """--tta: test-time augmentation (bitcli.scores.views)."""

    flip = "flip"


class Balance(Choice):
    """--class-weights and --sampler: their one non-default value."""

    balanced = "balanced"


class KeepBest(Choice):
    """--keep-best METRIC (bitcli.metrics.SELECTION_METRICS; loss: lower is better)."""

    top1 = "top1"
    macro_f1 = "macro_f1"
    balanced_accuracy = "balanced_accuracy"
    loss = "loss"
    mAP = "mAP"  # multi-label runs only (top1 and balanced_accuracy: single-label only)


class DType(Choice):
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


C = TypeVar("C", bound=Choice)


class OptionError(ValueError):
    """A flag value that does not parse; the CLI turns it into a usage error (exit 2) naming the flag."""


# What a file name's suffix says it holds (matched in any case): the one home of suffix -> output format, for
# predict's and embed's --output and convert's DST. A suffix that is not listed names no format.
PREDICT_SUFFIXES = {
    ".json": PredictFormat.json,
    ".jsonl": PredictFormat.jsonl,
    ".ndjson": PredictFormat.jsonl,
    ".csv": PredictFormat.csv,
}
EMBED_SUFFIXES = {
    ".safetensors": EmbedFormat.safetensors,
    ".npy": EmbedFormat.npy,
    ".jsonl": EmbedFormat.jsonl,
    ".ndjson": EmbedFormat.jsonl,
}
CONVERT_SUFFIXES = {".safetensors": ConvertFormat.bitcli, ".onnx": ConvertFormat.onnx}  # any other DST: hf


def suffix_format(path: Path | None, suffixes: dict[str, C]) -> C | None:
    """The format `path`'s suffix names in `suffixes`, or None (no path, or a suffix not listed)."""
    return suffixes.get(path.suffix.lower()) if path is not None else None


def _refuse_contradiction(fmt: Choice | None, output: Path | None, inferred: Choice | None) -> None:
    """An explicit --format that contradicts the suffix: the file would not hold what its name says."""
    if fmt is not None and inferred is not None and output is not None and inferred != fmt:  # (inferred: output's)
        raise UsageError(
            f"--format {fmt} contradicts --output {display(output)} (a {output.suffix} file holds {inferred}); "
            f"drop --format or give the file a name that matches"
        )


def predict_format(fmt: PredictFormat | None, output: Path | None) -> PredictFormat:
    """--format if given, else the one --output's suffix names (table for any other suffix or for stdout).
    An explicit --format that contradicts the suffix is refused."""
    inferred = suffix_format(output, PREDICT_SUFFIXES)
    _refuse_contradiction(fmt, output, inferred)
    return fmt if fmt is not None else inferred or PredictFormat.table


def embed_format(fmt: EmbedFormat | None, output: Path | None) -> EmbedFormat:
    """--format if given, else the one --output's suffix names. Embeddings are too long to read on a terminal:
    stdout takes them only when asked for (-f jsonl), and the binary formats only go to a file."""
    if output is None:
        if fmt is None:
            raise UsageError(
                "give --output FILE (.safetensors, .npy or .jsonl), or -f jsonl to write JSON lines to stdout"
            )
        if fmt != EmbedFormat.jsonl:
            raise UsageError(f"--format {fmt} is binary; give --output FILE (only jsonl goes to stdout)")
        return fmt
    inferred = suffix_format(output, EMBED_SUFFIXES)
    _refuse_contradiction(fmt, output, inferred)
    chosen = fmt if fmt is not None else inferred
    if chosen is None:
        raise UsageError(f"--output {display(output)}: name the file *.safetensors, *.npy or *.jsonl, or give --format")
    return chosen


def convert_format(fmt: ConvertFormat | None, dst: Path) -> ConvertFormat:
    """--format if given, else bitcli for a *.safetensors DST, onnx for *.onnx and hf (a folder) for anything else."""
    return fmt if fmt is not None else suffix_format(dst, CONVERT_SUFFIXES) or ConvertFormat.hf


# --device's spellings (the one home of them: bitcli.runtime only decides whether this machine has the device).
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def parse_device(value: str) -> str:
    """The device as spelled in lower case; whether this machine has it is checked when the command runs."""
    spec = value.strip().lower()
    if not DEVICE_PATTERN.fullmatch(spec):
        raise OptionError(f"{value!r}: use auto, cpu, cuda, cuda:N or mps")
    return spec


def device_parts(value: str) -> tuple[str, int | None]:
    """A --device value -> (auto, cpu, cuda or mps; the N of cuda:N, else None). OptionError as parse_device."""
    kind, _, index = parse_device(value).partition(":")
    return kind, int(index) if index else None


def parse_auto_int(value: str, minimum: int) -> int | None:
    """`auto` -> None (the command decides), else a whole number >= minimum."""
    if value.strip().lower() == "auto":
        return None
    try:
        n = int(value)
    except ValueError:
        raise OptionError(f"{value!r}: use auto or a whole number") from None
    if n < minimum:
        raise OptionError(f"{value}: must be at least {minimum}")
    return n


def parse_auto_float(value: str) -> float | None:
    """`auto` -> None, else a finite number >= 0."""
    if value.strip().lower() == "auto":
        return None
    try:
        x = float(value)
    except ValueError:
        raise OptionError(f"{value!r}: use auto or a number") from None
    if not math.isfinite(x) or x < 0:
        raise OptionError(f"{value}: must be a number >= 0")
    return x


def parse_file_path(value: str) -> Path:
    """An output file's name (--output): not one that names a folder (`out/`, see writes.names_a_folder)."""
    reason = names_a_folder(value)
    if reason is not None:
        raise OptionError(f"{display(value)}: {reason}")
    return Path(value)


def parse_dst_path(value: str) -> Path:
    """convert's DST: a folder (hf, timm) may end in a separator; a file that the suffix names may not."""
    if suffix_format(Path(value), CONVERT_SUFFIXES) is not None:
        return parse_file_path(value)
    return Path(value)


def parse_positive(value: str) -> float:
    """A finite number > 0 (sizes in MB, timeouts in seconds)."""
    try:
        x = float(value)
    except ValueError:
        raise OptionError(f"{value!r}: use a number, e.g. 50 or 0.5") from None
    if not math.isfinite(x) or x <= 0:
        raise OptionError(f"{value}: must be a number > 0")
    return x


def parse_megabytes(value: str) -> float:
    """A --max-*-mb size: a number > 0 that is at least one byte (a smaller cap would refuse everything and
    print as "0 MB")."""
    x = parse_positive(value)
    if mb_to_bytes(x) < 1:
        raise OptionError(f"{value}: must be at least 0.000001 (one byte)")
    return x


def parse_png_path(value: str) -> Path:
    """A picture's file name: it must end in .png (the only format drawn), so the name says what it holds."""
    path = parse_file_path(value)
    if path.suffix.lower() != ".png":
        raise OptionError(f"{value!r}: the picture is a PNG; give a file name ending in .png")
    return path


def parse_min_score(value: str) -> float:
    """--min-score P: a score between 0 and 1 (both included)."""
    try:
        score = float(value)
    except ValueError:
        raise OptionError(f"{value!r}: use a score between 0 and 1, e.g. 0.5") from None
    if not 0.0 <= score <= 1.0:  # `not`: NaN is refused too
        raise OptionError(f"{value}: use a score between 0 and 1, e.g. 0.5")
    return score


def reliability_path(plot: Path) -> Path:
    """Where `bit eval --plot FILE.png` draws the reliability diagram: FILE-reliability.png beside it."""
    return plot.with_name(plot.stem + "-reliability" + plot.suffix)


def parse_keep_best(value: str) -> KeepBest:
    """--keep-best METRIC in any case (map is mAP); a refusal lists the metrics as the docs spell them."""
    for metric in KeepBest:
        if value.casefold() == metric.value.casefold():
            return metric
    raise OptionError(
        f"{value}: not a metric; use top1, macro_f1, balanced_accuracy or loss (single-label data), mAP, macro_f1 or "
        "loss (multi-label data)"
    )


def parse_val_split(value: str) -> float:
    """--val-split: the fraction of every class held out, strictly between 0 and 1."""
    try:
        fraction = float(value)
    except ValueError:
        raise OptionError(f"{value!r}: use a fraction between 0 and 1, e.g. 0.1") from None
    if not 0.0 < fraction < 1.0:  # `not`: NaN is refused too
        raise OptionError(f"{value}: use a fraction between 0 and 1 (both excluded), e.g. 0.1")
    return fraction


def paths_file(output: Path) -> Path:
    """Where embed writes the paths of FILE.npy: FILE.paths.txt (a name without .npy gets .paths.txt appended)."""
    name = output.name[: -len(".npy")] if output.name.lower().endswith(".npy") else output.name
    return output.with_name(name + ".paths.txt")


# DATA of finetune and eval: a path (class folder, label file, parquet, save_to_disk folder), or a Hub data set
# id kept as typed (a Path would turn hf://datasets/... into hf:/datasets/...).
DataSpec = Path | str
HUB_DATA_PREFIX = "hf://"


def parse_data(value: str) -> DataSpec:
    return value if value.startswith(HUB_DATA_PREFIX) else Path(value)


def parse_resolution(value: str) -> Resolution | None:
    """`auto` -> None; `CROP` -> HyperRule resize for that crop; `RESIZE:CROP` as given (RESIZE >= CROP)."""
    if value.strip().lower() == "auto":
        return None
    try:
        if ":" in value:
            resize, crop = (int(v) for v in value.split(":"))
            if crop < 1 or resize < crop:
                raise ValueError
            return Resolution(resize, crop)
        return resolution_for_crop(int(value))
    except (ValueError, BitError):
        raise OptionError(f"{value!r}: use auto, CROP (e.g. 128) or RESIZE:CROP with RESIZE >= CROP") from None


@dataclass(frozen=True)
class PredictOptions:
    images: list[str]
    model: str = DEFAULT_MODEL
    revision: str | None = None
    top_k: int = 5
    batch_size: int = 16
    device: str = "auto"
    precision: Precision = Precision.auto
    format: PredictFormat = PredictFormat.table  # already reconciled with --output's suffix by the CLI
    output: Path | None = None
    recursive: bool = False
    workers: int = DEFAULT_WORKERS
    tta: Tta | None = None  # test-time augmentation: the mean of the views' scores
    min_score: float | None = None  # a top score below this: the image's label is unknown (null)
    max_download_mb: float = 50.0  # the size cap of an image named by URL (bitcli.urls)


@dataclass(frozen=True)
class EvalOptions:
    data: DataSpec
    model: str = DEFAULT_MODEL
    revision: str | None = None
    format: EvalFormat = EvalFormat.table
    batch_size: int = 32
    device: str = "auto"
    precision: Precision = Precision.auto
    workers: int = DEFAULT_WORKERS
    plot: Path | None = None  # also write the confusion matrix here as a PNG (and reliability_path(plot))
    report: Path | None = None  # also write the HTML report (metrics, confusion, error gallery) into this folder
    image_column: str | None = None  # a data set's image column (None: found from its features)
    label_column: str | None = None  # ... and its label column
    tta: Tta | None = None


@dataclass(frozen=True)
class EmbedOptions:
    images: list[str]
    model: str = DEFAULT_MODEL
    revision: str | None = None
    batch_size: int = 16
    device: str = "auto"
    precision: Precision = Precision.auto
    format: EmbedFormat = EmbedFormat.jsonl  # already reconciled with --output by the CLI (embed_format)
    output: Path | None = None
    normalize: bool = False  # L2-normalise each vector
    recursive: bool = False
    workers: int = DEFAULT_WORKERS
    tta: Tta | None = None  # test-time augmentation: the mean of the views' features
    max_download_mb: float = 50.0  # the size cap of an image named by URL (bitcli.urls)


@dataclass(frozen=True)
class ConvertOptions:
    src: str
    dst: Path
    format: ConvertFormat | None = None  # None: bitcli for *.safetensors, onnx for *.onnx, else hf
    labels: Path | None = None
    dtype: DType = DType.float32
    revision: str | None = None
    overwrite: bool = False
    opset: int | None = None  # ONNX only: None is bitcli.formats.onnx.DEFAULT_OPSET
    quantize: Quantize | None = None  # ONNX only: static int8 quantisation, calibrated on `calibrate`'s images
    calibrate: Path | None = None
    min_agreement: float = 0.99  # int8 top-1 agreement with float32 below which nothing is written

    def __post_init__(self) -> None:
        """The ONNX flags' combinations, refused before anything is read (exit 2)."""
        onnx = convert_format(self.format, self.dst) == ConvertFormat.onnx
        given = [
            flag
            for flag, value in (("--opset", self.opset), ("--quantize", self.quantize), ("--calibrate", self.calibrate))
            if value is not None
        ]
        if given and not onnx:
            raise UsageError(f"{given[0]} applies only to an ONNX export; name DST *.onnx")
        if onnx and self.dtype == DType.bfloat16:
            raise UsageError("--dtype bfloat16: an ONNX export is float32 or float16 (or --quantize int8)")
        if (self.quantize is None) != (self.calibrate is None):
            raise UsageError(
                "--quantize int8 needs --calibrate DIR (images to calibrate on), and --calibrate needs --quantize int8"
            )
        if self.quantize is not None and self.dtype != DType.float32:
            raise UsageError(f"--quantize int8 starts from the float32 export; drop --dtype {self.dtype}")
        if not 0.0 <= self.min_agreement <= 1.0:
            raise UsageError(
                f"--min-agreement {self.min_agreement}: must be between 0 and 1 (a fraction of the calibration images)"
            )


@dataclass(frozen=True)
class FinetuneOptions:
    """The command line as typed, parsed; None means `auto` (the BiT-HyperRule decides in the plan)."""

    data: DataSpec
    model: str
    output: Path
    shots: int | None = None  # examples per class; None: all
    val: DataSpec | None = None  # validation data (default: DATA's validation split: sources.splits names it)
    val_split: float | None = None  # or hold out this fraction of every training class
    steps: int | None = None
    lr: float = BASE_LR
    batch_size: int = BATCH_SIZE  # global, over all processes and micro-batches
    batch_split: int | None = None  # micro-batches per optimizer step (gradient accumulation)
    resolution: Resolution | None = None
    mixup: float | None = None  # 0 turns MixUp off
    seed: int = 0
    device: str = "auto"
    precision: Precision = Precision.auto
    workers: int = DEFAULT_WORKERS  # image-decoding threads; results do not depend on it
    eval_every: int | None = None  # steps between validations; 0: only at the end
    save_every: int | None = None  # steps between resumable checkpoints
    resume: bool = False
    overwrite: bool = False
    random_init: bool = False
    revision: str | None = None
    head_only: bool = False  # train the new head only; the backbone stays the start model's, bit for bit
    cache_features: bool = False  # with head_only: train the head on cached features of the eval transform
    tensorboard: bool = False  # also write TensorBoard event files under DIR/tensorboard
    report: bool = False  # write the final validation's HTML report (error gallery) into DIR/report
    image_column: str | None = None  # a data set's image column (None: found from its features)
    label_column: str | None = None  # ... and its label column
    class_weights: Balance | None = None  # balanced: inverse-frequency weights in the loss
    sampler: Balance | None = None  # balanced: every class equally likely in each step's sample
    keep_best: KeepBest | None = None  # also keep the best validated model in DIR/best/
    calibrate: bool = True  # fit a temperature on the validation set (--no-calibrate: off)
    flip: bool = True  # mirror half the training crops (--no-flip: never)


@dataclass(frozen=True)
class ExplainOptions:
    images: list[str]
    output: Path  # the folder of overlays, explain.jsonl and maps.safetensors (bitcli.pages.folder's rules)
    model: str = DEFAULT_MODEL
    revision: str | None = None
    target: str | None = None  # a label or class index to explain in every image (None: each one's prediction)
    batch_size: int = 16
    device: str = "auto"
    recursive: bool = False
    workers: int = DEFAULT_WORKERS
    max_download_mb: float = 50.0  # the size cap of an image named by URL (bitcli.urls)


@dataclass(frozen=True)
class ReportOptions:
    run: Path  # a `bit finetune` run folder (--output), finished, running or interrupted
