"""The resumable state: one safetensors file (weights, SGD momentum buffers, torch's RNG) with the scalar
state as JSON metadata (no pickle); written to a temporary name and renamed, so the file on disk is always
a complete checkpoint. Restoring it and continuing gives the weights an uninterrupted run gives, bit for bit.

Momentum buffers are stored as `momentum.<parameter name>` and restored into torch.optim.SGD's
optimizer.state[p]["momentum_buffer"]. A parameter without a buffer (before the first step) has no entry:
torch.optim.SGD then starts its buffer as a copy of the next gradient, as it does on a first step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from bitcli.errors import BitError, one_line
from bitcli.finetune.plan import Plan
from bitcli.finetune.runfiles import STATE_FORMAT, checkpoint_state
from bitcli.formats import TensorRef, read_safetensors, write_safetensors


def save_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, next_step: int, *, plan: Plan,
               scaler: torch.amp.GradScaler, best: dict[str, Any] | None = None) -> None:  # fmt: skip
    """`best`: --keep-best's record of the best validation so far (bitcli.finetune.selection.Best), so that a
    resumed run compares against what the uninterrupted run had at this step."""
    tensors: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        tensors[f"model.{name}"] = p.detach().cpu()
        buf = optimizer.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            tensors[f"momentum.{name}"] = buf.detach().cpu()
    tensors["rng.torch"] = torch.get_rng_state()
    kind = "with-replacement" if plan.train_examples < plan.batch_size else "epochs"
    state = {
        "next_step": next_step,
        "seed": plan.seed,
        "train_fingerprint": plan.train_fingerprint,
        "sampler": {
            "kind": "balanced" if getattr(plan, "sampler", None) else kind,
            "seed": plan.seed,
            "next_step": next_step,
        },
        "scaler": scaler.state_dict() if scaler.is_enabled() else None,
        "best": best,
    }
    refs = {k: TensorRef(tuple(t.shape), t.dtype, (lambda t=t: t)) for k, t in tensors.items()}  # type: ignore[misc]  # python/mypy#15459: a default-argument lambda
    write_safetensors(path, refs, {"format": STATE_FORMAT, "state": json.dumps(state)})


def read_state(path: Path) -> tuple[dict[str, Any], dict[str, Any], int]:
    """(the tensors, lazily; the state; the step to continue from) of a checkpoint, its header read only;
    one line when it is not a bit finetune checkpoint or its state is damaged."""
    refs, meta = read_safetensors(path)
    state, next_step = checkpoint_state(path, meta)
    return refs, state, next_step


def load_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, plan: Plan,
               *, scaler: torch.amp.GradScaler) -> int:  # fmt: skip
    """Restore weights, momentum, RNG and the fp16 loss scale; return the step to continue from."""
    refs, state, next_step = read_state(path)
    if state.get("train_fingerprint") != plan.train_fingerprint:
        raise BitError(f"{path}: the training images changed since this checkpoint; restore them or use --overwrite")
    weights = {k.removeprefix("model."): r.load() for k, r in refs.items() if k.startswith("model.")}
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise BitError(f"{path}: checkpoint does not fit the model ({one_line(exc, limit=200)})") from None
    for name, p in model.named_parameters():
        ref = refs.get(f"momentum.{name}")
        if ref is None:
            continue
        if tuple(ref.shape) != tuple(p.shape):
            raise BitError(
                f"{path}: momentum of {name} has shape {tuple(ref.shape)}, not {tuple(p.shape)}; use --overwrite"
            )
        buf = torch.empty_like(p, requires_grad=False)  # the parameter's device, dtype and memory format
        optimizer.state[p]["momentum_buffer"] = buf.copy_(ref.load())
    if "rng.torch" in refs:
        torch.set_rng_state(refs["rng.torch"].load())
    if scaler.is_enabled() and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return next_step


def check_finite(model: torch.nn.Module, step: int) -> None:
    """Before anything is written: NaN or inf weights (an fp16 overflow the loss did not show) are refused.
    `step`: the steps taken, so the last one's number counted from 1 (as the progress line counts)."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise BitError(
                f"weight {name} holds NaN or inf after step {step}; nothing was written. Lower --lr or use --precision fp32"
            )
