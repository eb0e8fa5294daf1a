"""The data and shipping commands of the `bit` app (audit, report, push, serve), as plain Typer-annotated
functions: bitcli.cli registers them after its own, so that `bit --help` lists them last. As in bitcli.cli,
every flag is checked while the command line is read and command modules are imported lazily.
"""

from __future__ import annotations

import typer

from bitcli.architectures import DEFAULT_MODEL
from bitcli.cli_options import (
    AuditDataArg,
    AuditOutputOpt,
    AuditTestOpt,
    BatchOpt,
    CommitMessageOpt,
    DecodeThreadsOpt,
    DeviceOpt,
    DryRunOpt,
    EmbedModelOpt,
    ExactSearchOpt,
    FailOnOpt,
    HeaderTimeoutOpt,
    HostOpt,
    ImageColumnOpt,
    LabelColumnOpt,
    LicenseOpt,
    MaxBatchOpt,
    MaxBodyOpt,
    MaxConnectionsOpt,
    MaxWaitOpt,
    MinImagesOpt,
    PortOpt,
    PrecisionOpt,
    PrivateOpt,
    PushOnnxOpt,
    PushRevisionOpt,
    PushSrcArg,
    QueueOpt,
    RepoArg,
    RevisionOpt,
    RunDirArg,
    ServeModelArg,
    ThresholdOpt,
    TimeoutOpt,
    TopKOpt,
    ValOpt,
    WorkersOpt,
    WriteCleanOpt,
)
from bitcli.options import (
    DEFAULT_WORKERS,
    Precision,
    ReportOptions,
    parse_data,
)
from bitcli.output_checks import (
    check_label_output,
    check_outside_data,
    check_page_folder,
)
from bitcli.tool_options import DEFAULT_NEAR_THRESHOLD, AuditOptions, PushOptions, ServeOptions


def audit(
    data: AuditDataArg,
    model: EmbedModelOpt = DEFAULT_MODEL,
    val: ValOpt = None,
    test: AuditTestOpt = None,
    output: AuditOutputOpt = None,
    threshold: ThresholdOpt = DEFAULT_NEAR_THRESHOLD,
    exact_search: ExactSearchOpt = False,
    min_images: MinImagesOpt = 5,
    fail_on: FailOnOpt = None,
    write_clean: WriteCleanOpt = None,
    revision: RevisionOpt = None,
    batch_size: BatchOpt = 32,
    device: DeviceOpt = "auto",
    workers: WorkersOpt = DEFAULT_WORKERS,
    image_column: ImageColumnOpt = None,
    label_column: LabelColumnOpt = None,
) -> None:
    """Check a data set: images per class and split, exact and near duplicates within and across splits (leakage), likely label errors.

    Exit codes: 0 no --fail-on rule broken, 1 a rule broken (or an error), 2 bad flags.
    """
    opts = AuditOptions(
        data=parse_data(data), val=parse_data(val) if val else None, test=parse_data(test) if test else None,
        model=model, revision=revision, output=output, threshold=threshold, exact_search=exact_search,
        min_images=min_images,
        fail_on=tuple(fail_on or ()), write_clean=write_clean, batch_size=batch_size, device=device, workers=workers,
        image_column=image_column, label_column=label_column,
    )  # fmt: skip
    for source in (opts.data, opts.val, opts.test):  # a folder inside one would be read as images next time
        check_page_folder("--output", output, data=source)
    check_label_output("--write-clean", write_clean)
    check_outside_data("--write-clean", write_clean, (opts.data, opts.val, opts.test))
    from bitcli.commands import audit as audit_command

    raise typer.Exit(audit_command.run(opts))


def report(run: RunDirArg) -> None:
    """Summarise a fine-tuning run (plan, progress or final metrics, its files and pictures); it only reads the folder."""
    opts = ReportOptions(run=run)
    from bitcli.commands import report as report_command

    report_command.run(opts)


def push(
    src: PushSrcArg,
    repo: RepoArg,
    private: PrivateOpt = False,
    revision: PushRevisionOpt = None,
    commit_message: CommitMessageOpt = None,
    onnx: PushOnnxOpt = False,
    dry_run: DryRunOpt = False,
    license_id: LicenseOpt = None,
) -> None:
    """Publish a fine-tuned run (or any model) to the Hugging Face Hub in one commit: a transformers folder, a model card with the metrics, the pictures."""
    opts = PushOptions(
        src=src, repo=repo, private=private, revision=revision, commit_message=commit_message, onnx=onnx,
        dry_run=dry_run, license=license_id,
    )  # fmt: skip
    from bitcli.commands import push as push_command

    push_command.run(opts)


def serve(
    model: ServeModelArg,
    revision: RevisionOpt = None,
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 8000,
    max_batch: MaxBatchOpt = 16,
    max_wait_ms: MaxWaitOpt = 10.0,
    queue: QueueOpt = 64,
    max_body_mb: MaxBodyOpt = 50.0,
    timeout_s: TimeoutOpt = 60.0,
    max_connections: MaxConnectionsOpt = 128,
    header_timeout_s: HeaderTimeoutOpt = 10.0,
    top_k: TopKOpt = 5,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = Precision.auto,
    workers: DecodeThreadsOpt = DEFAULT_WORKERS,
) -> None:
    """Serve a model over HTTP: a JSON API (predict, embed) batching concurrent requests, and an upload page.

    Runs until SIGTERM (exit 0) or Ctrl-C (exit 130), finishing the requests in flight. Needs bitcli[serve].
    """
    opts = ServeOptions(
        model=model, revision=revision, host=host, port=port, max_batch=max_batch, max_wait_ms=max_wait_ms,
        queue=queue, max_body_mb=max_body_mb, timeout_s=timeout_s, max_connections=max_connections, top_k=top_k,
        device=device, precision=precision, workers=workers, header_timeout_s=header_timeout_s,
    )  # fmt: skip
    from bitcli import extras

    extras.require("serve", "bit serve")
    from bitcli.commands import serve as serve_command

    raise typer.Exit(serve_command.run(opts))
