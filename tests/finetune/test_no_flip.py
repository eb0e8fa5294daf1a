"""--no-flip: the training crops are never mirrored, and nothing else about the steps changes; the plan, the
resume check and the model card say so."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_main

import bitcli.finetune.loop as loop

from .helpers import FAST

STEPS, BATCH = 3, 8


def crops_seen(monkeypatch: pytest.MonkeyPatch, dataset: Path, out: Path, *flags: str) -> tuple[str, list[tuple]]:
    """A short run with `flags`: its stderr, and each training crop as the loop asked for it (the decoded image's
    hash, top, left, flip), in a fixed order. The real augment runs: the spy only writes its arguments down."""
    seen: list[tuple] = []
    real = loop.augment

    def spy(image: np.ndarray, top: int, left: int, crop: int, *, flip: bool) -> np.ndarray:
        seen.append((hashlib.sha256(image.tobytes()).hexdigest(), top, left, flip))
        return real(image, top, left, crop, flip=flip)

    monkeypatch.setattr(loop, "augment", spy)
    # FAST's --resolution 16: resize 20, random crop 16
    code, _, err = run_main("finetune", dataset, "--output", out, "--steps", STEPS, "--batch-size", BATCH,
                            "--eval-every", "0", *FAST, *flags)  # fmt: skip
    assert code == 0, err
    return err, sorted(seen)


def test_no_flip_never_mirrors_a_crop_and_changes_nothing_else(
    monkeypatch: pytest.MonkeyPatch, dataset: Path, tmp_path: Path
) -> None:
    err, flipping = crops_seen(monkeypatch, dataset, tmp_path / "flip")
    err_no, plain = crops_seen(monkeypatch, dataset, tmp_path / "noflip", "--no-flip")
    assert len(flipping) == len(plain) == STEPS * BATCH
    assert {f for *_, f in flipping} == {True, False}  # the HyperRule mirrors about half
    assert {f for *_, f in plain} == {False}
    assert [c[:3] for c in plain] == [c[:3] for c in flipping]  # the same images and crop offsets
    assert "resolution  resize 20x20, random crop 16 + flip; eval resize 16x16" in err
    assert "resolution  resize 20x20, random crop 16, no flip (--no-flip); eval resize 16x16" in err_no
    assert json.loads((tmp_path / "flip/finetune_config.json").read_text())["flip"] is True
    assert json.loads((tmp_path / "noflip/finetune_config.json").read_text())["flip"] is False


def test_resume_keeps_the_flip_setting_and_the_card_states_it(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["finetune", dataset, "--output", out, "--steps", "3", "--batch-size", "4", "--eval-every", "0", *FAST]
    assert run_main(*args, "--no-flip")[0] == 0
    (out / "summary.json").unlink()
    code, _, err = run_main(*args, "--resume")
    assert code == 1 and "started with other settings (flip False -> True: --no-flip left out now)" in err
    code, _, err = run_main(*args, "--no-flip", "--resume")  # the same setting resumes
    assert code == 0, err
    code, out_text, err = run_main("push", out, "alice/noflip", "--dry-run")
    assert code == 0, err
    assert "| Resolution | train: resize to 20 px, random crop 16 px, no flip; eval: resize to 16 x 16 px |" in out_text
    code, out_text, err = run_main("report", out)
    assert code == 0, err
    assert "steps of 4 images, lr 0.003, crop 16, no flip, no mixup;" in out_text


def test_a_plan_written_before_the_flag_counts_as_flipping(dataset: Path, tmp_path: Path) -> None:
    """Runs started before --no-flip existed have no "flip" in their plan: they mirrored. They stay resumable, and
    bit report and the model card say they mirrored."""
    out = tmp_path / "run"
    args = ["finetune", dataset, "--output", out, "--steps", "3", "--batch-size", "4", "--eval-every", "0", *FAST]
    plan_file = out / "finetune_config.json"

    def drop_flip() -> None:
        plan = json.loads(plan_file.read_text())
        plan.pop("flip", None)  # (a resume keeps the plan it started with)
        plan_file.write_text(json.dumps(plan))

    assert run_main(*args, "--save-every", "1")[0] == 0
    (out / "summary.json").unlink()
    drop_flip()
    code, _, err = run_main(*args, "--save-every", "1", "--no-flip", "--resume")
    assert code == 1 and "flip True -> False: --no-flip given now" in err
    code, _, err = run_main(*args, "--save-every", "1", "--resume")
    assert code == 0, err
    drop_flip()
    code, shown, err = run_main("report", out)
    assert code == 0 and "crop 16, no mixup;" in shown, err
    code, shown, err = run_main("push", out, "alice/old", "--dry-run")
    assert code == 0 and "| Resolution | train: resize to 20 px, random crop 16 px and flip;" in shown, err
