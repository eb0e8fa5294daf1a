"""Everything before a fine-tuning run's first step: the checks that can refuse it (cheapest first), its data
sets and plan, the start model on the device, the step to resume from, and the deterministic kernels."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.utils.deterministic

from bitcli import extras
from bitcli.distributed import Dist
from bitcli.errors import UsageError
from bitcli.finetune.datasets import Datasets, scan_datasets, shared_undecodable, usable_datasets
from bitcli.finetune.plan import Plan, check_flags, check_same_run, make_plan, stated_preprocess
from bitcli.finetune.rundir import check_output_location, output_mode
from bitcli.finetune.runfiles import STATE_FILE, SUMMARY_FILE, read_saved_plan
from bitcli.finetune.start import build_start_model, freeze_backbone, start_point
from bitcli.finetune.state import load_state
from bitcli.model import BitModel
from bitcli.options import FinetuneOptions
from bitcli.ui import log, visible


@dataclass(frozen=True)
class Prepared:
    mode: str  # fresh | overwrite | resume (see rundir.output_mode)
    data: Datasets
    model: BitModel  # on the device, in train mode, with its new zero head
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    plan: Plan


def prepare(opts: FinetuneOptions, info: Dist, device: torch.device, dtype: torch.dtype) -> Prepared | None:
    """Data sets, model on the device and plan; None when --resume finds the run finished. Everything that
    can refuse the run, cheapest first: the output folder, the image folders, the flags against the
    architecture, then decoding every image; nothing is written yet."""
    check_output_location(opts)
    if opts.tensorboard:
        extras.require("tensorboard", "--tensorboard")  # before anything is loaded or written
    mode = output_mode(opts.output, opts.resume, opts.overwrite)
    if mode == "finished":
        if info.main:
            log(f"the run in {visible(str(opts.output))} already finished ({SUMMARY_FILE} is there): nothing to resume; "
                "--overwrite trains it again")  # fmt: skip
        return None
    saved = read_saved_plan(opts.output) if mode == "resume" else None
    found = scan_datasets(opts)
    if opts.report and found.val is None and opts.val_split is None:  # --val-split makes one from DATA
        raise UsageError(
            "--report shows the errors of the last validation, and this run has no validation set: "
            "give --val DATA or --val-split F (or a DATA with a val split)"
        )
    start = start_point(opts.model, opts.random_init, opts.revision, len(found.train.classes))
    check_flags(opts, info, start.config, has_validation=found.val is not None, multi_label=found.train.multi_label)
    ds = usable_datasets(
        opts, found, functools.partial(shared_undecodable, info=info, device=device, workers=opts.workers)
    )
    model, mean, std = build_start_model(start, len(ds.train.classes), opts.seed)
    model = model.to(device).train()
    if opts.head_only:
        freeze_backbone(model)  # before the plan: --batch-split auto sizes micro-batches for what trains
    plan = make_plan(opts, ds, model, info, device=device, dtype=dtype, saved=saved, own=stated_preprocess(start.ckpt))
    if saved is not None:
        check_same_run(saved, plan, opts.output)
    return Prepared(mode=mode, data=ds, model=model, mean=mean, std=std, plan=plan)


def resume_point(prepared: Prepared, opts: FinetuneOptions, info: Dist, *, model, optimizer, scaler) -> int:
    """The step to start from: 0, or with --resume the checkpoint's (weights, momentum, RNG restored)."""
    if prepared.mode != "resume":
        return 0
    state_path = opts.output / STATE_FILE
    if not state_path.is_file():
        if info.main:
            log(f"no checkpoint in {opts.output} yet; starting from step 1")
        return 0
    start = load_state(state_path, model, optimizer, prepared.plan, scaler=scaler)
    if info.main:
        # `start` steps are done: the next is step start + 1, counted from 1 as the progress line counts
        log(f"resuming at step {start + 1} of {prepared.plan.steps} from {state_path}")
    return start


def use_deterministic_algorithms() -> None:
    """Exact resume and reproducible weights need deterministic kernels (set on a CPU, where every kernel
    has a deterministic version). torch.use_deterministic_algorithms imports torch._inductor: about 1 s of
    start-up on a small CPU, most of it torch._dynamo, which constructing the optimizer imports anyway.

    Deterministic mode would also fill every new tensor with NaN: a full extra write of each activation and
    gradient. Every kernel here writes its whole output, so the fill changes no result and is switched off.
    """
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = False  # type: ignore[attr-defined]  # a module property: not in the stubs
