"""`bit finetune` from start to end: check everything that can refuse the run (cheapest first), plan it,
claim the output folder, set up the model, optimizer and processes, train, and write the outputs."""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass

import torch
import torch.utils.deterministic

from bitcli import plots
from bitcli.data import DecodeCache, eval_transform, train_transform
from bitcli.distributed import Dist, barrier, setup_distributed, teardown, wrap
from bitcli.engine import Engine
from bitcli.errors import BitError
from bitcli.finetune import tensorboard
from bitcli.finetune.datasets import Datasets, scan_datasets, shared_undecodable, usable_datasets
from bitcli.finetune.loop import Training, bit_sgd, train, validate
from bitcli.finetune.plan import Plan, check_flags, check_same_run, describe, make_plan, stated_preprocess
from bitcli.finetune.rundir import (
    WRITE_ERRORS,
    check_output_location,
    lock_output,
    output_mode,
    remove_leftovers,
    write_json,
    write_outputs,
)
from bitcli.finetune.runfiles import CONFIG_FILE, STATE_FILE, SUMMARY_FILE, read_saved_plan
from bitcli.finetune.start import build_start_model, freeze_backbone, start_point, trainable_parameters
from bitcli.finetune.state import check_finite, load_state
from bitcli.finetune.watch import record_validation
from bitcli.model import BitModel
from bitcli.options import FinetuneOptions
from bitcli.runtime import resolve_precision
from bitcli.ui import log, visible

TRAIN_CACHE_BYTES = 1 << 30  # decoded training images kept in memory (per process)
VAL_CACHE_BYTES = 256 << 20


def run(opts: FinetuneOptions) -> None:
    """Fine-tune as `opts` says; a full or read-only disk is one error line (the run stays resumable)."""
    info, device = setup_distributed(opts.device)
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
    finally:
        teardown(info)


@dataclass(frozen=True)
class Prepared:
    mode: str  # fresh | overwrite | resume (see rundir.output_mode)
    data: Datasets
    model: BitModel  # on the device, in train mode, with its new zero head
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    plan: Plan


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
    engine = Engine(prepared.model, val_tf.normalize, device, dtype, channels_last=device.type == "cuda")
    optimizer = bit_sgd(trainable_parameters(engine.model))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    start = _resume_point(prepared, opts, engine.model, optimizer, scaler, info)
    ds = prepared.data
    training = Training(
        plan=plan, info=info, engine=engine, model=wrap(engine.model, info, device), optimizer=optimizer,
        scaler=scaler, data=ds, train_cache=DecodeCache(ds.train, train_transform(plan.resize), TRAIN_CACHE_BYTES),
        val_cache=DecodeCache(ds.val, val_tf, VAL_CACHE_BYTES) if ds.val is not None else None,
        output=opts.output, start=start, workers=opts.workers, tensorboard=opts.tensorboard,
    )  # fmt: skip
    outcome = train(training)
    if info.main:
        last_eval = outcome.last_eval
        if ds.val is not None and last_eval is None:  # resumed after the last step's checkpoint
            last_eval = validate(training)
            record_validation(opts.output, plan.steps - 1, last_eval, pictures=plots.available())
        check_finite(engine.model, plan.steps - 1)
        write_outputs(
            opts.output, engine.model, plan, val_tf, last_eval, outcome.last_loss, outcome.step_times, start, started
        )
    barrier(info)


def prepare(opts: FinetuneOptions, info: Dist, device: torch.device, dtype: torch.dtype) -> Prepared | None:
    """Data sets, model on the device and plan; None when --resume finds the run finished. Everything that
    can refuse the run, cheapest first: the output folder, the image folders, the flags against the
    architecture, then decoding every image; nothing is written yet."""
    check_output_location(opts)
    if opts.tensorboard:
        tensorboard.require()
    mode = output_mode(opts.output, opts.resume, opts.overwrite)
    if mode == "finished":
        if info.main:
            log(f"the run in {visible(str(opts.output))} already finished ({SUMMARY_FILE} is there): nothing to resume; "
                "--overwrite trains it again")  # fmt: skip
        return None
    saved = read_saved_plan(opts.output) if mode == "resume" else None
    found = scan_datasets(opts)
    start = start_point(opts.model, opts.random_init, opts.revision, len(found.train.classes))
    check_flags(opts, info, start.config)
    ds = usable_datasets(
        opts, found, functools.partial(shared_undecodable, info=info, device=device, workers=opts.workers)
    )
    model, mean, std = build_start_model(start, len(ds.train.classes), opts.seed)
    model = model.to(device).train()
    if opts.head_only:
        freeze_backbone(model)  # before the plan: --batch-split auto sizes micro-batches for what trains
    plan = make_plan(opts, ds, model, info, device, dtype, saved, stated_preprocess(start.ckpt))
    if saved is not None:
        check_same_run(saved, plan, opts.output)
    return Prepared(mode, ds, model, mean, std, plan)


def _resume_point(prepared: Prepared, opts: FinetuneOptions, model, optimizer, scaler, info: Dist) -> int:
    """The step to start from: 0, or with --resume the checkpoint's (weights, momentum, RNG restored)."""
    if prepared.mode != "resume":
        return 0
    state_path = opts.output / STATE_FILE
    if not state_path.is_file():
        if info.main:
            log(f"no checkpoint in {opts.output} yet; starting from step 0")
        return 0
    start = load_state(state_path, model, optimizer, prepared.plan, scaler)
    if info.main:
        log(f"resuming at step {start} of {prepared.plan.steps} from {state_path}")
    return start


def use_deterministic_algorithms() -> None:
    """Exact resume and reproducible weights need deterministic kernels (set on a CPU, where every kernel
    has a deterministic version). torch.use_deterministic_algorithms imports torch._inductor: about 1 s of
    start-up on a small CPU, most of it torch._dynamo, which constructing the optimizer imports anyway.

    Deterministic mode would also fill every new tensor with NaN: a full extra write of each activation and
    gradient. Every kernel here writes its whole output, so the fill changes no result and is switched off.
    """
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = False
