"""Every flag and argument of the `bit` commands as a typed alias (Annotated with its Typer option), so that a
command in bitcli.cli declares each option in one line. Values are parsed and checked here while the command line
is read (bitcli.options' parsers): a bad one exits 2 before a command module, or torch, is imported.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from bitcli.errors import UsageError
from bitcli.hyperrule import Resolution
from bitcli.options import (
    Balance,
    ConvertFormat,
    DType,
    EmbedFormat,
    EvalFormat,
    KeepBest,
    OptionError,
    Precision,
    PredictFormat,
    Quantize,
    Tta,
    parse_auto_float,
    parse_auto_int,
    parse_device,
    parse_dst_path,
    parse_file_path,
    parse_keep_best,
    parse_megabytes,
    parse_min_score,
    parse_png_path,
    parse_positive,
    parse_resolution,
    parse_val_split,
)
from bitcli.tool_options import FailRule, parse_fail_rule, parse_threshold

T = TypeVar("T")


def _parser(flag: str, parse: Callable[[str], T]) -> Callable[[str], T]:
    """A flag's value parser: a value `parse` refuses is one `Error: FLAG VALUE: how to fix it` line, exit 2,
    while the command line is read (the command's module and torch are never imported)."""

    def parser(value: str) -> T:
        try:
            return parse(value)
        except OptionError as exc:
            raise UsageError(f"{flag} {exc}") from None

    return parser


def _auto(help: str, flag: str, parse: Callable[[str], object], metavar: str) -> typer.models.OptionInfo:
    """An `auto|VALUE` option: None (the default) means auto, decided by the command."""
    return typer.Option(flag, parser=_parser(flag, parse), metavar=metavar, show_default="auto", help=help)


def _auto_int(minimum: int) -> Callable[[str], int | None]:
    return lambda v: parse_auto_int(v, minimum)


# ----------------------------------------------------------------------------------------------------------
# Shared by several commands

MODEL_HELP = (
    "Hub repo id (google/bit-50, timm/resnetv2_50x1_bit.goog_in21k_ft_in1k), published name (BiT-M-R50x1), "
    "or a local .safetensors/.npz/.bin file or model folder"
)
ModelOpt = Annotated[str, typer.Option("--model", "-m", help=MODEL_HELP + ", or a .onnx file from bit convert.")]
EmbedModelOpt = Annotated[str, typer.Option("--model", "-m", help=MODEL_HELP + ".")]  # an .onnx gives logits only
BatchOpt = Annotated[
    int, typer.Option("--batch-size", "-b", min=1, help="Images per forward pass: more is faster, up to memory.")
]
RevisionOpt = Annotated[str | None, typer.Option("--revision", help="Hub branch, tag or commit.")]
DeviceOpt = Annotated[
    str,
    typer.Option("--device", parser=_parser("--device", parse_device), metavar="<auto|cpu|cuda|cuda:N|mps>",
                 help="Where the model runs; auto: a GPU if there is one."),
]  # fmt: skip
PrecisionOpt = Annotated[
    Precision, typer.Option("--precision", case_sensitive=False, help="auto: fp32 on CPU, bf16/fp16 on GPU.")
]
ImageColumnOpt = Annotated[
    str | None,
    typer.Option(
        "--image-column", help="A data set's image column (default: its Image feature; a label file's: path)."
    ),
]
LabelColumnOpt = Annotated[
    str | None,
    typer.Option("--label-column", help="A data set's label column (default: its ClassLabel, else 'label')."),
]
WorkersOpt = Annotated[
    int,
    typer.Option(
        "--workers", min=0, help="Image-decoding threads (0: decode in the main thread); results do not depend on it."
    ),
]
TtaOpt = Annotated[
    Tta | None,
    typer.Option("--tta", case_sensitive=False, show_default=False,
                 help="Test-time augmentation: flip = the image and its mirror image, scores averaged (2x the time)."),
]  # fmt: skip
EmbedTtaOpt = Annotated[
    Tta | None,
    typer.Option("--tta", case_sensitive=False, show_default=False,
                 help="Test-time augmentation: flip = the mean of the image's and its mirror image's features."),
]  # fmt: skip

# ----------------------------------------------------------------------------------------------------------
# predict and embed

ImagesArg = Annotated[
    list[str],
    typer.Argument(
        help="Image files, folders, glob patterns or http(s) URLs; - reads paths from stdin, one per line.",
        metavar="IMAGES",
        show_default=False,
    ),
]
RecursiveOpt = Annotated[bool, typer.Option("--recursive", "-r", help="Descend into sub-folders.")]
TopKOpt = Annotated[int, typer.Option("--top-k", "-k", min=1, help="Labels to report per image.")]
MinScoreOpt = Annotated[
    float | None,
    typer.Option("--min-score", parser=_parser("--min-score", parse_min_score), metavar="P", show_default=False,
                 help="An image whose top score is below P (0-1) gets the label unknown (null in JSON), top-k kept."),
]  # fmt: skip
PredictFormatOpt = Annotated[
    PredictFormat | None,
    typer.Option("--format", "-f", case_sensitive=False, show_default=False,
                 help="Default: from --output's suffix (.json, .jsonl, .csv), else table."),
]  # fmt: skip
PredictOutputOpt = Annotated[
    Path | None,
    typer.Option("--output", "-o", parser=_parser("--output", parse_file_path), help="Write here instead of stdout."),
]
EmbedOutputOpt = Annotated[
    Path | None,
    typer.Option("--output", "-o", parser=_parser("--output", parse_file_path),
                 help="FILE.safetensors, FILE.npy (paths in FILE.paths.txt) or FILE.jsonl."),
]  # fmt: skip
EmbedFormatOpt = Annotated[
    EmbedFormat | None,
    typer.Option("--format", "-f", case_sensitive=False, show_default=False,
                 help="Default: from --output's suffix; -f jsonl without --output writes to stdout."),
]  # fmt: skip
NormalizeOpt = Annotated[bool, typer.Option("--normalize", help="L2-normalise every vector (unit length).")]
MaxDownloadOpt = Annotated[
    float,
    typer.Option("--max-download-mb", parser=_parser("--max-download-mb", parse_megabytes), metavar="MB",
                 help="Size cap of an image given as an http(s) URL (fetched with timeouts, at most 5 redirects)."),
]  # fmt: skip

# ----------------------------------------------------------------------------------------------------------
# explain

ExplainOutputOpt = Annotated[
    Path,
    typer.Option("--output", "-o", metavar="DIR", show_default=False,
                 help="Folder for the overlays (PNG), explain.jsonl and maps.safetensors: a new or empty folder, "
                 "or an earlier output of bit explain."),
]  # fmt: skip
TargetOpt = Annotated[
    str | None,
    typer.Option("--target", "-t", metavar="LABEL",
                 help="Explain this class in every image (a label, its first name, or a class index); "
                 "default: each image's predicted class."),
]  # fmt: skip

# ----------------------------------------------------------------------------------------------------------
# convert

SrcArg = Annotated[
    str,
    typer.Argument(
        metavar="SRC", help="Google .npz, transformers folder, timm folder/file, bitcli .safetensors, or a model spec."
    ),
]
DstArg = Annotated[
    Path,
    typer.Argument(metavar="DST", parser=_parser("DST", parse_dst_path),
                   help="A .safetensors file (bitcli), a .onnx file, or a folder (hf/timm)."),
]  # fmt: skip
ConvertFormatOpt = Annotated[
    ConvertFormat | None,
    typer.Option("--format", case_sensitive=False, help="Default: bitcli for *.safetensors, onnx for *.onnx, else hf."),
]
LabelsOpt = Annotated[Path | None, typer.Option("--labels", help="Text file of class names, one per line.")]
DTypeOpt = Annotated[
    DType, typer.Option("--dtype", case_sensitive=False, help="The written weights' type (ONNX: its arithmetic too).")
]
ConvertOverwriteOpt = Annotated[
    bool,
    typer.Option("--overwrite", help="Replace a DST file that bitcli wrote, or the model files of a DST folder "
                 "(any other file, or a folder holding other files, is refused)."),
]  # fmt: skip
OpsetOpt = Annotated[int | None, typer.Option("--opset", min=18, show_default="18", help="ONNX: the opset to write.")]
QuantizeOpt = Annotated[
    Quantize | None,
    typer.Option("--quantize", case_sensitive=False, help="ONNX: static int8 quantisation (needs --calibrate)."),
]
CalibrateOpt = Annotated[
    Path | None,
    typer.Option("--calibrate", help="ONNX int8: folder of images to calibrate on (and to measure agreement on)."),
]
MinAgreementOpt = Annotated[
    float,
    typer.Option("--min-agreement", help="ONNX int8: least top-1 agreement with float32 on the calibration images."),
]

# ----------------------------------------------------------------------------------------------------------
# finetune

FinetuneDataArg = Annotated[
    str,
    typer.Argument(metavar="DATA", show_default=False,
                   help="Image folder (one sub-folder per class, or train/ + val/ splits), CSV/JSONL "
                   "label file, parquet file or folder, save_to_disk folder, or hf://datasets/OWNER/NAME[@REV][:SPLIT]."),
]  # fmt: skip
StartModelOpt = Annotated[
    str,
    typer.Option("--model", "-m", help="Model spec to start from (as for predict); with --random-init "
                 "an architecture: tiny, small, R50x1 ... R152x4, or a JSON object of BitConfig fields."),
]  # fmt: skip
RunOutputOpt = Annotated[
    Path, typer.Option("--output", "-o", help="Run folder: model, metrics.jsonl, summary.json, checkpoint.")
]
ShotsOpt = Annotated[
    int | None,
    typer.Option("--shots", min=1, help="Train on K images per class (seeded); a smaller class is an error."),
]
ValOpt = Annotated[
    str | None,
    typer.Option(
        "--val", metavar="DATA", help="Validation data, any DATA kind (default: DATA's val|valid|validation split)."
    ),
]
ValSplitOpt = Annotated[
    float | None,
    typer.Option("--val-split", parser=_parser("--val-split", parse_val_split), metavar="F",
                 help="Hold out this fraction (0 < F < 1) of every class for validation."),
]  # fmt: skip
StepsOpt = Annotated[
    int | None,
    _auto("auto (HyperRule: 500/10k/20k by data size) or N (boundaries scaled).", "--steps", _auto_int(1), "<auto|N>"),
]
LrOpt = Annotated[float, typer.Option("--lr", help="Base learning rate (linear warm-up, then /10 steps).")]
GlobalBatchOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Global batch per optimizer step.")]
BatchSplitOpt = Annotated[
    int | None,
    _auto("Micro-batches per step (gradient accumulation): auto or N.", "--batch-split", _auto_int(1), "<auto|N>"),
]
ResolutionOpt = Annotated[
    Resolution | None,
    _auto("auto (HyperRule: 128 or 480), CROP, or RESIZE:CROP.", "--resolution", parse_resolution,
          "<auto|CROP|RESIZE:CROP>"),
]  # fmt: skip
MixupOpt = Annotated[
    float | None,
    _auto("auto (HyperRule: 0.1 from 20k images) or ALPHA; 0 disables.", "--mixup", parse_auto_float, "<auto|ALPHA>"),
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seeds few-shot sampling, data order, augmentation, random init.")]
EvalEveryOpt = Annotated[
    int | None,
    _auto("Validate every N steps (auto: 5 times per run; 0: only at the end).", "--eval-every", _auto_int(0),
          "<auto|N>"),
]  # fmt: skip
SaveEveryOpt = Annotated[
    int | None,
    _auto("Write the resumable checkpoint every N steps (auto: 10 times per run).", "--save-every", _auto_int(1),
          "<auto|N>"),
]  # fmt: skip
ResumeOpt = Annotated[
    bool, typer.Option("--resume", help="Continue the unfinished run in --output from its checkpoint.")
]
RunOverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace a previous run in --output.")]
RandomInitOpt = Annotated[bool, typer.Option("--random-init", help="Start --model's architecture from random weights.")]
HeadOnlyOpt = Annotated[
    bool, typer.Option("--head-only", help="Train only the new head; the backbone stays frozen (a linear probe).")
]
ClassWeightsOpt = Annotated[
    Balance | None,
    typer.Option("--class-weights", case_sensitive=False, show_default=False,
                 help="balanced: weight each class's loss by n / (classes x its images), as scikit-learn's."),
]  # fmt: skip
SamplerOpt = Annotated[
    Balance | None,
    typer.Option("--sampler", case_sensitive=False, show_default=False,
                 help="balanced: each step draws classes uniformly, then an image of the class (seeded)."),
]  # fmt: skip
KeepBestOpt = Annotated[
    KeepBest | None,
    typer.Option("--keep-best", parser=_parser("--keep-best", parse_keep_best), show_default=False, metavar="METRIC",
                 help="Also keep the best validated model by METRIC in DIR/best: top1, macro_f1, balanced_accuracy, loss; "
                 "multi-label data: mAP, macro_f1, loss."),
]  # fmt: skip
NoCalibrateOpt = Annotated[
    bool,
    typer.Option("--no-calibrate",
                 help="Do not fit the temperature on the validation set (scores stay the softmax of the logits)."),
]  # fmt: skip
NoFlipOpt = Annotated[
    bool,
    typer.Option("--no-flip", help="Never mirror the training crops (the HyperRule mirrors half of them): for images "
                 "whose mirror image is something else (text, digits, left and right), or features that must tell "
                 "an image from its mirror image."),
]  # fmt: skip
CacheFeaturesOpt = Annotated[
    bool,
    typer.Option("--cache-features", help="With --head-only: embed each training image once (eval transform, "
                 "kept in $BITCLI_CACHE as bit audit keeps them) and train the head on those features, without "
                 "augmentation or MixUp (the classic linear probe)."),
]  # fmt: skip
FinetuneReportOpt = Annotated[
    bool,
    typer.Option("--report", help="After the last validation, write its HTML report (error gallery with Grad-CAM) "
                 "into DIR/report (see bit eval --report)."),
]  # fmt: skip
TensorboardOpt = Annotated[
    bool,
    typer.Option(
        "--tensorboard", help="Also write TensorBoard event files to DIR/tensorboard (needs bitcli[tensorboard])."
    ),
]

# ----------------------------------------------------------------------------------------------------------
# eval and report

EvalDataArg = Annotated[
    str,
    typer.Argument(metavar="DATA", show_default=False,
                   help="Image folder with one sub-folder per class (named by a label of the model, its first name, or its index), "
                   "or any DATA of finetune: label file, parquet, save_to_disk folder, hf://datasets/OWNER/NAME[@REV][:SPLIT]."),
]  # fmt: skip
EvalFormatOpt = Annotated[
    EvalFormat,
    typer.Option("--format", "-f", case_sensitive=False,
                 help="table: for people; json: every metric (per class too) and the whole confusion matrix."),
]  # fmt: skip
PlotOpt = Annotated[
    Path | None,
    typer.Option("--plot", parser=_parser("--plot", parse_png_path), metavar="FILE.png",
                 help="Also draw the confusion matrix, row-normalised, as a PNG, and the reliability diagram "
                 "beside it as FILE-reliability.png (needs bitcli[plots])."),
]  # fmt: skip
ReportDirOpt = Annotated[
    Path | None,
    typer.Option("--report", metavar="DIR",
                 help="Also write an HTML report into DIR: metrics, a clickable confusion matrix, the misclassified "
                 "images by loss with Grad-CAM, errors.csv and predictions.csv (a new or empty DIR, or an earlier report's)."),
]  # fmt: skip
RunDirArg = Annotated[
    Path,
    typer.Argument(metavar="RUN_DIR", show_default=False,
                   help="A bit finetune run folder (its --output): finished, running or interrupted."),
]  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# audit

AuditDataArg = Annotated[
    str,
    typer.Argument(metavar="DATA", show_default=False,
                   help="Any DATA of finetune: class folder (or train/ beside val/ and test/), label file, parquet, "
                   "save_to_disk folder, hf://datasets/OWNER/NAME[@REV][:SPLIT]."),
]  # fmt: skip
AuditTestOpt = Annotated[
    str | None,
    typer.Option("--test", metavar="DATA", help="Test data, any DATA kind (default: DATA's test split, if any)."),
]
AuditOutputOpt = Annotated[
    Path | None,
    typer.Option("--output", "-o", metavar="DIR",
                 help="Write audit.json, a CSV per finding and index.html into DIR (a new or empty DIR, or an "
                 "earlier audit's); without it, only the summary table."),
]  # fmt: skip
ThresholdOpt = Annotated[
    float,
    typer.Option("--threshold", parser=_parser("--threshold", parse_threshold), metavar="COSINE",
                 help="Near-duplicate threshold: cosine similarity of the embeddings (at or above); higher reports "
                 "fewer pairs, and searches large sets faster (docs/audit.md)."),
]  # fmt: skip
ExactSearchOpt = Annotated[
    bool,
    typer.Option("--exact-search", help="Search near-duplicates on the full embeddings at any size (slower); by "
                 "default a large set's candidates come from a low-dimensional sketch first (docs/audit.md)."),
]  # fmt: skip
MinImagesOpt = Annotated[
    int, typer.Option("--min-images", min=1, help="Report a class with fewer images than this in a split.")
]
FailOnOpt = Annotated[
    list[FailRule] | None,
    typer.Option("--fail-on", parser=_parser("--fail-on", parse_fail_rule), metavar="NAME[>N]",
                 help="Exit 1 when the count of NAME is above N (default 0); repeat for several rules. NAME: "
                 "duplicates, exact, near, leaks, conflicts, label-issues, undecodable, small-classes, off-size."),
]  # fmt: skip
WriteCleanOpt = Annotated[
    Path | None,
    typer.Option("--write-clean", metavar="FILE.csv|FILE.jsonl",
                 help="Write a label file (path,label[,split]) of the images no finding drops (undecodable files, dropped copies, likely label errors), in the data's order; "
                 "multi-label data: FILE.jsonl. The data is never touched."),
]  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# push

PushSrcArg = Annotated[
    str,
    typer.Argument(metavar="SRC", show_default=False,
                   help="A bit finetune run folder (its --output), or any model spec (file, folder, Hub id, published name)."),
]  # fmt: skip
RepoArg = Annotated[
    str, typer.Argument(metavar="OWNER/NAME", show_default=False, help="The Hub repo to push to (created if missing).")
]
PrivateOpt = Annotated[
    bool,
    typer.Option(
        "--private", help="Create the repo private; an existing public repo is refused, never made public by mistake."
    ),
]
PushRevisionOpt = Annotated[
    str | None,
    typer.Option("--revision", metavar="BRANCH", show_default="main",
                 help="The branch to commit to (created from main if missing)."),
]  # fmt: skip
CommitMessageOpt = Annotated[
    str | None,
    typer.Option("--commit-message", show_default="Upload NAME with bit push", help="The commit's message."),
]
PushOnnxOpt = Annotated[
    bool, typer.Option("--onnx", help="Also upload model.onnx, the proven export of bit convert (needs bitcli[onnx]).")
]
DryRunOpt = Annotated[
    bool, typer.Option("--dry-run", help="Print the files and the model card; upload nothing (no token needed).")
]
LicenseOpt = Annotated[
    str | None,
    typer.Option("--license", show_default="none stated",
                 help="The model's license id for the card (apache-2.0, mit, cc-by-4.0, other, ...)."),
]  # fmt: skip

# ----------------------------------------------------------------------------------------------------------
# serve

ServeModelArg = Annotated[
    str,
    typer.Argument(metavar="MODEL", show_default=False, help=MODEL_HELP + ", or a .onnx file from bit convert."),
]
HostOpt = Annotated[
    str,
    typer.Option("--host", help="Address to listen on; the default answers this machine only (another address "
                 "lets other machines in: there is no authentication)."),
]  # fmt: skip
PortOpt = Annotated[int, typer.Option("--port", min=0, max=65535, help="Port to listen on; 0: a free one (printed).")]
MaxBatchOpt = Annotated[
    int, typer.Option("--max-batch", min=1, help="Most images per forward pass, shared by concurrent requests.")
]
MaxWaitOpt = Annotated[
    float,
    typer.Option("--max-wait-ms", min=0, help="How long the first image of a batch waits for others to join it."),
]
QueueOpt = Annotated[
    int,
    typer.Option("--queue", min=1, help="Most images admitted and not yet answered; a request beyond it gets 429."),
]
MaxBodyOpt = Annotated[
    float,
    typer.Option("--max-body-mb", parser=_parser("--max-body-mb", parse_megabytes), metavar="MB",
                 help="Largest request body; a larger one gets 413."),
]  # fmt: skip
TimeoutOpt = Annotated[
    float,
    typer.Option("--timeout-s", parser=_parser("--timeout-s", parse_positive), metavar="SECONDS",
                 help="A request not answered within this gets 408 (its body was still arriving) or 504."),
]  # fmt: skip
MaxConnectionsOpt = Annotated[
    int, typer.Option("--max-connections", min=1, help="Most open connections; more get 503.")
]
HeaderTimeoutOpt = Annotated[
    float,
    typer.Option("--header-timeout-s", parser=_parser("--header-timeout-s", parse_positive), metavar="SECONDS",
                 help="A connection whose request line and headers are not in within this (of its opening or "
                      "its last answer) is closed."),
]  # fmt: skip
DecodeThreadsOpt = Annotated[int, typer.Option("--workers", min=1, help="Image-decoding threads.")]
