"""The `bit` Typer app: each command reads its flags into a typed options object (bitcli.options) and calls
its module by keyword. Every flag value is checked while the command line is read, so a bad one exits 2
before a command module (or torch) is imported; command modules are imported lazily for the same reason.
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer

import bitcli
from bitcli.architectures import DEFAULT_MODEL
from bitcli.errors import UsageError
from bitcli.hyperrule import BASE_LR, BATCH_SIZE, Resolution
from bitcli.options import (
    DEFAULT_WORKERS,
    ConvertFormat,
    ConvertOptions,
    DType,
    EmbedFormat,
    EmbedOptions,
    EvalFormat,
    EvalOptions,
    FinetuneOptions,
    OptionError,
    Precision,
    PredictFormat,
    PredictOptions,
    Quantize,
    ReportOptions,
    check_embed_output,
    check_output,
    embed_format,
    parse_auto_float,
    parse_auto_int,
    parse_data,
    parse_device,
    parse_png_path,
    parse_resolution,
    parse_val_split,
    predict_format,
)

T = TypeVar("T")

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


def _version(value: bool) -> None:
    if value:
        print(f"bit {bitcli.__version__}")
        raise typer.Exit()


@app.callback()
def _app(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """The options before the command (the app's help is Typer's `help=` above)."""


def _command(name: str | None = None) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """app.command, with `bit --help` listing the whole first paragraph of the docstring (click would cut it to
    what fits one line, ending in "...")."""

    def register(func: Callable[..., None]) -> Callable[..., None]:
        summary = " ".join((inspect.getdoc(func) or "").split("\n\n")[0].split())
        return app.command(name, short_help=summary)(func)

    return register


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
    str | None, typer.Option("--image-column", help="A data set's image column (default: its Image feature).")
]
LabelColumnOpt = Annotated[
    str | None,
    typer.Option("--label-column", help="A data set's label column (default: its ClassLabel, else 'label')."),
]
# predict's and embed's inputs
ImagesArg = Annotated[
    list[str],
    typer.Argument(
        help="Image files, folders or glob patterns; - reads paths from stdin, one per line.",
        metavar="IMAGES",
        show_default=False,
    ),
]
RecursiveOpt = Annotated[bool, typer.Option("--recursive", "-r", help="Descend into sub-folders.")]
WorkersOpt = Annotated[
    int,
    typer.Option(
        "--workers", min=0, help="Image-decoding threads (0: decode in the main thread); results do not depend on it."
    ),
]


@_command()
def predict(
    images: ImagesArg,
    model: ModelOpt = DEFAULT_MODEL,
    revision: RevisionOpt = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="Labels to report per image.")] = 5,
    batch_size: BatchOpt = 16,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = Precision.auto,
    fmt: Annotated[
        PredictFormat | None,
        typer.Option(
            "--format",
            "-f",
            case_sensitive=False,
            show_default=False,
            help="Default: from --output's suffix (.json, .jsonl, .csv), else table.",
        ),
    ] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write here instead of stdout.")] = None,
    recursive: RecursiveOpt = False,
    workers: WorkersOpt = DEFAULT_WORKERS,
) -> None:
    """Classify images: top-k labels with probabilities.

    Exit codes: 0 all classified, 1 some input failed (the rest are still reported), 2 bad flags.
    """
    opts = PredictOptions(
        images=images, model=model, revision=revision, top_k=top_k, batch_size=batch_size, device=device,
        precision=precision, format=predict_format(fmt, output), output=output, recursive=recursive, workers=workers,
    )  # fmt: skip
    check_output("--output", output)
    from bitcli import predict as predict_mod

    raise typer.Exit(predict_mod.run(opts))


@_command()
def embed(
    images: ImagesArg,
    model: EmbedModelOpt = DEFAULT_MODEL,
    revision: RevisionOpt = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="FILE.safetensors, FILE.npy (paths in FILE.paths.txt) or FILE.jsonl."),
    ] = None,
    fmt: Annotated[
        EmbedFormat | None,
        typer.Option(
            "--format",
            "-f",
            case_sensitive=False,
            show_default=False,
            help="Default: from --output's suffix; -f jsonl without --output writes to stdout.",
        ),
    ] = None,
    normalize: Annotated[bool, typer.Option("--normalize", help="L2-normalise every vector (unit length).")] = False,
    batch_size: BatchOpt = 16,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = Precision.auto,
    recursive: RecursiveOpt = False,
    workers: WorkersOpt = DEFAULT_WORKERS,
) -> None:
    """Image embeddings: the pre-logits features (global average pool after the final GroupNorm + ReLU).

    Exit codes: 0 all embedded, 1 some input failed (the rest are still written), 2 bad flags.
    """
    opts = EmbedOptions(
        images=images, model=model, revision=revision, batch_size=batch_size, device=device, precision=precision,
        format=embed_format(fmt, output), output=output, normalize=normalize, recursive=recursive, workers=workers,
    )  # fmt: skip
    check_embed_output(opts.format, output)
    from bitcli import embed as embed_mod

    raise typer.Exit(embed_mod.run(opts))


@_command()
def convert(
    src: Annotated[
        str,
        typer.Argument(
            metavar="SRC",
            help="Google .npz, transformers folder, timm folder/file, bitcli .safetensors, or a model spec.",
        ),
    ],
    dst: Annotated[
        Path, typer.Argument(metavar="DST", help="A .safetensors file (bitcli), a .onnx file, or a folder (hf/timm).")
    ],
    fmt: Annotated[
        ConvertFormat | None,
        typer.Option(
            "--format", case_sensitive=False, help="Default: bitcli for *.safetensors, onnx for *.onnx, else hf."
        ),
    ] = None,
    labels: Annotated[Path | None, typer.Option("--labels", help="Text file of class names, one per line.")] = None,
    dtype: Annotated[
        DType,
        typer.Option("--dtype", case_sensitive=False, help="The written weights' type (ONNX: its arithmetic too)."),
    ] = DType.float32,
    revision: RevisionOpt = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Replace a DST file that bitcli wrote, or the model files of a DST folder "
            "(any other file, or a folder holding other files, is refused).",
        ),
    ] = False,
    opset: Annotated[
        int | None, typer.Option("--opset", min=18, show_default="18", help="ONNX: the opset to write.")
    ] = None,
    quantize: Annotated[
        Quantize | None,
        typer.Option("--quantize", case_sensitive=False, help="ONNX: static int8 quantisation (needs --calibrate)."),
    ] = None,
    calibrate: Annotated[
        Path | None,
        typer.Option("--calibrate", help="ONNX int8: folder of images to calibrate on (and to measure agreement on)."),
    ] = None,
    min_agreement: Annotated[
        float,
        typer.Option(
            "--min-agreement", help="ONNX int8: least top-1 agreement with float32 on the calibration images."
        ),
    ] = 0.99,
) -> None:
    """Convert a checkpoint between Google's .npz, bitcli, transformers and timm layouts, or export it to ONNX."""
    opts = ConvertOptions(
        src=src, dst=dst, format=fmt, labels=labels, dtype=dtype, revision=revision, overwrite=overwrite, opset=opset,
        quantize=quantize, calibrate=calibrate, min_agreement=min_agreement,
    )  # fmt: skip
    from bitcli import convert as convert_mod

    convert_mod.run(opts)


@_command()
def finetune(
    data: Annotated[
        str,
        typer.Argument(
            metavar="DATA",
            show_default=False,
            help="Image folder (one sub-folder per class, or train/ + val/ splits), CSV/JSONL "
            "label file, parquet file or folder, save_to_disk folder, or hf://datasets/OWNER/NAME[@REV][:SPLIT].",
        ),
    ],
    model: Annotated[
        str,
        typer.Option(
            "--model",
            "-m",
            help="Model spec to start from (as for predict); with --random-init "
            "an architecture: tiny, small, R50x1 ... R152x4, or a JSON object of BitConfig fields.",
        ),
    ],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Run folder: model, metrics.jsonl, summary.json, checkpoint.")
    ],
    shots: Annotated[
        int | None,
        typer.Option("--shots", min=1, help="Train on K images per class (seeded); a smaller class is an error."),
    ] = None,
    val: Annotated[
        str | None,
        typer.Option(
            "--val", metavar="DATA", help="Validation data, any DATA kind (default: DATA's val|valid|validation split)."
        ),
    ] = None,
    val_split: Annotated[
        float | None,
        typer.Option(
            "--val-split",
            parser=_parser("--val-split", parse_val_split),
            metavar="F",
            help="Hold out this fraction (0 < F < 1) of every class for validation.",
        ),
    ] = None,
    steps: Annotated[
        int | None,
        _auto(
            "auto (HyperRule: 500/10k/20k by data size) or N (boundaries scaled).",
            "--steps",
            lambda v: parse_auto_int(v, 1),
            "<auto|N>",
        ),
    ] = None,
    lr: Annotated[float, typer.Option("--lr", help="Base learning rate (linear warm-up, then /10 steps).")] = BASE_LR,
    batch_size: Annotated[
        int, typer.Option("--batch-size", "-b", min=1, help="Global batch per optimizer step.")
    ] = BATCH_SIZE,
    batch_split: Annotated[
        int | None,
        _auto(
            "Micro-batches per step (gradient accumulation): auto or N.",
            "--batch-split",
            lambda v: parse_auto_int(v, 1),
            "<auto|N>",
        ),
    ] = None,
    resolution: Annotated[
        Resolution | None,
        _auto(
            "auto (HyperRule: 128 or 480), CROP, or RESIZE:CROP.",
            "--resolution",
            parse_resolution,
            "<auto|CROP|RESIZE:CROP>",
        ),
    ] = None,
    mixup: Annotated[
        float | None,
        _auto(
            "auto (HyperRule: 0.1 from 20k images) or ALPHA; 0 disables.", "--mixup", parse_auto_float, "<auto|ALPHA>"
        ),
    ] = None,
    seed: Annotated[
        int, typer.Option("--seed", help="Seeds few-shot sampling, data order, augmentation, random init.")
    ] = 0,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = Precision.auto,
    workers: WorkersOpt = DEFAULT_WORKERS,
    eval_every: Annotated[
        int | None,
        _auto(
            "Validate every N steps (auto: 5 times per run; 0: only at the end).",
            "--eval-every",
            lambda v: parse_auto_int(v, 0),
            "<auto|N>",
        ),
    ] = None,
    save_every: Annotated[
        int | None,
        _auto(
            "Write the resumable checkpoint every N steps (auto: 10 times per run).",
            "--save-every",
            lambda v: parse_auto_int(v, 1),
            "<auto|N>",
        ),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the unfinished run in --output from its checkpoint.")
    ] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a previous run in --output.")] = False,
    random_init: Annotated[
        bool, typer.Option("--random-init", help="Start --model's architecture from random weights.")
    ] = False,
    revision: RevisionOpt = None,
    head_only: Annotated[
        bool, typer.Option("--head-only", help="Train only the new head; the backbone stays frozen (a linear probe).")
    ] = False,
    tensorboard: Annotated[
        bool,
        typer.Option(
            "--tensorboard", help="Also write TensorBoard event files to DIR/tensorboard (needs bitcli[tensorboard])."
        ),
    ] = False,
    image_column: ImageColumnOpt = None,
    label_column: LabelColumnOpt = None,
) -> None:
    """Fine-tune a BiT model on labelled images with the BiT-HyperRule (resumable; torchrun for several processes)."""
    opts = FinetuneOptions(
        data=parse_data(data), model=model, output=output, shots=shots, val=parse_data(val) if val else None, val_split=val_split, steps=steps, lr=lr,
        batch_size=batch_size, batch_split=batch_split, resolution=resolution, mixup=mixup, seed=seed,
        device=device, precision=precision, workers=workers, eval_every=eval_every, save_every=save_every,
        resume=resume, overwrite=overwrite, random_init=random_init, revision=revision, head_only=head_only,
        tensorboard=tensorboard, image_column=image_column, label_column=label_column,
    )  # fmt: skip
    check_output("--output", output, folder=True)
    from bitcli import finetune as finetune_mod

    finetune_mod.run(opts)


@_command("eval")
def eval_(
    data: Annotated[
        str,
        typer.Argument(
            metavar="DATA",
            show_default=False,
            help="Image folder with one sub-folder per class (named by a label of the model, its first name, or its index), "
            "or any DATA of finetune: label file, parquet, save_to_disk folder, hf://datasets/OWNER/NAME[@REV][:SPLIT].",
        ),
    ],
    model: ModelOpt = DEFAULT_MODEL,
    revision: RevisionOpt = None,
    fmt: Annotated[
        EvalFormat,
        typer.Option(
            "--format",
            "-f",
            case_sensitive=False,
            help="table: for people; json: every metric (per class too) and the whole confusion matrix.",
        ),
    ] = EvalFormat.table,
    batch_size: BatchOpt = 32,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = Precision.auto,
    workers: WorkersOpt = DEFAULT_WORKERS,
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot",
            parser=_parser("--plot", parse_png_path),
            metavar="FILE.png",
            help="Also draw the confusion matrix, row-normalised, as a PNG (needs bitcli[plots]).",
        ),
    ] = None,
    image_column: ImageColumnOpt = None,
    label_column: LabelColumnOpt = None,
) -> None:
    """Accuracy on labelled images: top-1, top-5 (models with over 5 classes), per-class accuracy, precision, recall, F1, confusion matrix."""
    opts = EvalOptions(
        data=parse_data(data), model=model, revision=revision, format=fmt, batch_size=batch_size, device=device,
        precision=precision, workers=workers, plot=plot, image_column=image_column, label_column=label_column,
    )  # fmt: skip
    check_output("--plot", plot)
    from bitcli import evaluate as evaluate_mod

    raise typer.Exit(evaluate_mod.run(opts))


@_command()
def report(
    run: Annotated[
        Path,
        typer.Argument(
            metavar="RUN_DIR",
            help="A bit finetune run folder (its --output): finished, running or interrupted.",
            show_default=False,
        ),
    ],
) -> None:
    """Summarise a fine-tuning run (plan, progress or final metrics, its files and pictures); it only reads the folder."""
    opts = ReportOptions(run=run)
    from bitcli import report as report_mod

    report_mod.run(opts)


def _click_exceptions():
    """click's exception classes: Typer 0.2x carries its own copy of click (typer._click), older Typers use click."""
    try:
        from typer._click import exceptions
    except ImportError:
        from click import exceptions
    return exceptions


def main() -> None:
    """Console-script entry: user errors become one `Error:` line; BIT_DEBUG=1 shows tracebacks."""
    from bitcli.errors import BitError, UsageError

    click = _click_exceptions()
    try:
        code = app(
            prog_name="bit", standalone_mode=False
        )  # click's own errors come back here, to be shown as bitcli's are
    except getattr(click, "NoArgsIsHelpError", ()) as exc:  # `bit` alone (click >= 8.2): the help, on stderr, exit 2
        print(exc.format_message(), file=sys.stderr)
        sys.exit(2)
    except click.UsageError as exc:  # a flag click refuses (a choice, a bound, an unknown option): one line too
        command = exc.ctx.command_path if exc.ctx is not None else "bit"
        message = " ".join(exc.format_message().replace("Value error, ", "").split())
        print(
            f"Error: {message}" + ("" if "-h" in message else f" (`{command} -h` lists the options)"), file=sys.stderr
        )
        sys.exit(2)
    except BitError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        sys.exit(2 if isinstance(exc, UsageError) else 1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        if os.environ.get("BIT_DEBUG"):
            raise
        print(
            f"Error: internal error: {type(exc).__name__}: {exc} (rerun with BIT_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        sys.exit(3)
    sys.exit(code if isinstance(code, int) else 0)
