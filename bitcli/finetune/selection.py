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
from bitcli.multilabel import Evaluation, MultiLabelResult
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
        """summary.json's record (and --keep-best's, in the checkpoint): what `describe` and `bit report` say."""
        bound = next((b for b in (MIN_TEMPERATURE, MAX_TEMPERATURE) if math.isclose(self.temperature, b)), None)
        return (
            {
                "temperature": self.temperature,
                "val_ece_before": self.before.ece,
                "val_ece_after": self.after.ece,
                "val_nll_before": self.before.nll,
                "val_nll_after": self.after.nll,
                "val_images": self.after.count,
            }
            | ({"skipped": self.skipped} if self.skipped else {})
            | ({"at_bound": bound} if bound is not None and not self.skipped else {})
        )

    def describe(self) -> str:
        return describe(self.to_dict())


def describe(record: dict[str, Any]) -> str:
    """The line a run prints of a calibration (Calibration.to_dict()), and a warning line when the fit ended at
    a bound of the range."""
    if record.get("skipped"):
        return f"calibration skipped: {record['skipped']}; the temperature stays 1"
    line = (
        f"calibrated: temperature {record['temperature']:.4g} fitted on {record['val_images']:,} validation images; "
        f"ECE {record['val_ece_before']:.4f} -> {record['val_ece_after']:.4f}, "
        f"NLL {record['val_nll_before']:.4f} -> {record['val_nll_after']:.4f}"
    )
    if record.get("at_bound") is not None:
        line += (
            f"\nwarning: the temperature is at the bound {record['at_bound']:g} of [{MIN_TEMPERATURE:g}, "
            f"{MAX_TEMPERATURE:g}]: the validation set is too small or too easy to fit it; --no-calibrate leaves the "
            "scores at temperature 1"
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
    """--keep-best METRIC: the best validation so far (the first of equals; NaN is never best), and the
    calibration of its model (best/), fitted on that validation (None: --no-calibrate); a multi-label model
    has the thresholds chosen on that validation instead (best/config.json's)."""

    metric: str
    value: float | None = None
    step: int | None = None
    temperature: float = 1.0
    calibration: dict[str, Any] | None = None  # Calibration.to_dict()
    thresholds: list[float] | None = None  # a multi-label model's, by class

    def improves(self, result: Evaluation) -> bool:
        value = result.metric(self.metric)
        if math.isnan(value):
            return False
        if self.value is None:
            return True
        return value > self.value if SELECTION_METRICS[self.metric] else value < self.value

    def record(self, result: Evaluation, step: int, calibration: Calibration | None) -> None:
        self.value, self.step = result.metric(self.metric), step
        self.temperature = calibration.temperature if calibration is not None else 1.0
        self.calibration = calibration.to_dict() if calibration is not None else None
        self.thresholds = list(result.thresholds) if isinstance(result, MultiLabelResult) else None

    def to_dict(self) -> dict[str, Any]:
        """summary.json's and the checkpoint's record of it (JSON: a float survives exactly)."""
        return {"metric": self.metric, "value": self.value, "step": self.step, "temperature": self.temperature,
                "calibration": self.calibration, "thresholds": self.thresholds}  # fmt: skip

    def describe(self) -> str | None:
        """What the run prints of best/ at its end: its calibration, as it prints the final model's, or a
        multi-label model's measure and thresholds (None: neither)."""
        if self.step is None:
            return None
        if self.thresholds is not None and self.value is not None:
            return (f"best/ (after step {self.step + 1}): {self.metric} {self.value:.4f}, with the thresholds chosen on "
                    "that validation")  # fmt: skip
        if self.calibration is None:
            return None
        return f"best/ (after step {self.step + 1}): {describe(self.calibration)}"  # counted from 1

    @classmethod
    def from_dict(cls, metric: str, saved: Any) -> Best:
        """The record a checkpoint holds (None, or another metric's: nothing kept yet)."""
        if not isinstance(saved, dict) or saved.get("metric") != metric or saved.get("step") is None:
            return cls(metric)
        calibration, thresholds = saved.get("calibration"), saved.get("thresholds")
        return cls(metric, value=float(saved["value"]), step=int(saved["step"]),
                   temperature=float(saved.get("temperature", 1.0)),
                   calibration=calibration if isinstance(calibration, dict) else None,
                   thresholds=[float(t) for t in thresholds] if isinstance(thresholds, list) else None)  # fmt: skip
