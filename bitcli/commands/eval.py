"""`bit eval`: the accuracy of a model on a labelled data set (bitcli.evaluation), as a table or JSON, and
optionally the confusion matrix as a picture and the HTML report with its error gallery (bitcli.gallery; a
multi-label model's: per-class AP and each class's worst false positives and negatives). Every
process evaluates its share of the batches; the main process alone reports."""

from __future__ import annotations

import contextlib
import itertools
import json
import sys

from bitcli import extras, plots
from bitcli.distributed import from_main, process_group
from bitcli.engine import Engine, load_engine
from bitcli.errors import UsageError
from bitcli.evaluation import evaluate, example_decoder, example_reader, multi_hot_targets
from bitcli.gallery.build import Source, write_report
from bitcli.gallery.multilabel_records import MultiLabelPerImage
from bitcli.gallery.records import PerImage
from bitcli.gpu_decode import for_engine
from bitcli.hub import load_checkpoint
from bitcli.labels import match_classes
from bitcli.metrics import render_table
from bitcli.multilabel import Evaluation, MultiLabelResult
from bitcli.multilabel import render_table as render_multilabel
from bitcli.options import EvalFormat, EvalOptions, reliability_path
from bitcli.pipeline import no_progress
from bitcli.runtime import resolve_precision
from bitcli.sources.examples import ImageFolder
from bitcli.sources.locate import Columns, data_path, evaluation_part
from bitcli.ui import display, log, progress_bar, visible
from bitcli.writes import refuse_replacing_input, within, write_together


def run(opts: EvalOptions) -> int:
    """The whole command; returns the exit code (130 when Ctrl-C stopped the pass)."""
    with process_group(opts.device) as (info, device):
        if opts.plot is not None:
            extras.require("plots", "--plot")  # before any work
        dtype = resolve_precision(opts.precision, device)
        columns = Columns(opts.image_column, opts.label_column)
        _check_plot_outside(opts, None)
        # Listed once, by the main process: every process splits the same list.
        ds = from_main(lambda: evaluation_part(opts.data, columns).scan(None), info)
        _check_plot_outside(opts, ds)
        ckpt = load_checkpoint(opts.model, opts.revision)
        # Folder names are checked before the model is built (seconds for a big one); a checkpoint without a
        # head has no labels, and load_engine says so instead.
        class_to_model = (
            match_classes(
                ds.classes, ckpt.labels, ckpt.source or opts.model, ds.root, data=ds.source, first_row=ds.first_row
            )
            if ckpt.config.num_classes
            else []
        )
        engine = load_engine(ckpt, device, dtype)
        # --report: the main process keeps every image's result as it is accumulated (no second pass)
        kept = _keeper(engine, ds, class_to_model) if opts.report is not None and info.main else None
        show_bar = opts.format == EvalFormat.table and info.main
        bar = progress_bar("evaluating", total=len(ds), unit="img") if show_bar else contextlib.nullcontext(no_progress)
        done = 0
        try:
            with bar as show:

                def advance(n: int) -> None:
                    nonlocal done
                    done += n
                    show(n)

                decode = example_decoder(ds, engine.preprocess)
                result = evaluate(engine, ds, decode, batch_size=opts.batch_size, workers=opts.workers,
                                  class_to_model=class_to_model, advance=advance, info=info,
                                  tta=str(opts.tta) if opts.tta is not None else None,
                                  on_device=for_engine(engine, decode, example_reader(ds)),
                                  keep=kept.add if kept is not None else None)  # fmt: skip
        except KeyboardInterrupt:  # Ctrl-C: one line, as predict gives (the bar and decode threads are closed by now)
            if info.main:
                log(f"interrupted: {done} of {len(ds)} images done; accuracy is reported only for a whole pass")
            return 130
        if result is None:  # not the main process: it reports, and any failure there is the run's
            return 0
        _report(result, opts, ds)
        if kept is not None and opts.report is not None:
            source = Source(ds, title=f"{display(ds.where())} evaluated with {opts.model}", heading=_heading(opts, ds))
            write_report(opts.report, engine, source, result=result, results=kept.results(),
                         batch_size=opts.batch_size, workers=opts.workers)  # fmt: skip
        return 0


def _keeper(engine: Engine, ds: ImageFolder, class_to_model: list[int]) -> PerImage | MultiLabelPerImage:
    """What --report keeps of every image: its single-label results, or a multi-label model's scores."""
    if engine.thresholds is None:
        return PerImage(class_to_model, ds.targets)
    return MultiLabelPerImage(class_to_model, multi_hot_targets(ds), engine.num_classes)


def _heading(opts: EvalOptions, ds: ImageFolder) -> str:
    """The first title line of the pictures (--plot's and the report's): the data and the model."""
    return f"{visible(display(ds.where()))} with {visible(opts.model)}"


def _check_plot_outside(opts: EvalOptions, ds: ImageFolder | None) -> None:
    """--plot (and the reliability diagram beside it) must not be written into a DATA folder (the picture would become an image of the data set, or
    replace one), nor over a DATA file or an image that a label file lists (checked once `ds` is read)."""
    where = data_path(opts.data)
    if opts.plot is None or where is None:
        return
    for picture in (opts.plot, reliability_path(opts.plot)):  # both files --plot writes (either may be a link)
        if where.is_dir():
            if ds is None and within(picture, where):
                raise UsageError(
                    f"--plot {display(picture)}: is inside the data folder {display(where)} (DATA), where it would "
                    "be taken for an image of the data set, or replace one; choose a file outside it"
                )
        elif ds is not None:
            listed = (p for p in ds.paths if isinstance(p, str))  # a label file's images (a parquet's are inside)
            refuse_replacing_input("--plot", picture, itertools.chain([where], listed))


def _report(result: Evaluation, opts: EvalOptions, ds: ImageFolder) -> None:
    """The main process's output: the table or JSON on stdout, and with --plot the confusion picture and the
    reliability diagram (FILE-reliability.png), written together; a multi-label model's per-class AP picture."""
    table = render_multilabel if isinstance(result, MultiLabelResult) else render_table
    if opts.format == EvalFormat.table:
        sys.stdout.write(table(result, color=sys.stdout.isatty()))  # type: ignore[arg-type]  # the matching one
    else:
        sys.stdout.write(json.dumps(result.to_dict(), ensure_ascii=False) + "\n")
    sys.stdout.flush()
    if opts.plot is not None:
        heading = _heading(opts, ds)
        if isinstance(result, MultiLabelResult):
            plots.write_png(opts.plot, plots.ap_png(result.to_dict(), heading))
            return
        confusion = plots.evaluation_png(result.to_dict(), heading, result.other_column)
        reliability = plots.reliability_png(result.to_dict(), heading)
        write_together([(opts.plot, lambda f: f.write(confusion)),
                        (reliability_path(opts.plot), lambda f: f.write(reliability))])  # fmt: skip
