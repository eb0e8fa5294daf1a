"""`bit predict`: expand the arguments into images (bitcli.inputs), classify them through the pipeline
(bitcli.pipeline) with the engine, and report one row per argument occurrence, in argument order, in any format.
"""

from __future__ import annotations

import sys

import numpy as np

from bitcli.distributed import from_main, process_group
from bitcli.engine import Engine, load_engine, over_thresholds, top_k, view_logits
from bitcli.errors import BitError, UsageError
from bitcli.gpu_decode import file_bytes, for_engine
from bitcli.hub import load_checkpoint
from bitcli.inputs import expand_inputs, path_decoder
from bitcli.labels import LIST_SEPARATOR, with_separator
from bitcli.options import PredictFormat, PredictOptions
from bitcli.pipeline import Report, drop, exit_code, run_report
from bitcli.render import Row, predictions_text, print_lines, row_maker, write_text
from bitcli.runtime import resolve_precision
from bitcli.ui import visible
from bitcli.urls import downloads
from bitcli.writes import refuse_replacing_input


def run(opts: PredictOptions) -> int:
    """The whole command; returns the exit code. Ctrl-C reports what was done and returns 130."""
    with process_group(opts.device) as (info, device):
        dtype = resolve_precision(opts.precision, device)
        inputs = from_main(lambda: expand_inputs(opts.images, opts.recursive), info)
        report: Report[Row] = Report(inputs, row_maker(opts.min_score))
        refuse_replacing_input("--output", opts.output, [i.path for i in report.inputs if i.error is None])
        engine = load_engine(load_checkpoint(opts.model, opts.revision), device, dtype)
        if opts.min_score is not None and engine.thresholds is not None:
            raise UsageError(
                f"--min-score: {opts.model} is a multi-label model, whose labels are the classes at or above their "
                "own thresholds (none: unknown); leave --min-score out"
            )
        _check_csv_labels(opts, engine)
        # jsonl on stdout streams: each line is written as soon as it and every line before it are done (a pipe
        # sees progress, and an interrupted run has already delivered everything it finished).
        stream = opts.format == PredictFormat.jsonl and opts.output is None
        rows: list[Row] = []
        emit = (print_lines if stream else rows.extend) if info.main else drop

        tta = str(opts.tta) if opts.tta is not None else None

        def classify(batch: np.ndarray) -> list[list[dict]] | list[dict]:
            # The scores: the model's temperature, and with --tta the mean over the views (bitcli.scores).
            logits = view_logits(engine, batch, tta)
            top = top_k(
                logits,
                engine.labels,
                opts.top_k,
                temperature=engine.temperature,
                multi_label=engine.thresholds is not None,
            )
            if engine.thresholds is None:
                return top
            return [{"predictions": t, "labels": above} for t, above in zip(top, over_thresholds(logits, engine))]

        decode = path_decoder(engine.preprocess, downloads(opts.max_download_mb))
        interrupted = run_report(report, decode, classify, batch_size=opts.batch_size, workers=opts.workers,
                                 emit=emit, info=info, verb="classifying",
                                 on_device=for_engine(engine, decode, file_bytes))  # fmt: skip
        if info.main and not stream:
            color = opts.output is None and opts.format == PredictFormat.table and sys.stdout.isatty()
            write_text(predictions_text(rows, opts.format, color), opts.output)
        return exit_code(report, interrupted, info, opts.output)


def _check_csv_labels(opts: PredictOptions, engine: Engine) -> None:
    """CSV's image_label joins a multi-label model's labels with `;` (bitcli.labels.LIST_SEPARATOR): a model with
    a class holding it (a transformers folder's id2label, say) is refused before any image is read, rather than
    written ambiguously; JSON and JSON lines give the labels as lists."""
    bad = with_separator(engine.labels) if opts.format == PredictFormat.csv and engine.thresholds is not None else None
    if bad is not None:
        raise BitError(
            f"{opts.model}: multi-label class '{visible(bad)}' holds '{LIST_SEPARATOR}', which separates the labels "
            f"in CSV's image_label column, so it would read back as several labels; use --format json or jsonl "
            "(their labels are lists)"
        )
