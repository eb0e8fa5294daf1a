"""The `bit` Typer app. Commands import torch and their modules lazily so that `bit --help` stays instant."""

from __future__ import annotations

import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

import bitcli

app = typer.Typer(
    name="bit",
    help="Big Transfer (BiT) image classification: predict, fine-tune, evaluate and convert checkpoints.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain click help: rendering it with rich imports rich's markdown stack and doubles `bit --help`'s start-up.
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class Choice(str, Enum):
    """A flag's allowed values, listed in --help and matched case-insensitively (`-f JSON`); click checks them
    before any command module (or torch) is imported. Commands receive the lower-case `.value`."""


class Precision(Choice):
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


class ConvertFormat(Choice):
    bitcli = "bitcli"
    hf = "hf"
    timm = "timm"


class DType(Choice):
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


def _version(value: bool) -> None:
    if value:
        print(f"bit {bitcli.__version__}")
        raise typer.Exit()


@app.callback()
def _app(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """The options before the command (the app's help is Typer's `help=` above)."""


ModelOpt = Annotated[
    str,
    typer.Option(
        "--model", "-m",
        help="Hub repo id (google/bit-50, timm/resnetv2_50x1_bit.goog_in21k_ft_in1k), published name "
        "(BiT-M-R50x1), or a local .safetensors/.npz/.bin file or model folder.",
    ),
]  # fmt: skip
RevisionOpt = Annotated[str | None, typer.Option("--revision", help="Hub branch, tag or commit.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")]
PrecisionOpt = Annotated[
    Precision, typer.Option("--precision", case_sensitive=False, help="auto: fp32 on CPU, bf16/fp16 on GPU.")
]


@app.command()
def predict(
    images: Annotated[list[str], typer.Argument(help="Image files, folders or glob patterns; - reads paths from stdin, one per line.", metavar="IMAGES", show_default=False)],
    model: ModelOpt = "google/bit-50",
    revision: RevisionOpt = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="Labels to report per image.")] = 5,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1)] = 16,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = Precision.auto,
    fmt: Annotated[
        PredictFormat | None,
        typer.Option("--format", "-f", case_sensitive=False, show_default=False,
                     help="Default: from --output's suffix (.json, .jsonl, .csv), else table."),
    ] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write here instead of stdout.")] = None,
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="Descend into sub-folders.")] = False,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Image-decoding threads.")] = min(4, os.cpu_count() or 1),
) -> None:
    """Classify images: top-k labels with probabilities.

    Exit codes: 0 all classified, 1 some input failed (the rest are still reported), 2 bad flags.
    """
    from bitcli import predict as predict_mod

    code = predict_mod.run(
        images, model, revision, top_k, batch_size, device, precision.value, fmt and fmt.value, output, recursive,
        workers,
    )
    raise typer.Exit(code)


@app.command()
def convert(
    src: Annotated[str, typer.Argument(metavar="SRC", help="Google .npz, transformers folder, timm folder/file, bitcli .safetensors, or a model spec.")],
    dst: Annotated[Path, typer.Argument(metavar="DST", help="A .safetensors file (bitcli) or a folder (hf/timm).")],
    fmt: Annotated[ConvertFormat | None, typer.Option("--format", case_sensitive=False, help="Default: bitcli for *.safetensors, else hf.")] = None,
    labels: Annotated[Path | None, typer.Option("--labels", help="Text file of class names, one per line.")] = None,
    dtype: Annotated[DType, typer.Option("--dtype", case_sensitive=False)] = DType.float32,
    revision: RevisionOpt = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace DST if it exists.")] = False,
) -> None:
    """Convert a checkpoint between Google's .npz, bitcli, transformers and timm layouts."""
    from bitcli import convert as convert_mod

    convert_mod.run(src, dst, fmt and fmt.value, labels, dtype.value, revision, overwrite)


@app.command()
def finetune(
    data: Annotated[Path, typer.Argument(metavar="DATA", help="Image folder: one sub-folder per class, or train/ + val/ splits.", show_default=False)],
    model: Annotated[str, typer.Option("--model", "-m", help="Model spec to start from (as for predict); with --random-init "
                                       "an architecture: tiny, small, R50x1 ... R152x4, or a JSON object of BitConfig fields.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Run folder: model, metrics.jsonl, summary.json, checkpoint.")],
    shots: Annotated[int | None, typer.Option("--shots", min=1, help="Train on K images per class (seeded); a smaller class is an error.")] = None,
    val: Annotated[Path | None, typer.Option("--val", help="Validation image folder (default: DATA/val|valid|validation).")] = None,
    val_split: Annotated[float | None, typer.Option("--val-split", help="Hold out this fraction of every class for validation.")] = None,
    steps: Annotated[str, typer.Option("--steps", help="auto (HyperRule: 500/10k/20k by data size) or N (boundaries scaled).")] = "auto",
    lr: Annotated[float, typer.Option("--lr", help="Base learning rate (linear warm-up, then /10 steps).")] = 0.003,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Global batch per optimizer step.")] = 512,
    batch_split: Annotated[str, typer.Option("--batch-split", help="Micro-batches per step (gradient accumulation): auto or N.")] = "auto",
    resolution: Annotated[str, typer.Option("--resolution", help="auto (HyperRule: 128 or 480), CROP, or RESIZE:CROP.")] = "auto",
    mixup: Annotated[str, typer.Option("--mixup", help="auto (HyperRule: 0.1 from 20k images) or ALPHA; 0 disables.")] = "auto",
    seed: Annotated[int, typer.Option("--seed", help="Seeds few-shot sampling, data order, augmentation, random init.")] = 0,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = Precision.auto,
    workers: Annotated[int, typer.Option("--workers", min=0, help="Image-decoding threads (results do not depend on it).")] = min(4, os.cpu_count() or 1),
    eval_every: Annotated[str, typer.Option("--eval-every", help="Validate every N steps (auto: 5 times per run; 0: only at the end).")] = "auto",
    save_every: Annotated[str, typer.Option("--save-every", help="Write the resumable checkpoint every N steps (auto: 10 times per run).")] = "auto",
    resume: Annotated[bool, typer.Option("--resume", help="Continue the unfinished run in --output from its checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a previous run in --output.")] = False,
    random_init: Annotated[bool, typer.Option("--random-init", help="Start --model's architecture from random weights.")] = False,
    revision: RevisionOpt = None,
) -> None:
    """Fine-tune a BiT model on an image folder with the BiT-HyperRule (resumable; torchrun for several processes)."""
    from bitcli import finetune as finetune_mod

    finetune_mod.run(
        finetune_mod.Options(
            data=data, model=model, output=output, shots=shots, val=val, val_split=val_split, steps=steps, lr=lr,
            batch_size=batch_size, batch_split=batch_split, resolution=resolution, mixup=mixup, seed=seed,
            device=device, precision=precision.value, workers=workers, eval_every=eval_every, save_every=save_every,
            resume=resume, overwrite=overwrite, random_init=random_init, revision=revision,
        )
    )  # fmt: skip


@app.command("eval")
def eval_(
    data: Annotated[Path, typer.Argument(metavar="DATA", help="Image folder with one sub-folder per class (named after the model's labels).", show_default=False)],
    model: ModelOpt = "google/bit-50",
    revision: RevisionOpt = None,
    fmt: Annotated[EvalFormat, typer.Option("--format", "-f", case_sensitive=False)] = EvalFormat.table,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1)] = 32,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = Precision.auto,
    workers: Annotated[int, typer.Option("--workers", min=0, help="Image-decoding threads.")] = min(4, os.cpu_count() or 1),
) -> None:
    """Accuracy on a labelled image folder: top-1, top-5, per-class accuracy and the confusion matrix."""
    from bitcli import evaluate as evaluate_mod

    evaluate_mod.run(data, model, revision, batch_size, device, precision.value, fmt.value, workers)


def main() -> None:
    """Console-script entry: user errors become one `Error:` line; BIT_DEBUG=1 shows tracebacks."""
    from bitcli.errors import BitError, UsageError

    try:
        app()
    except BitError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        sys.exit(2 if isinstance(exc, UsageError) else 1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        if os.environ.get("BIT_DEBUG"):
            raise
        print(f"Error: internal error: {type(exc).__name__}: {exc} (rerun with BIT_DEBUG=1 for the traceback)", file=sys.stderr)
        sys.exit(3)
