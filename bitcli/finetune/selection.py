"""What a run keeps of its validations beyond the metrics: the temperature fitted on the last validation's
logits (calibrated scores; --no-calibrate: none), and with --keep-best METRIC the best validated model so far
(DIR/best/), whose record travels in the resumable checkpoint so that a resumed run keeps the best that the
uninterrupted run keeps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bitcli.metrics import SELECTION_METRICS, Accumulator, EvalResult
from bitcli.multilabel import Evaluation
from bitcli.scores import MAX_TEMPERATURE, MIN_TEMPERATURE, fit_temperature
from bitcli.ui import visible


class Logits:
    """Collects a validation pass's logits and classes (bitcli.evaluation.evaluate's `keep`), on the main
    process; the data set's classes are the model's (fine-tuning trains a head of exactly those)."""

    def __init__(self) -> None:
        self.parts: list[torch.Tensor] = []
        self.classes: list[np.ndarray] = []

    def __call__(self, logits: torch.Tensor, targets: np.ndarray) -> None:
        self.parts.append(logits[:, 0].float().clone())  # [b, classes]: fine-tuning validates one view
        self.classes.append(np.asarray(targets, dtype=np.int64))

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat(self.parts), torch.from_numpy(np.concatenate(self.classes))


@dataclass(frozen=True)
class Calibration:
    """The temperature fitted on a validation pass, and the pass's scores before (T = 1) and after."""

    temperature: float
    before: EvalResult
    after: EvalResult
    skipped: str | None = None  # why no temperature was fitted (it stays 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "val_ece_before": self.before.ece,
            "val_ece_after": self.after.ece,
            "val_nll_before": self.before.nll,
            "val_nll_after": self.after.nll,
        } | ({"skipped": self.skipped} if self.skipped else {})

    def describe(self) -> str:
        """The line the run prints (and a warning line when the fit ended at a bound of the range)."""
        if self.skipped:
            return f"calibration skipped: {self.skipped}; the temperature stays 1"
        line = (
            f"calibrated: temperature {self.temperature:.4g} fitted on {self.after.count:,} validation images; "
            f"ECE {self.before.ece:.4f} -> {self.after.ece:.4f}, NLL {self.before.nll:.4f} -> {self.after.nll:.4f}"
        )
        bound = next((b for b in (MIN_TEMPERATURE, MAX_TEMPERATURE) if math.isclose(self.temperature, b)), None)
        if bound is not None:
            line += (
                f"\nwarning: the temperature is at the bound {bound:g} of [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}]: "
                "the validation set is too small or too easy to fit it; --no-calibrate leaves the scores at temperature 1"
            )
        return line


def calibrate(logits: Logits, classes: tuple[str, ...]) -> Calibration:
    """The temperature that minimises the validation NLL (bitcli.scores.fit_temperature), with the metrics of
    the pass at temperature 1 and at the fitted one (the same metrics `bit eval` reports). Validation images of
    fewer than 2 classes fit nothing (the NLL falls as T shrinks, to the bound): T stays 1, with a note."""
    z, y = logits.tensors()
    present = np.unique(y.numpy())
    if len(present) < 2:
        at_one = _scored(z, y, classes, 1.0)
        held = (
            f"the validation images are all of class {visible(classes[int(present[0])])!r}"
            if len(present)
            else "no images"
        )
        return Calibration(1.0, before=at_one, after=at_one, skipped=f"{held}, so no temperature can be fitted")
    temperature = fit_temperature(z, y)
    return Calibration(temperature, before=_scored(z, y, classes, 1.0), after=_scored(z, y, classes, temperature))


def _scored(logits: torch.Tensor, targets: torch.Tensor, classes: tuple[str, ...], temperature: float) -> EvalResult:
    acc = Accumulator(classes, range(len(classes)), len(classes), temperature=temperature)
    acc.update(logits, targets.numpy())
    return acc.result()


@dataclass
class Best:
    """--keep-best METRIC: the best validation so far (the first of equals; NaN is never best)."""

    metric: str
    value: float | None = None
    step: int | None = None
    temperature: float = 1.0

    def improves(self, result: Evaluation) -> bool:
        value = result.metric(self.metric)
        if math.isnan(value):
            return False
        if self.value is None:
            return True
        return value > self.value if SELECTION_METRICS[self.metric] else value < self.value

    def record(self, result: Evaluation, step: int, temperature: float) -> None:
        self.value, self.step, self.temperature = result.metric(self.metric), step, temperature

    def to_dict(self) -> dict[str, Any]:
        """summary.json's and the checkpoint's record of it (JSON: a float survives exactly)."""
        return {"metric": self.metric, "value": self.value, "step": self.step, "temperature": self.temperature}

    @classmethod
    def from_dict(cls, metric: str, saved: Any) -> Best:
        """The record a checkpoint holds (None, or another metric's: nothing kept yet)."""
        if not isinstance(saved, dict) or saved.get("metric") != metric or saved.get("step") is None:
            return cls(metric)
        return cls(metric, float(saved["value"]), int(saved["step"]), float(saved.get("temperature", 1.0)))
