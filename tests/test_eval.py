"""`bit eval`: top-1/top-5, per-class accuracy and confusion matrix, as a table or one JSON object."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_main, write_folder

from bitcli.metrics import OTHER


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data root with train/ and val/, the fine-tuned run folder)."""
    from bitcli.commands.finetune import run
    from bitcli.hyperrule import resolution_for_crop
    from bitcli.options import FinetuneOptions

    root = tmp_path_factory.mktemp("eval")
    write_folder(root / "data" / "train", {"red": 10, "green": 10, "blue": 10})
    write_folder(root / "data" / "val", {"red": 5, "green": 4, "blue": 3}, seed=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(FinetuneOptions(data=root / "data", model="tiny", output=root / "run", random_init=True, steps=12,
                            batch_size=8, resolution=resolution_for_crop(16), lr=0.03, eval_every=0, workers=1))  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    return root / "data", root / "run"


@pytest.fixture
def cli():
    """Run the real `bit` entry point in this process: (exit code, stdout, stderr)."""
    return run_main


def test_eval_json_is_one_object_and_agrees_with_finetune(trained: tuple[Path, Path], cli) -> None:
    data, run = trained
    code, out, err = cli("eval", data / "val", "--model", run, "--format", "json", "--device", "cpu")
    assert (code, err) == (0, "")
    result = json.loads(out)  # the whole of stdout is one JSON object
    assert list(result) == ["top1", "top5", "loss", "nll", "ece", "count", "per_class", "precision", "recall", "f1",
                            "macro_f1", "balanced_accuracy", "confusion", "labels", "other", "reliability",
                            "temperature", "tta"]  # fmt: skip
    assert result["labels"] == ["blue", "green", "red"] and result["other"] is None  # no catch-all column
    confusion = np.array(result["confusion"])
    assert confusion.shape == (3, 3) and confusion.sum() == result["count"] == 12
    assert confusion.sum(axis=1).tolist() == [3, 4, 5]  # rows are the true classes
    assert result["top1"] == pytest.approx(np.trace(confusion) / 12)
    for i, name in enumerate(result["labels"]):
        assert result["per_class"][name] == pytest.approx(confusion[i, i] / confusion[i].sum())
    assert result["top5"] is None  # three classes: the top five would always hold the answer
    summary = json.loads((run / "summary.json").read_text())  # finetune's final validation, same images
    assert result["top1"] == summary["val_top1"]
    assert result["top5"] == summary["val_top5"]
    assert result["loss"] == pytest.approx(summary["val_loss"], rel=1e-6)
    stored = json.loads((run / "validation.json").read_text())  # what `bit report` draws confusion.png from
    assert {k: stored[k] for k in ("confusion", "labels", "precision", "f1", "macro_f1")} == {
        k: result[k] for k in ("confusion", "labels", "precision", "f1", "macro_f1")
    }


def test_eval_table_and_split_layout(trained: tuple[Path, Path], cli) -> None:
    data, run = trained
    code, out, err = cli("eval", data / "val", "--model", run, "--format", "json")
    assert (code, err) == (0, "")
    result = json.loads(out)
    code, table, err = cli("eval", data, "--model", run)  # DATA/train + DATA/val: the val split is evaluated
    assert (code, err) == (0, f"evaluating the validation split {data / 'val'}\n")
    lines = table.splitlines()
    assert lines[:4] == [
        "images  12",
        f"top-1   {result['top1']:.4f}",
        "top-5   n/a (the model has 5 classes or fewer)",
        f"loss    {result['loss']:.4f}",
    ]
    assert "per-class top-1" in table and "confusion matrix (rows: true class, columns: predicted class)" in table
    cells = [[c.strip() for c in line.strip("│").split("│")] for line in lines if line.startswith("│")]
    counts = {"blue": 3, "green": 4, "red": 5}
    assert cells[:3] == [[name, f"{result['per_class'][name]:.4f}", str(counts[name]), f"{result['precision'][name]:.4f}",
                          f"{result['f1'][name]:.4f}"] for name in ("blue", "green", "red")]  # fmt: skip
    assert cells[3:] == [[name, *map(str, row)] for name, row in zip(result["labels"], result["confusion"])]


def test_eval_subset_of_classes(trained: tuple[Path, Path], tmp_path: Path, cli) -> None:
    """A folder with some of the model's classes: columns are those classes in the model's order, then
    (other) for predictions of a class the folder lacks. Checked against the full evaluation of the same
    images: green's images, and red's and blue's images all filed under red."""
    data, run = trained
    full = json.loads(cli("eval", data / "val", "--model", run, "--format", "json")[1])
    blue, green, red = (np.array(row) for row in full["confusion"])  # columns: predicted blue, green, red
    shutil.copytree(data / "val" / "green", tmp_path / "two" / "green")
    shutil.copytree(data / "val" / "red", tmp_path / "two" / "red")
    for f in (data / "val" / "blue").iterdir():
        shutil.copy(f, tmp_path / "two" / "red" / f"blue-{f.name}")
    code, out, err = cli("eval", tmp_path / "two", "--model", run, "--format", "json")
    assert (code, err) == (0, "")
    result = json.loads(out)
    wrong_red = red + blue
    assert blue[0] > 0  # the model does predict blue: the (other) column is exercised
    assert result["labels"] == ["green", "red", OTHER]  # in the model's label order, then (other)
    assert result["confusion"] == [
        [green[1], green[2], green[0]],
        [wrong_red[1], wrong_red[2], wrong_red[0]],
        [0, 0, 0],
    ]
    assert result["count"] == 12
    assert result["per_class"] == {"green": green[1] / 4, "red": wrong_red[2] / 8}
    assert result["top1"] == (green[1] + wrong_red[2]) / 12


def test_eval_errors(trained: tuple[Path, Path], tmp_path: Path, cli) -> None:
    data, run = trained
    write_folder(tmp_path / "zoo", {"red": 1, "zebra": 1})
    code, out, err = cli("eval", tmp_path / "zoo", "--model", run)
    assert code == 1 and out == "" and "class 'zebra' is not a label of" in err
    assert err == (
        f"Error: {tmp_path / 'zoo' / 'zebra'}: class 'zebra' is not a label of {run} ('blue', 'green', 'red'); "
        "name the class folders after the model's labels (the full name, or its first name when unique) or class indices\n"
    )
    code, _, err = cli("eval", data / "val", "--model", run, "--format", "xml")
    assert code == 2 and "--format" in err and "'xml' is not one of 'table', 'json'" in err  # click checks the choice
    (tmp_path / "nosplit" / "train").mkdir(parents=True)
    code, _, err = cli("eval", tmp_path / "nosplit", "--model", run)
    assert (
        code == 1
        and err
        == f"Error: {tmp_path / 'nosplit'}: has train/ but no val/, valid/ or validation/; pass the folder to evaluate\n"
    )


def test_eval_runs_the_model_through_the_engine(trained: tuple[Path, Path], cli, monkeypatch) -> None:
    """On a CPU too, eval's batches go through the one engine (channels_last, inference mode), and the
    batch size changes nothing but speed."""
    from bitcli.torch_engine import TorchEngine

    data, run = trained
    whole = json.loads(cli("eval", data / "val", "--model", run, "--format", "json", "--device", "cpu")[1])
    seen = []
    logits = TorchEngine.logits

    def spy(self: TorchEngine, batch: np.ndarray) -> torch.Tensor:
        out = logits(self, batch)
        seen.append((len(batch), self.channels_last, self.device.type, out.is_inference(), self.model.training))
        return out

    monkeypatch.setattr(TorchEngine, "logits", spy)
    code, out, err = cli(
        "eval", data / "val", "--model", run, "--format", "json", "--device", "cpu", "-b", "5", "--workers", "0"
    )
    assert (code, err) == (0, "")
    assert seen == [(5, True, "cpu", True, False)] * 2 + [(2, True, "cpu", True, False)]
    result = json.loads(out)
    for key in ("loss", "nll", "ece"):  # sums of floats in another order
        assert result.pop(key) == pytest.approx(whole.pop(key), rel=1e-6), key
    got, want = result.pop("reliability"), whole.pop("reliability")
    for a, b in zip(got.pop("confidence"), want.pop("confidence"), strict=True):  # None: an empty bin
        assert a == b if b is None else a == pytest.approx(b, rel=1e-6)
    assert got == want
    assert result == whole


def test_imagenet_folders_by_index_or_first_name(bit50_dir: Path, tmp_path: Path, cli) -> None:
    """A 1000-class model: folder "1" is class 1 (goldfish), "tabby" is "tabby, tabby cat" (281); the loss
    shows that each image was scored against that class."""
    import transformers
    from PIL import Image

    write_folder(tmp_path / "data", {"tabby": 1, "1": 1})
    code, out, err = cli("eval", tmp_path / "data", "--model", bit50_dir, "--format", "json", "--device", "cpu")
    assert (code, err) == (0, "")
    result = json.loads(out)
    assert result["labels"][:2] == ["1", "tabby"] and result["count"] == 2 and result["top5"] is not None
    model = transformers.BitForImageClassification.from_pretrained(bit50_dir).eval()
    processor = transformers.BitImageProcessorPil.from_pretrained(bit50_dir)
    paths = [tmp_path / "data" / "1" / "000.png", tmp_path / "data" / "tabby" / "000.png"]
    with torch.no_grad():
        peer = model(processor([Image.open(p) for p in paths], return_tensors="pt")["pixel_values"]).logits
    assert model.config.id2label[281] == "tabby, tabby cat"
    assert result["loss"] == pytest.approx(
        torch.nn.functional.cross_entropy(peer, torch.tensor([1, 281])).item(), rel=1e-4
    )


def test_ambiguous_folder_name_is_refused_listing_the_candidates(bit50_dir: Path, tmp_path: Path, cli) -> None:
    """ImageNet has two "crane"s (the bird, 134, and the machine, 517): the folder is refused, not guessed."""
    write_folder(tmp_path / "birds", {"crane": 1, "goldfish": 1})
    code, out, err = cli("eval", tmp_path / "birds", "--model", bit50_dir, "--device", "cpu")
    assert (code, out) == (1, "")
    assert err == (
        f"Error: {tmp_path / 'birds' / 'crane'}: class 'crane' is ambiguous: 2 labels of {bit50_dir} match it "
        "(134 'crane', 517 'crane'); name the folder by the class index instead, e.g. '134'\n"
    )
    (tmp_path / "birds" / "crane").rename(tmp_path / "birds" / "517")
    code, out, err = cli("eval", tmp_path / "birds", "--model", bit50_dir, "--device", "cpu", "--format", "json")
    assert (code, err) == (0, "") and json.loads(out)["labels"][:2] == ["goldfish", "517"]


def test_ctrl_c_during_eval_says_how_far_it_got(trained: tuple[Path, Path], tmp_path: Path) -> None:
    """Ctrl-C in a terminal (progress bar and decode threads running): exit 130 and one line, no traceback."""
    import os
    import pty
    import re
    import signal
    import subprocess
    import sys
    import threading
    import time

    from PIL import Image

    _, run = trained
    big = tmp_path / "big.png"  # slow to decode: the pass takes many seconds, Ctrl-C comes after a few images
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (1200, 1200, 3), dtype=np.uint8)).save(big)
    for c in ("red", "green"):
        (tmp_path / "many" / c).mkdir(parents=True)
        for i in range(200):
            (tmp_path / "many" / c / f"{i:03d}.png").symlink_to(big)
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bitcli", "eval", str(tmp_path / "many"), "--model", str(run), "--batch-size", "2", "--workers", "1"],
        stdout=subprocess.PIPE, stderr=slave, env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "120", "TERM": "xterm"},
        # Ctrl-C as in a terminal (a shell may start background jobs with SIGINT ignored; children inherit that).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    os.close(slave)
    chunks: list[bytes] = []

    def read_terminal() -> None:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=read_terminal, daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while not re.search(rb"\b[1-9]\d*/400\b", b"".join(chunks)) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)  # until the bar shows images done
    proc.send_signal(signal.SIGINT)
    out = proc.stdout.read()
    code = proc.wait(timeout=60)
    reader.join(timeout=10)
    os.close(master)
    err = b"".join(chunks).decode("utf-8", "replace")
    assert code == 130, err
    done = re.findall(r"interrupted: (\d+) of 400 images done; accuracy is reported only for a whole pass", err)
    assert len(done) == 1 and 0 < int(done[0]) < 400, err
    assert "Traceback" not in err and "Error" not in err and out == b""
