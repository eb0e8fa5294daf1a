"""The `bit` Typer app: each command reads its flags into a typed options object (bitcli.options) and calls
its module by keyword. Every flag value is checked while the command line is read, so a bad one exits 2
before a command module (or torch) is imported; command modules are imported lazily for the same reason.
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Callable
from typing import Annotated

import typer

import bitcli
from bitcli import cli_tools
from bitcli.architectures import DEFAULT_MODEL
from bitcli.cli_options import (
    BatchOpt,
    BatchSplitOpt,
    CacheFeaturesOpt,
    CalibrateOpt,
    ClassWeightsOpt,
    ConvertFormatOpt,
    ConvertOverwriteOpt,
    DeviceOpt,
    DstArg,
    DTypeOpt,
    EmbedFormatOpt,
    EmbedModelOpt,
    EmbedOutputOpt,
    EmbedTtaOpt,
    EvalDataArg,
    EvalEveryOpt,
    EvalFormatOpt,
    ExplainOutputOpt,
    FinetuneDataArg,
    FinetuneReportOpt,
    GlobalBatchOpt,
    HeadOnlyOpt,
    ImageColumnOpt,
    ImagesArg,
    KeepBestOpt,
    LabelColumnOpt,
    LabelsOpt,
    LrOpt,
    MaxDownloadOpt,
    MinAgreementOpt,
    MinScoreOpt,
    MixupOpt,
    ModelOpt,
    NoCalibrateOpt,
    NoFlipOpt,
    NormalizeOpt,
    OpsetOpt,
    PlotOpt,
    PrecisionOpt,
    PredictFormatOpt,
    PredictOutputOpt,
    QuantizeOpt,
    RandomInitOpt,
    RecursiveOpt,
    ReportDirOpt,
    ResolutionOpt,
    ResumeOpt,
    RevisionOpt,
    RunOutputOpt,
    RunOverwriteOpt,
    SamplerOpt,
    SaveEveryOpt,
    SeedOpt,
    ShotsOpt,
    SrcArg,
    StartModelOpt,
    StepsOpt,
    TargetOpt,
    TensorboardOpt,
    TopKOpt,
    TtaOpt,
    ValOpt,
    ValSplitOpt,
    WorkersOpt,
)
from bitcli.errors import UsageError
from bitcli.hyperrule import BASE_LR, BATCH_SIZE
from bitcli.options import (
    DEFAULT_WORKERS,
    ConvertOptions,
    DType,
    EmbedOptions,
    EvalFormat,
    EvalOptions,
    ExplainOptions,
    FinetuneOptions,
    Precision,
    PredictOptions,
    embed_format,
    parse_data,
    predict_format,
    reliability_path,
)
from bitcli.output_checks import (
    check_embed_output,
    check_explain_output_outside_inputs,
    check_model_folder,
    check_output,
    check_page_folder,
    check_plot_outside_report,
)
from bitcli.pages.folder import EVAL_REPORT, EXPLAIN

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


@_command()
def predict(
    images: ImagesArg,
    model: ModelOpt = DEFAULT_MODEL,
    revision: RevisionOpt = None,
    top_k: TopKOpt = 5,
    batch_size: BatchOpt = 16,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = Precision.auto,
    fmt: PredictFormatOpt = None,
    output: PredictOutputOpt = None,
    recursive: RecursiveOpt = False,
    workers: WorkersOpt = DEFAULT_WORKERS,
    tta: TtaOpt = None,
    min_score: MinScoreOpt = None,
    max_download_mb: MaxDownloadOpt = 50.0,
) -> None:
    """Classify images: top-k labels with probabilities.

    Exit codes: 0 all classified, 1 some input failed (the rest are still reported), 2 bad flags.
    """
    opts = PredictOptions(
        images=images, model=model, revision=revision, top_k=top_k, batch_size=batch_size, device=device,
        precision=precision, format=predict_format(fmt, output), output=output, recursive=recursive, workers=workers,
        tta=tta, min_score=min_score,
        max_download_mb=max_download_mb,
    )  # fmt: skip
    check_output("--output", output)
    from bitcli.commands import predict as predict_command

    raise typer.Exit(predict_command.run(opts))


@_command()
def embed(
    images: ImagesArg,
    model: EmbedModelOpt = DEFAULT_MODEL,
    revision: RevisionOpt = None,
    output: EmbedOutputOpt = None,
    fmt: EmbedFormatOpt = None,
    normalize: NormalizeOpt = False,
    batch_size: BatchOpt = 16,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = Precision.auto,
    recursive: RecursiveOpt = False,
    workers: WorkersOpt = DEFAULT_WORKERS,
    tta: EmbedTtaOpt = None,
    max_download_mb: MaxDownloadOpt = 50.0,
) -> None:
    """Image embeddings: the pre-logits features (global average pool after the final GroupNorm + ReLU).

    Exit codes: 0 all embedded, 1 some input failed (the rest are still written), 2 bad flags.
    """
    opts = EmbedOptions(
        images=images, model=model, revision=revision, batch_size=batch_size, device=device, precision=precision,
        format=embed_format(fmt, output), output=output, normalize=normalize, recursive=recursive, workers=workers,
        tta=tta,
        max_download_mb=max_download_mb,
    )  # fmt: skip
    check_embed_output(opts.format, output)
    from bitcli.commands import embed as embed_command

    raise typer.Exit(embed_command.run(opts))


@_command()
def convert(
    src: SrcArg,
    dst: DstArg,
    fmt: ConvertFormatOpt = None,
    labels: LabelsOpt = None,
    dtype: DTypeOpt = DType.float32,
    revision: RevisionOpt = None,
    overwrite: ConvertOverwriteOpt = False,
    opset: OpsetOpt = None,
    quantize: QuantizeOpt = None,
    calibrate: CalibrateOpt = None,
    min_agreement: MinAgreementOpt = 0.99,
) -> None:
    """Convert a checkpoint between Google's .npz, bitcli, transformers and timm layouts, or export it to ONNX."""
    opts = ConvertOptions(
        src=src, dst=dst, format=fmt, labels=labels, dtype=dtype, revision=revision, overwrite=overwrite, opset=opset,
        quantize=quantize, calibrate=calibrate, min_agreement=min_agreement,
    )  # fmt: skip
    from bitcli.commands import convert as convert_command

    convert_command.run(opts)


@_command()
def finetune(
    data: FinetuneDataArg,
    model: StartModelOpt,
    output: RunOutputOpt,
    shots: ShotsOpt = None,
    val: ValOpt = None,
    val_split: ValSplitOpt = None,
    steps: StepsOpt = None,
    lr: LrOpt = BASE_LR,
    batch_size: GlobalBatchOpt = BATCH_SIZE,
    batch_split: BatchSplitOpt = None,
    resolution: ResolutionOpt = None,
    mixup: MixupOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = Precision.auto,
    workers: WorkersOpt = DEFAULT_WORKERS,
    eval_every: EvalEveryOpt = None,
    save_every: SaveEveryOpt = None,
    resume: ResumeOpt = False,
    overwrite: RunOverwriteOpt = False,
    random_init: RandomInitOpt = False,
    revision: RevisionOpt = None,
    head_only: HeadOnlyOpt = False,
    cache_features: CacheFeaturesOpt = False,
    tensorboard: TensorboardOpt = False,
    image_column: ImageColumnOpt = None,
    label_column: LabelColumnOpt = None,
    class_weights: ClassWeightsOpt = None,
    sampler: SamplerOpt = None,
    keep_best: KeepBestOpt = None,
    no_calibrate: NoCalibrateOpt = False,
    no_flip: NoFlipOpt = False,
    report: FinetuneReportOpt = False,
) -> None:
    """Fine-tune a BiT model on labelled images with the BiT-HyperRule (resumable; torchrun for several processes)."""
    opts = FinetuneOptions(
        data=parse_data(data), model=model, output=output, shots=shots, val=parse_data(val) if val else None, val_split=val_split, steps=steps, lr=lr,
        batch_size=batch_size, batch_split=batch_split, resolution=resolution, mixup=mixup, seed=seed,
        device=device, precision=precision, workers=workers, eval_every=eval_every, save_every=save_every,
        resume=resume, overwrite=overwrite, random_init=random_init, revision=revision, head_only=head_only,
        tensorboard=tensorboard, image_column=image_column, label_column=label_column, class_weights=class_weights,
        sampler=sampler, keep_best=keep_best, calibrate=not no_calibrate, report=report,
        cache_features=cache_features, flip=not no_flip,
    )  # fmt: skip
    if cache_features and not head_only:
        raise UsageError("--cache-features trains the head on fixed features: add --head-only")
    if cache_features and mixup:
        raise UsageError(f"--mixup {mixup:g} with --cache-features: cached features are not augmented; drop --mixup")
    if cache_features and no_flip:
        raise UsageError("--no-flip with --cache-features: cached features are not augmented; drop --no-flip")
    check_output("--output", output, folder=True)
    from bitcli.finetune.runfiles import BEST_FOLDER, REPORT_FOLDER

    if report:
        check_page_folder("--report: the report folder", output / REPORT_FOLDER, kind=EVAL_REPORT,
                          removed_first=overwrite)  # fmt: skip
    if keep_best is not None:  # before --overwrite removes the earlier run's files
        check_model_folder("--keep-best", output / BEST_FOLDER)
    from bitcli.commands import finetune as finetune_command

    finetune_command.run(opts)


@_command("eval")
def eval_(
    data: EvalDataArg,
    model: ModelOpt = DEFAULT_MODEL,
    revision: RevisionOpt = None,
    fmt: EvalFormatOpt = EvalFormat.table,
    batch_size: BatchOpt = 32,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = Precision.auto,
    workers: WorkersOpt = DEFAULT_WORKERS,
    plot: PlotOpt = None,
    image_column: ImageColumnOpt = None,
    label_column: LabelColumnOpt = None,
    tta: TtaOpt = None,
    report: ReportDirOpt = None,
) -> None:
    """Accuracy on labelled images: top-1, top-5 (models with over 5 classes), per-class accuracy, precision, recall, F1, confusion matrix."""
    opts = EvalOptions(
        data=parse_data(data), model=model, revision=revision, format=fmt, batch_size=batch_size, device=device,
        precision=precision, workers=workers, plot=plot, image_column=image_column, label_column=label_column,
        tta=tta,
        report=report,
    )  # fmt: skip
    check_output("--plot", plot)
    if plot is not None:
        check_output("--plot", reliability_path(plot))  # the reliability diagram goes beside it
    check_page_folder("--report", report, data=opts.data, kind=EVAL_REPORT)
    check_plot_outside_report(plot, report)
    if plot is not None:
        check_plot_outside_report(reliability_path(plot), report)
    from bitcli.commands import eval as eval_command

    raise typer.Exit(eval_command.run(opts))


@_command()
def explain(
    images: ImagesArg,
    output: ExplainOutputOpt,
    model: EmbedModelOpt = DEFAULT_MODEL,
    target: TargetOpt = None,
    revision: RevisionOpt = None,
    batch_size: BatchOpt = 16,
    device: DeviceOpt = "auto",
    recursive: RecursiveOpt = False,
    workers: WorkersOpt = DEFAULT_WORKERS,
    max_download_mb: MaxDownloadOpt = 50.0,
) -> None:
    """Grad-CAM: where in each image the evidence for its predicted class (or --target) lies, as overlay PNGs, maps and JSON rows.

    Exit codes: 0 all explained, 1 some input failed (the rest are still written), 2 bad flags.
    """
    opts = ExplainOptions(
        images=images, output=output, model=model, revision=revision, target=target, batch_size=batch_size,
        device=device, recursive=recursive, workers=workers, max_download_mb=max_download_mb,
    )  # fmt: skip
    check_page_folder("--output", output, kind=EXPLAIN)
    check_explain_output_outside_inputs(output, images if recursive else [])
    from bitcli.commands import explain as explain_command

    raise typer.Exit(explain_command.run(opts))


# The data and shipping commands come after the six above in `bit --help`.
for _tool in (cli_tools.audit, cli_tools.report, cli_tools.push, cli_tools.serve):
    _command()(_tool)


def _click_exceptions():
    """click's exception classes: Typer 0.2x carries its own copy of click (typer._click), older Typers use click."""
    try:
        from typer._click import exceptions
    except ImportError:
        from click import exceptions  # type: ignore[no-redef]  # the same classes, from the other package
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
