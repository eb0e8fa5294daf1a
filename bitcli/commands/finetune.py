"""`bit finetune` from start to end: check everything that can refuse the run and plan it (bitcli.finetune.prepare),
claim the output folder, set up the model, optimizer and processes, train (bitcli.finetune.loop), and write the
outputs (bitcli.finetune.rundir)."""

from __future__ import annotations

import contextlib
import time

import torch

from bitcli import extras
from bitcli.audit.cache import EmbeddingCache, model_key
from bitcli.audit.embedding import folder_features
from bitcli.data import DecodeCache, eval_transform, train_transform
from bitcli.distributed import Dist, barrier, process_group, wrap
from bitcli.errors import BitError
from bitcli.evaluation import multi_hot_targets
from bitcli.finetune.loop import Training, bit_sgd, train, validate
from bitcli.finetune.plan import Plan, describe
from bitcli.finetune.prepare import prepare, resume_point, use_deterministic_algorithms
from bitcli.finetune.rundir import (
    WRITE_ERRORS,
    Selection,
    lock_output,
    remove_leftovers,
    write_json,
    write_outputs,
)
from bitcli.finetune.runfiles import CONFIG_FILE, REPORT_FOLDER, STATE_FILE
from bitcli.finetune.selection import Best, Calibration, Logits, calibrate
from bitcli.finetune.start import trainable_parameters
from bitcli.finetune.state import check_finite, read_state
from bitcli.finetune.watch import record_validation
from bitcli.gallery.build import Source, write_report
from bitcli.gallery.multilabel_records import MultiLabelPerImage
from bitcli.gallery.records import PerImage
from bitcli.hub import bitcli_cache
from bitcli.multilabel import DEFAULT_THRESHOLD, Evaluation, MultiLabelResult
from bitcli.options import FinetuneOptions
from bitcli.runtime import resolve_precision
from bitcli.sources.examples import ImageFolder
from bitcli.torch_engine import TorchEngine
from bitcli.ui import display, log

TRAIN_CACHE_BYTES = 1 << 30  # decoded training images kept in memory (per process)
VAL_CACHE_BYTES = 256 << 20


def _cached_features(engine: TorchEngine, train_set, *, workers: int, batch_size: int) -> torch.Tensor:
    """--cache-features: the training images' features through the engine at the eval transform, from the
    embedding cache ($BITCLI_CACHE, bit audit's) or computed once; on the engine's device."""
    tensors = {k: (lambda v=v: v) for k, v in engine.model.state_dict().items()}
    cache = EmbeddingCache(bitcli_cache(), model_key(tensors, (engine.preprocess, engine.dtype), None),
                           engine.model.config.num_features)  # fmt: skip
    vectors = folder_features(train_set, engine, cache, batch_size=batch_size, workers=workers)
    return torch.from_numpy(vectors).to(engine.device)


def run(opts: FinetuneOptions) -> None:
    """Fine-tune as `opts` says; a full or read-only disk is one error line (the run stays resumable)."""
    with process_group(opts.device) as (info, device):
        try:
            with contextlib.ExitStack() as held:  # the output folder's lock, released however the run ends
                _run(opts, info, device, held)
        except OSError as exc:
            if exc.errno not in WRITE_ERRORS:
                raise
            where = exc.filename or opts.output
            raise BitError(
                f"{where}: cannot write ({exc.strerror}); free some space or choose another --output "
                "(--resume continues from the last checkpoint)"
            ) from None


def _run(opts: FinetuneOptions, info: Dist, device: torch.device, held: contextlib.ExitStack) -> None:
    started = time.monotonic()
    dtype = resolve_precision(str(opts.precision), device)
    if device.type == "cpu":
        use_deterministic_algorithms()
    prepared = prepare(opts, info, device, dtype)
    if prepared is None:
        return
    plan = prepared.plan
    barrier(info)  # every process has looked at DIR before the first write to it
    if info.main:
        for line in describe(plan):
            log(line)
        opts.output.mkdir(parents=True, exist_ok=True)
        held.enter_context(lock_output(opts.output))
        remove_leftovers(opts.output, run_files=prepared.mode == "overwrite")
        if prepared.mode != "resume":
            write_json(opts.output / CONFIG_FILE, plan.to_dict())

    # The engine converts the model to channels_last on a GPU: before the optimizer and DDP take its parameters.
    val_tf = eval_transform(plan.crop, prepared.mean, prepared.std)
    engine = TorchEngine(prepared.model, val_tf, device, dtype, labels=plan.classes, source=str(opts.output),
                         channels_last=device.type == "cuda")  # fmt: skip
    optimizer = bit_sgd(trainable_parameters(engine.model))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    start = resume_point(prepared, opts, info, model=engine.model, optimizer=optimizer, scaler=scaler)
    ds = prepared.data
    # --report: the last validation (main process) keeps every image's result (multi-label: its scores) for the
    # report's gallery
    kept = _keeper(plan, ds.val) if opts.report and info.main and ds.val is not None else None
    training = Training(
        plan=plan, info=info, engine=engine, model=wrap(engine.model, info, device), optimizer=optimizer,
        scaler=scaler, data=ds, train_cache=DecodeCache(ds.train, train_transform(plan.resize), TRAIN_CACHE_BYTES),
        val_cache=DecodeCache(ds.val, val_tf, VAL_CACHE_BYTES) if ds.val is not None else None,
        output=opts.output, start=start, workers=opts.workers, tensorboard=opts.tensorboard,
        best=best_so_far(opts, plan.keep_best, start),
        keep=kept.add if kept is not None else None,
    )  # fmt: skip
    if opts.cache_features and info.main:
        training.features = _cached_features(engine, ds.train, workers=opts.workers, batch_size=plan.micro_batch)
    outcome = train(training)
    if info.main:
        last_eval, logits = outcome.last_eval, outcome.last_logits
        if ds.val is not None and last_eval is None:  # resumed after the last step's checkpoint
            logits = Logits() if plan.calibrate else None
            last_eval = validate(training, True, views=logits)
            record_validation(opts.output, plan.steps - 1, last_eval, pictures=extras.available("plots"))
        check_finite(engine.model, plan.steps)
        calibration = calibrate(logits, plan.classes) if logits is not None else None
        if calibration is not None:
            log(calibration.describe())
        if training.best is not None and (about_best := training.best.describe()) is not None:
            log(about_best)  # best/'s own temperature, fitted on its validation: skipped or at a bound as well
        selection = Selection(
            temperature=calibration.temperature if calibration else 1.0,
            calibration=calibration.to_dict() if calibration else None,
            best=training.best.to_dict() if training.best is not None else None,
            thresholds=final_thresholds(plan, last_eval),
        )
        write_outputs(opts.output, engine.model, plan, val_tf, last_eval=last_eval, last_loss=outcome.last_loss,
                      step_times=outcome.step_times, start=start, started=started, selection=selection)  # fmt: skip
        if kept is not None and last_eval is not None and ds.val is not None:
            title = f"validation set {display(ds.val.where())} after {plan.steps} steps ({display(opts.output)})"
            source = Source(ds.val, title=title, heading=f"validation after {plan.steps} of {plan.steps} steps",
                            note=_temperature_note(calibration))  # fmt: skip
            write_report(opts.output / REPORT_FOLDER, engine, source, result=last_eval, results=kept.results(),
                         batch_size=plan.micro_batch, workers=opts.workers)  # fmt: skip
    barrier(info)


def _keeper(plan: Plan, val: ImageFolder) -> PerImage | MultiLabelPerImage:
    """What --report keeps of the last validation's images: single-label results, or multi-label scores."""
    if plan.multi_label:
        return MultiLabelPerImage(range(len(val.classes)), multi_hot_targets(val), len(plan.classes))
    return PerImage(range(len(val.classes)), val.targets)


def _temperature_note(calibration: Calibration | None) -> str | None:
    """The report's scores are the validation's, at temperature 1: when the saved model applies a fitted one,
    the page says so (and by how much it changed ECE and NLL)."""
    if calibration is None or calibration.skipped:
        return None
    return ("The scores on this page are the last validation's at temperature 1; the model saved in the run "
            f"applies the temperature fitted on them ({calibration.describe().splitlines()[0]}).")  # fmt: skip


def final_thresholds(plan: Plan, last_eval: Evaluation | None) -> list[float] | None:
    """A multi-label model's thresholds: those the last validation chose (max F1 per class), else 0.5 each."""
    if not plan.multi_label:
        return None
    if isinstance(last_eval, MultiLabelResult):
        return last_eval.thresholds
    return [DEFAULT_THRESHOLD] * len(plan.classes)


def best_so_far(opts: FinetuneOptions, metric: str | None, start: int) -> Best | None:
    """--keep-best: the best validation of the steps before `start`, as the checkpoint recorded it (a fresh
    run: none yet)."""
    if metric is None:
        return None
    if start == 0:
        return Best(metric)
    _, state, _ = read_state(opts.output / STATE_FILE)  # resume_point has just read and checked it
    return Best.from_dict(metric, state.get("best"))
