"""`bit report RUN_DIR` only reads: it never writes into the run (not a byte, not an mtime, nothing created and
removed), so a read-only run is reported too; it imports no torch (a process of its own is measured); bad lines
of metrics.jsonl are skipped and counted; a run that lacks its model is not finished; absurd numbers print as
short words; a run without pictures is told how to get them."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_main

from bitcli.finetune.rundir import MetricsLog, lock_output

from .helpers import FAST, read_metrics

SHORT = ["--steps", "8", "--batch-size", "8", "--eval-every", "4", "--save-every", "3", *FAST]
MODEL_NOTE = "the fine-tuned model (with config.json, preprocessor_config.json): --model for predict and eval"
INSTALL = "pip install 'bitcli[plots]'"


def train(dataset: Path, out: Path) -> tuple[int, str]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as conftest.one_thread, which a module's fixture runs outside of
    try:
        code, _, err = run_main("finetune", dataset, "--output", out, *SHORT)
    finally:
        torch.set_num_threads(threads)
    return code, err


@pytest.fixture(scope="module")
def finished(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 8-step run with a validation set (validated at steps 3 and 7, checkpoints at 3, 6 and 8)."""
    out = tmp_path_factory.mktemp("report") / "run"
    code, err = train(dataset, out)
    assert code == 0, err
    (out.parent / "stderr.txt").write_text(err)  # beside the run: its progress lines
    return out


@pytest.fixture(scope="module")
def interrupted(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same run stopped by Ctrl-C in step 7: steps 0-6 logged, validated at step 3, the checkpoint of step 6."""
    out = tmp_path_factory.mktemp("report") / "run"
    write = MetricsLog.write

    def stopped(self: MetricsLog, record: dict) -> None:
        if record["step"] == 7:
            raise KeyboardInterrupt
        write(self, record)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(MetricsLog, "write", stopped)
        code, err = train(dataset, out)
    assert code == 130, err
    return out


def copy_run(run: Path, to: Path, without: tuple[str, ...] = ()) -> Path:
    shutil.copytree(run, to)
    for name in without:
        (to / name).unlink()
    return to


def snapshot(folder: Path) -> dict[str, tuple[int, int, bytes | None]]:
    """Every entry under `folder` and the folder itself: (mode, mtime in ns, bytes of a file). A file created
    and removed again changes its folder's mtime."""
    return {
        str(p.relative_to(folder)): (p.lstat().st_mode, p.lstat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
        for p in [folder, *sorted(folder.rglob("*"))]
    }


def make_read_only(folder: Path) -> None:
    """Files 0444, folders 0555 (the tests run as root, whom this does not stop: snapshots show any write)."""
    for p in [*folder.rglob("*"), folder]:
        p.chmod(0o555 if p.is_dir() else 0o444)


def expected_report(run: Path, status: str, files: list[str], pictures: str) -> str:
    """The whole report of a copy of the `finished` or `interrupted` run, from its files."""
    plan = json.loads((run / "finetune_config.json").read_text())
    metrics = read_metrics(run)
    last, validations = metrics[-1], [m for m in metrics if m.get("val_top1") is not None]
    best = max(validations, key=lambda m: m["val_top1"])
    stored = json.loads((run / "validation.json").read_text())
    notes = {"model.safetensors": MODEL_NOTE, "metrics.jsonl": "one line per step",
             "validation.json": "the last validation, with its confusion matrix", "summary.json": "final metrics",
             "checkpoint.safetensors": "resumable checkpoint", "finetune_config.json": "the plan"}  # fmt: skip
    return "".join(
        line + "\n"
        for line in [
            f"model       random {plan['model']} -> 3 classes",
            f"train       36 images from {plan['train_folder']}",
            f"validation  12 images ({plan['validation']})",
            "schedule    8 steps of 8 images, lr 0.003, crop 16, no mixup; cpu, float32",
            f"status      {status}",
            f"last step   {last['step'] + 1}: loss {last['loss']:.4f}, lr {last['lr']:.3g}, {last['images_per_s']:.1f} images/s",
            f"validation  step {validations[-1]['step'] + 1}: top-1 {validations[-1]['val_top1']:.4f}, top-5 n/a, "
            f"loss {validations[-1]['val_loss']:.4f}; best top-1 {best['val_top1']:.4f} at step {best['step'] + 1}",
            f"macro F1    {stored['macro_f1']:.4f} at step {stored['step'] + 1} (12 images)",
            *calibration_lines(run),
            "files",
            *(f"  {run / name}  {notes[name]}" for name in notes if name in files),
            f"pictures    {pictures}",
        ]
    )


def calibration_lines(run: Path) -> list[str]:
    """A finished run's temperature, fitted on the last validation, with the ECE and NLL before and after."""
    if not (run / "summary.json").is_file():
        return []
    cal = json.loads((run / "summary.json").read_text())["calibration"]
    # a fit at a bound of [0.05, 20] (the tiny run's few validation images) is said as the run said it
    bound = cal.get("at_bound")
    note = f" (at the bound {bound:.2f} of its range: the validation set is too small or too easy to fit it)"
    return [f"calibrated  temperature {cal['temperature']:.4f}: validation ECE {cal['val_ece_before']:.4f} -> "
            f"{cal['val_ece_after']:.4f}, NLL {cal['val_nll_before']:.4f} -> {cal['val_nll_after']:.4f}"
            f"{note if bound is not None else ''}"]  # fmt: skip


ALL_FILES = ["model.safetensors", "metrics.jsonl", "validation.json", "summary.json", "checkpoint.safetensors",
             "finetune_config.json"]  # fmt: skip
UNFINISHED_FILES = [n for n in ALL_FILES if n not in ("model.safetensors", "summary.json")]


@pytest.mark.parametrize("state", ["finished", "running", "interrupted"])
def test_report_of_a_read_only_run_prints_the_summary_and_writes_nothing(
    finished: Path, interrupted: Path, tmp_path: Path, state: str
) -> None:
    run = copy_run(finished if state == "finished" else interrupted, tmp_path / "run")
    pictures = f"{run / 'curves.png'}, {run / 'confusion.png'}"
    if state == "finished":
        expected = expected_report(run, "finished", ALL_FILES, pictures)
    elif state == "running":
        expected = expected_report(run, "running: 7 of 8 steps done", UNFINISHED_FILES, pictures)
    else:
        status = "interrupted after 7 of 8 steps; --resume continues from the checkpoint of step 6"
        expected = expected_report(run, status, UNFINISHED_FILES, pictures)
    make_read_only(run)
    try:
        if state == "running":
            with lock_output(run):  # as while a run goes: .lock is there and held
                before = snapshot(run)
                code, out, err = run_main("report", run)
                assert snapshot(run) == before
        else:
            before = snapshot(run)
            code, out, err = run_main("report", run)
            assert snapshot(run) == before  # no byte, no mtime, no file changed, created or removed
    finally:
        for p in [run, *run.rglob("*")]:
            p.chmod(0o755)
    assert (code, err) == (0, "")
    assert out == expected


# `bit report` in a process of its own (the process is what is tested): its exit code, the heavy modules it
# loaded and its peak memory come back as the last line of stderr.
REPORT_SCRIPT = """
import json, sys
from bitcli.cli import main
sys.argv = ["bit", "report", sys.argv[1]]
try:
    main()
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in ("torch", "numpy", "matplotlib", "PIL", "safetensors") if m in sys.modules)
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"code": code, "heavy": heavy, "peak_kib": peak}), file=sys.stderr)
"""


def report_in_a_process(run: Path) -> tuple[subprocess.CompletedProcess[str], dict]:
    done = subprocess.run([sys.executable, "-c", REPORT_SCRIPT, str(run)], capture_output=True, text=True, timeout=120)
    return done, json.loads(done.stderr.splitlines()[-1])


def test_report_process_imports_no_training_stack(finished: Path, tmp_path: Path) -> None:
    """The process is what is tested: after a whole `bit report` no torch, numpy, matplotlib, PIL or safetensors
    is loaded, and its peak memory is that of Python and the CLI (far under 150 MB)."""
    run = copy_run(finished, tmp_path / "run")
    done, result = report_in_a_process(run)
    assert (result["code"], result["heavy"]) == (0, []), done.stderr
    assert result["peak_kib"] < 150 * 1024
    assert done.stdout == run_main("report", run)[1]
    assert done.stdout.splitlines()[4] == "status      finished"


def write_metrics(run: Path, lines: list[str]) -> None:
    (run / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))


def record(step: int, changes: dict[str, object] | None = None) -> str:
    """A metrics.jsonl line as training writes it (validation fields at steps 3 and 7), with `changes`."""
    line = {"step": step, "lr": 0.003, "loss": 1.5 - step / 10, "images_per_s": 100.0 + step}
    if step in (3, 7):
        line.update(val_top1=0.25 * (step // 3), val_top5=None, val_loss=1.0)
    return json.dumps({**line, **(changes or {})})


GOOD = [record(step) for step in range(8)]
BAD_LINES = {
    "a missing key": (json.dumps({"step": 4, "lr": 0.003, "loss": 1.1}), 5),
    "a string step": (record(4, {"step": "1"}), 5),
    "a boolean step": (record(4, {"step": True}), 5),
    "a string loss": (record(4, {"loss": "1.1"}), 5),
    "garbage in the middle": ("{not json at all", 5),
    "a JSON list": ("[1, 2, 3]", 5),
    "a step beyond the run": (record(8), 9),
    "a torn last line": ('{"step": 8, "lr": 0.0', 9),
}


@pytest.mark.parametrize("kind", BAD_LINES)
def test_bad_metrics_lines_are_skipped_and_counted(finished: Path, tmp_path: Path, kind: str) -> None:
    run = copy_run(finished, tmp_path / "run")
    bad, line_number = BAD_LINES[kind]
    lines = [*GOOD[:4], bad, *GOOD[4:]] if line_number == 5 else [*GOOD, bad]
    write_metrics(run, lines)
    code, out, err = run_main("report", run)
    assert (code, err) == (0, "")
    report = out.splitlines()
    assert report[4:8] == [
        "status      finished",
        f"skipped     1 of 9 lines of metrics.jsonl: not a step record of this run (the first: line {line_number})",
        "last step   8: loss 0.8000, lr 0.003, 107.0 images/s",  # every step after the bad line is read
        "validation  step 8: top-1 0.5000, top-5 n/a, loss 1.0000; best top-1 0.5000 at step 8",
    ]


def test_many_bad_lines_report_their_count_and_the_first(finished: Path, tmp_path: Path) -> None:
    run = copy_run(finished, tmp_path / "run")
    write_metrics(run, [GOOD[0], "", "garbage", GOOD[1], "\x00\xff", GOOD[2], record(3, {"images_per_s": None})])
    (run / "metrics.jsonl").write_bytes((run / "metrics.jsonl").read_bytes() + b"\xff\xfe not utf-8\n")
    code, out, err = run_main("report", run)
    assert (code, err) == (0, "")
    stored = json.loads((run / "validation.json").read_text())
    assert out.splitlines()[4:8] == [
        "status      finished",
        "skipped     5 of 8 lines of metrics.jsonl: not a step record of this run (the first: line 2)",
        "last step   3: loss 1.3000, lr 0.003, 102.0 images/s",
        f"macro F1    {stored['macro_f1']:.4f} at step 8 (12 images)",  # no validation line: step 3's was bad
    ]


@pytest.mark.parametrize(
    ("missing", "text"),
    [
        (("model.safetensors", "config.json"), "model.safetensors, config.json are missing"),
        (("config.json",), "config.json is missing"),
        (("preprocessor_config.json",), "preprocessor_config.json is missing"),
    ],
)
def test_a_run_without_its_model_files_is_not_finished(
    finished: Path, tmp_path: Path, missing: tuple[str, ...], text: str
) -> None:
    run = copy_run(finished, tmp_path / "run", without=missing)
    code, out, err = run_main("report", run)
    assert (code, err) == (0, "")
    assert f"status      not finished: {text} (training ended, summary.json is there: moved or deleted since?)\n" in out
    assert "status      finished" not in out
    assert (f"  {run / 'model.safetensors'}  " in out) == ("model.safetensors" not in missing)


def test_absurd_numbers_print_as_short_words(finished: Path, tmp_path: Path) -> None:
    run = copy_run(finished, tmp_path / "run", without=("summary.json",))
    plan = json.loads((run / "finetune_config.json").read_text())
    (run / "finetune_config.json").write_text(json.dumps({**plan, "steps": 10**40, "train_examples": 10**30}))
    huge = 10**39
    lines = [
        record(0),
        json.dumps({"step": 1, "lr": 0.003, "loss": 10**400, "images_per_s": 1.0}),  # beyond any float: skipped
        record(huge, {"loss": float("inf"), "images_per_s": 1e300})[:-1]  # a NaN top-1 is never the best
        + ', "val_top1": NaN, "val_top5": Infinity, "val_loss": -Infinity}',
        record(huge + 1, {"loss": 1e308, "lr": 1e308, "images_per_s": float("nan")})[:-1]
        + ', "val_top1": 0.5, "val_loss": 1e999}',
        record(10**41),  # beyond the plan's steps: skipped
    ]
    write_metrics(run, lines)
    stored = json.loads((run / "validation.json").read_text())
    (run / "validation.json").write_text(json.dumps({**stored, "macro_f1": 1e308, "step": huge, "count": 10**30}))
    code, out, err = run_main("report", run)
    assert (code, err) == (0, "")
    assert not re.search(r"\d{20}", out)  # no number spelled out in hundreds of digits
    report = out.splitlines()
    assert report[1] == f"train       1.00e+30 images from {plan['train_folder']}"
    assert report[3] == "schedule    1.00e+40 steps of 8 images, lr 0.003, crop 16, no mixup; cpu, float32"
    assert report[4:9] == [
        "status      interrupted after 1.00e+39 of 1.00e+40 steps; --resume continues from the checkpoint of step 8",
        "skipped     2 of 5 lines of metrics.jsonl: not a step record of this run (the first: line 2)",
        "last step   1.00e+39: loss 1e+308, lr 1e+308, nan images/s",
        "validation  step 1.00e+39: top-1 0.5000, top-5 n/a, loss inf; best top-1 0.5000 at step 1.00e+39",
        "macro F1    1e+308 at step 1.00e+39 (1.00e+30 images)",
    ]


def test_step_numbers_agree_with_the_progress_lines(finished: Path) -> None:
    """A step's number is the same everywhere people read it: the progress line's k of "k/N steps" (k from 1)
    is the number that `bit report` gives the last step, the last validation and the best one (metrics.jsonl
    keeps the index from 0)."""
    progress = {int(k): float(top1) for k, top1 in
                re.findall(r"^(\d+)/8 steps  lr \S+  loss \S+  val top-1 (\S+)  top-5 n/a$",
                           (finished.parent / "stderr.txt").read_text(), flags=re.M)}  # fmt: skip
    validations = [m for m in read_metrics(finished) if "val_top1" in m]
    assert sorted(progress) == [m["step"] + 1 for m in validations] == [4, 8]
    assert list(progress.values()) == [round(m["val_top1"], 4) for m in validations]
    best = max(progress, key=lambda k: (progress[k], -k))  # the first of the highest top-1
    code, out, err = run_main("report", finished)
    assert (code, err) == (0, "")
    assert re.search(rf"^validation  step 8: top-1 {progress[8]:.4f}, .*; best top-1 {progress[best]:.4f} at step "
                     rf"{best}$", out, flags=re.M), out  # fmt: skip
    assert "\nlast step   8: " in out and "\nmacro F1    " in out and " at step 8 (12 images)\n" in out


def test_a_damaged_plan_is_one_error_line(finished: Path, tmp_path: Path) -> None:
    run = copy_run(finished, tmp_path / "run")
    plan = json.loads((run / "finetune_config.json").read_text())
    (run / "finetune_config.json").write_text(json.dumps({**plan, "steps": "many"}))
    code, out, err = run_main("report", run)
    assert (code, out) == (1, "")
    assert err == (
        f"Error: {run / 'finetune_config.json'}: not the plan bit finetune writes "
        "(steps is not a whole number of at least 1); restore it\n"
    )


def test_a_run_without_pictures_is_told_how_to_get_them(finished: Path, interrupted: Path, tmp_path: Path) -> None:
    """The pictures are training's (drawn at every validation when matplotlib is there): report never draws."""
    done = copy_run(finished, tmp_path / "done", without=("curves.png", "confusion.png"))
    code, out, err = run_main("report", done)
    assert (code, err) == (0, "")
    assert out.splitlines()[-1] == (
        f"pictures    none: training draws them at every validation when matplotlib is installed ({INSTALL}); "
        f"`bit eval DATA --model {done} --plot confusion.png` draws a confusion matrix"
    )
    stopped = copy_run(interrupted, tmp_path / "stopped")
    for name in ("curves.png", "confusion.png"):
        (stopped / name).unlink()
    assert run_main("report", stopped)[1].splitlines()[-1] == (
        f"pictures    none: training draws them at every validation when matplotlib is installed ({INSTALL}); "
        "then --resume draws them at its next validation"
    )
    (stopped / "validation.json").unlink()
    assert run_main("report", stopped)[1].splitlines()[-1] == (
        "pictures    none yet (training draws them at the first validation)"
    )
    (done / "curves.png").write_bytes((finished / "curves.png").read_bytes())
    assert run_main("report", done)[1].splitlines()[-1] == f"pictures    {done / 'curves.png'}"
    assert not (done / "confusion.png").exists() and not (stopped / "curves.png").exists()


def test_a_picture_or_report_page_leading_outside_the_run_is_not_shown(finished: Path, tmp_path: Path) -> None:
    """`bit push`'s rule: only a regular file inside the run is shown or linked; a symlink to another file of
    the run is fine, one leading outside it is named with the reason, and a FIFO is refused unread."""
    run = copy_run(finished, tmp_path / "run", without=("curves.png", "confusion.png"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "curves.png").write_bytes((finished / "curves.png").read_bytes())
    (elsewhere / "index.html").write_text("<p>not the run's</p>")
    (run / "curves.png").symlink_to(elsewhere / "curves.png")
    (run / "mine.png").write_bytes((finished / "confusion.png").read_bytes())
    (run / "confusion.png").symlink_to("mine.png")  # another file of the run: shown
    (run / "report").mkdir()
    (run / "report" / "index.html").symlink_to(elsewhere / "index.html")
    outside = "{}: is a symlink to {}, outside {}; copy the file into the folder instead"
    code, out, err = run_main("report", run)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[-1] == (
        f"pictures    {run / 'confusion.png'}; not shown: "
        + outside.format(run / "curves.png", elsewhere / "curves.png", run)
    )
    assert lines[-2] == "  not shown: " + outside.format(run / "report/index.html", elsewhere / "index.html", run)
    assert "file://" not in out  # the page outside the run is not linked
    (run / "confusion.png").unlink()
    os.mkfifo(run / "confusion.png")
    assert (
        run_main("report", run)[1]
        .splitlines()[-1]
        .endswith(f"; not shown: {run / 'confusion.png'}: is a FIFO (named pipe), not a regular file")
    )


def test_a_missing_path_or_a_file_is_named_as_such(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "gone").symlink_to("nowhere")
    for path, says in [
        ("nope", "no such folder; pass the --output folder of a bit finetune run"),
        ("gone", "no such folder; pass the --output folder of a bit finetune run"),
        ("notes.txt", "is a file, not a run folder; pass the --output folder of a run"),
        (".", "holds no bit finetune run (finetune_config.json); pass the --output folder of a run"),
    ]:
        assert run_main("report", tmp_path / path) == (1, "", f"Error: {tmp_path / path}: {says}\n")


# ----------------------------------------------------------------------------------------------------------
# Run files that are no regular files, over-long lines, a damaged summary (review of issue 20)


def in_process_with_deadline(run: Path) -> tuple[int, str, str]:
    """run_main("report", run), failing the test instead of hanging when the report blocks (a FIFO) or
    never ends (/dev/zero): the report runs in a thread that must end within 60 s."""
    import threading

    result: list = []
    worker = threading.Thread(target=lambda: result.append(run_main("report", run)), daemon=True)
    worker.start()
    worker.join(60)
    assert result, "bit report did not end within 60 s"
    return result[0]


@pytest.mark.parametrize("kind", ["device", "fifo"])
def test_a_metrics_file_that_is_no_regular_file_is_refused(finished: Path, tmp_path: Path, kind: str) -> None:
    """It was read forever (a symlink to /dev/zero: 6.9 GB in 8 s) or blocked forever (a FIFO). A FIFO .lock
    and summary.json are not waited on either."""
    import os

    run = copy_run(finished, tmp_path / "run")
    (run / "metrics.jsonl").unlink()
    if kind == "device":
        (run / "metrics.jsonl").symlink_to("/dev/zero")
        what = "a character device"
    else:
        os.mkfifo(run / "metrics.jsonl")
        (run / "summary.json").unlink()
        os.mkfifo(run / "summary.json")
        os.mkfifo(run / ".lock")
        what = "a FIFO (named pipe)"
    code, out, err = in_process_with_deadline(run)
    assert (code, out) == (1, "")
    assert err == (
        f"Error: {run / 'metrics.jsonl'}: is {what}, not a regular file; restore the run's metrics.jsonl (or "
        "remove it)\n"
    )
    if kind == "fifo":  # without metrics.jsonl: the report, with the summary.json that is a FIFO named
        (run / "metrics.jsonl").unlink()
        code, out, err = in_process_with_deadline(run)
        assert (code, err) == (0, "")
        assert out.splitlines()[4] == (
            f"status      not finished cleanly: {run / 'summary.json'}: is a FIFO (named pipe), not a regular file; "
            "the run's end is not recorded, so its model is not known to be whole: train again with --overwrite"
        )


def test_an_over_long_metrics_line_is_one_skipped_line_never_held(finished: Path, tmp_path: Path) -> None:
    """A 200 MB run of NUL bytes (a sparse hole: nothing is written) in metrics.jsonl is one skipped line; the
    report process stays far under 150 MB (it held the whole line: a 300 MB one peaked at 629 MB)."""
    run = copy_run(finished, tmp_path / "run")
    with open(run / "metrics.jsonl", "wb") as f:
        f.write("".join(line + "\n" for line in GOOD[:4]).encode())
        f.seek(200 << 20, 1)  # a hole: it reads as NUL bytes
        f.write(("\n" + "".join(line + "\n" for line in GOOD[4:])).encode())
    done, result = report_in_a_process(run)
    assert result["code"] == 0, done.stderr
    assert result["peak_kib"] < 150 * 1024
    assert done.stdout.splitlines()[4:7] == [
        "status      finished",
        "skipped     1 of 9 lines of metrics.jsonl: not a step record of this run (the first: line 5)",
        "last step   8: loss 0.8000, lr 0.003, 107.0 images/s",
    ]


def test_a_damaged_summary_is_said_and_the_run_is_not_finished(finished: Path, tmp_path: Path) -> None:
    """It was taken for a finished run with its final metrics ("[1" is no JSON)."""
    run = copy_run(finished, tmp_path / "run")
    (run / "summary.json").write_text("[1")
    code, out, err = run_main("report", run)
    assert (code, err) == (0, "")
    report = out.splitlines()
    assert report[4] == (
        f"status      not finished cleanly: {run / 'summary.json'}: not valid JSON (Expecting ',' delimiter: line 1 "
        "column 3 (char 2)); the run's end is not recorded, so its model is not known to be whole: train again "
        "with --overwrite"
    )
    assert f"  {run / 'summary.json'}  cannot be read (see status)" in report
    assert "final metrics" not in out


def test_a_stop_after_a_steps_record_is_told_as_the_report_tells_it(dataset: Path, tmp_path: Path) -> None:
    """Ctrl-C while step 4's validation pictures are drawn (its metrics record written, its checkpoint not): the
    run says it stopped after step 4, as `bit report` counts it, and where --resume continues."""
    from bitcli.finetune.watch import Watch

    out, step = tmp_path / "run", Watch.step

    def stopped(self: Watch, record: dict, *args: object) -> None:
        if record["step"] == 3:
            raise KeyboardInterrupt
        step(self, record, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Watch, "step", stopped)
        code, err = train(dataset, out)
    assert code == 130, err
    assert [m["step"] for m in read_metrics(out)] == [0, 1, 2, 3] and "val_top1" in read_metrics(out)[3]
    assert err.splitlines()[-1] == (
        "stopped after step 4 (its checkpoint not yet written); `--resume` continues from the checkpoint of step 3"
    ), err
    code, report, err = run_main("report", out)
    assert code == 0, err
    assert "\nstatus      interrupted after 4 of 8 steps; --resume continues from the checkpoint of step 3\n" in report
