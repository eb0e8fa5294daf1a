"""The one pipeline (bitcli.pipeline) under predict, embed, eval, the undecodable-image scan and int8 calibration:
results in input order with failures in place, batches stacked by size, the torchrun-independent batch split,
a compute error raised at its batch's turn, and, through `bit predict`, the ordered rows of Report: streamed
as an in-order prefix (also when Ctrl-C stops the run), a repeated path computed once, the one failure text."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import run_main, save_hf_model

from bitcli import inputs, pipeline
from bitcli.errors import BitError
from bitcli.torch_engine import TorchEngine

CORRUPT = "; the file may be truncated or corrupt"  # preprocess.cannot_decode's advice, on every decoder's failure


def test_streamed_jsonl_is_an_in_order_prefix_when_interrupted(album, tiny_dir, monkeypatch):
    """jsonl on stdout streams every row as soon as the rows before it are done; Ctrl-C keeps that prefix."""
    calls = []
    real = TorchEngine.logits

    def logits(self, batch):
        calls.append(len(batch))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, batch)

    monkeypatch.setattr(TorchEngine, "logits", logits)
    args = ["first.png", "missing.jpg", "last.jpg", "first.png"]
    code, out, err = run_main("predict", *args, "--model", tiny_dir, "-f", "jsonl", "-b", "1", "--workers", "1")
    assert code == 130
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["path"] for r in rows] == ["first.png", "missing.jpg"]
    assert "predictions" in rows[0] and rows[1]["error"] == "missing.jpg: no such file or folder"
    assert err == (
        "error: missing.jpg: no such file or folder\n"
        "interrupted: 2 of 4 images done; the results above are complete for those\n"
    )
    assert calls == [1, 1]


@pytest.mark.parametrize("command", ["predict", "embed"])
def test_interrupted_run_into_a_file_names_the_file(album, tiny_dir, monkeypatch, command):
    """With --output, Ctrl-C's line says where the finished rows went (not "above": nothing was printed)."""
    calls = []

    def stop(real):
        def method(self, batch):
            calls.append(len(batch))
            if len(calls) == 2:
                raise KeyboardInterrupt
            return real(self, batch)

        return method

    monkeypatch.setattr(TorchEngine, "logits", stop(TorchEngine.logits))
    monkeypatch.setattr(TorchEngine, "features", stop(TorchEngine.features))
    args = ["first.png", "last.jpg", "first.png"]
    code, out, err = run_main(command, *args, "--model", tiny_dir, "-o", "out.jsonl", "-b", "1", "--workers", "1")
    assert (code, out) == (130, "")
    assert [json.loads(line)["path"] for line in Path("out.jsonl").read_text().splitlines()] == ["first.png"]
    assert err == "interrupted: 1 of 3 images done; the results written to out.jsonl are complete for those\n"


def test_repeated_path_is_decoded_once(album, tiny_dir, monkeypatch):
    decoded = []
    real = inputs.decode
    monkeypatch.setattr(
        inputs, "decode", lambda path, pre, downloads: decoded.append(path) or real(path, pre, downloads)
    )
    code, out, err = run_main("predict", "first.png", "last.jpg", "first.png", "--model", tiny_dir, "-f", "json")
    assert code == 0, err
    assert [r["path"] for r in json.loads(out)] == ["first.png", "last.jpg", "first.png"]
    assert sorted(decoded) == ["first.png", "last.jpg"]


def test_an_exception_without_a_message_still_names_its_type(album, tiny_dir, monkeypatch):
    """A decoder failure that is not bitcli's own becomes that image's error row, never an empty text."""
    real = inputs.decode

    def decode(path, pre, downloads):
        if path == "last.jpg":
            raise RuntimeError()  # str() is ""
        if path == "first.png":
            raise BitError("")
        return real(path, pre, downloads)

    monkeypatch.setattr(inputs, "decode", decode)
    shutil.copy(album / "first.png", album / "ok.png")
    code, out, err = run_main("predict", "first.png", "last.jpg", "ok.png", "--model", tiny_dir, "-f", "json")
    assert code == 1
    rows = json.loads(out)
    assert rows[:2] == [
        {"path": "first.png", "error": "first.png: BitError"},
        {"path": "last.jpg", "error": f"last.jpg: cannot decode image (RuntimeError){CORRUPT}"},
    ]
    assert len(rows[2]["predictions"]) == 5
    assert err == f"error: first.png: BitError\nerror: last.jpg: cannot decode image (RuntimeError){CORRUPT}\n"
    # a multi-line message stays one line
    assert pipeline.failure("a.png", ValueError("bad\n  header")) == (
        "a.png: cannot decode image (bad header); the file may be truncated or corrupt"
    )


def test_failed_names_are_literal_in_json_and_csv_and_visible_on_the_terminal(tmp_path, tiny_dir, monkeypatch):
    """A name holding an ESC or rich markup: JSON, JSONL and CSV carry it as is, in the path column and in the
    error text alike (PIL's failure and a decoder bug say the same), and the terminal shows it escaped."""
    (tmp_path / "[red]x[").mkdir()
    esc, mark = "e\x1b[31mx.png", "[red]x[/red].png"
    for name in (esc, mark):
        (tmp_path / name).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # a PNG signature, then nothing valid
    real = inputs.decode

    def decode(path, pre, downloads):
        if path == mark:
            raise OSError("bad header")  # as a decoder that is not PIL's would
        return real(path, pre, downloads)

    monkeypatch.setattr(inputs, "decode", decode)
    monkeypatch.chdir(tmp_path)
    errors = {
        esc: f"{esc}: not an image PIL can read (empty, corrupt or another format)",
        mark: f"{mark}: cannot decode image (bad header){CORRUPT}",
    }
    rows = [{"path": name, "error": errors[name]} for name in (esc, mark)]
    for fmt, expected in [
        ("json", json.dumps(rows, ensure_ascii=False, indent=2) + "\n"),
        ("jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)),
        (
            "csv",
            f'path,rank,label,index,score,error,image_label\n{esc},,,,,"{errors[esc]}",\n{mark},,,,,{errors[mark]},\n',
        ),
    ]:
        code, out, err = run_main("predict", esc, mark, "--model", tiny_dir, "-f", fmt)
        assert (code, out) == (1, expected), fmt
        assert err == "".join(f"error: {errors[n]}\n" for n in (esc, mark)).replace("\x1b", "\\u001b")
    assert "\x1b" in json.loads(run_main("predict", esc, "--model", tiny_dir, "-f", "json")[1])[0]["error"]
    monkeypatch.setenv("COLUMNS", "160")  # the table's width: each row on one line
    code, out, _ = run_main("predict", esc, mark, "--model", tiny_dir)
    assert code == 1 and "\x1b" not in out
    cells = [[c.strip() for c in line.split("│")[1:3]] for line in out.splitlines() if line.startswith("│")]
    assert cells == [[esc.replace("\x1b", "\\u001b"), "error: " + errors[esc].replace("\x1b", "\\u001b")],
                     [mark, f"error: {errors[mark]}"]]  # fmt: skip


@pytest.fixture(scope="module")
def uncropped_model(tmp_path_factory) -> Path:
    """A tiny model whose preprocessing keeps the aspect ratio (shortest edge 32, no crop)."""
    from conftest import BIT50_PREPROCESSOR, TINY_LABELS

    return save_hf_model(
        tmp_path_factory.mktemp("uncropped") / "model",
        {**BIT50_PREPROCESSOR, "size": {"shortest_edge": 32}, "do_center_crop": False},
        embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1], num_groups=8,
        id2label=dict(enumerate(TINY_LABELS)), label2id={n: i for i, n in enumerate(TINY_LABELS)},
    )  # fmt: skip


def test_uncropped_checkpoint_batches_equal_sizes(album, uncropped_model, monkeypatch):
    """Images of different shapes cannot stack: each batch holds one size, and batching changes no result."""
    from PIL import Image

    photo = Image.open(album / "first.png").convert("RGB")
    names = ["wide1.png", "tall1.png", "wide2.png", "tall2.png", "wide3.png"]
    for i, name in enumerate(names):
        size = (64, 40) if name.startswith("wide") else (40, 64)  # 51x32 and 32x51 after resizing
        photo.rotate(10 * i).resize(size).save(album / name)
    shapes = []
    real = TorchEngine.logits
    monkeypatch.setattr(TorchEngine, "logits", lambda self, batch: shapes.append(batch.shape) or real(self, batch))
    code, out, err = run_main("predict", *names, "--model", uncropped_model, "-f", "json", "-b", "4", "-k", "10")
    assert (code, err) == (0, "")
    assert shapes == [(2, 32, 51, 3), (2, 51, 32, 3), (1, 32, 51, 3)]  # chunks of 4, one batch per size
    together = json.loads(out)
    assert [r["path"] for r in together] == names
    code, out, err = run_main("predict", *names, "--model", uncropped_model, "-f", "json", "-b", "1", "-k", "10")
    for alone, batched in zip(json.loads(out), together):
        assert [p["index"] for p in alone["predictions"]] == [p["index"] for p in batched["predictions"]]
        assert [p["score"] for p in alone["predictions"]] == pytest.approx(
            [p["score"] for p in batched["predictions"]], abs=1e-5
        )


# ----------------------------------------------------------------------------------------------------------
# pipeline.run itself, on made-up images


def _image(ref: int) -> np.ndarray:
    """Image `ref`: 2x3 when ref is even, else 3x2, every pixel `ref`; refs from 90 on fail to decode."""
    if ref >= 90:
        raise BitError(f"image {ref}: cannot read it") if ref % 2 else ValueError("bad\n  header")
    return np.full((2, 3, 3) if ref % 2 == 0 else (3, 2, 3), ref, dtype=np.uint8)


def _first_pixels(batch: np.ndarray) -> list[int]:
    return [int(image[0, 0, 0]) for image in batch]


@pytest.mark.parametrize("workers", [0, 2])
def test_run_gives_every_input_in_order_with_failures_in_place(workers):
    computed: list[tuple[int, ...]] = []

    def compute(batch: np.ndarray) -> list[int]:
        computed.append(batch.shape)
        return _first_pixels(batch)

    refs = [1, 2, 91, 4, 3, 90, 6]
    batches = list(pipeline.run(refs, _image, compute, batch_size=4, workers=workers, name=lambda r: f"img{r}.png"))
    assert [len(b) for b in batches] == [4, 3]
    outcomes = [(o.ref, o.error, o.value) for b in batches for o in b]
    assert outcomes == [
        (1, None, 1), (2, None, 2), (91, "image 91: cannot read it", None), (4, None, 4),
        (3, None, 3), (90, f"img90.png: cannot decode image (bad header){CORRUPT}", None), (6, None, 6),
    ]  # fmt: skip
    # one compute call per image size within each batch, in the order the sizes first appear
    assert computed == [(1, 3, 2, 3), (2, 2, 3, 3), (1, 3, 2, 3), (1, 2, 3, 3)]
    assert [b.stacks for b in batches] == [[[0], [1, 3]], [[0], [2]]]


def test_run_without_compute_gives_the_decoded_images_and_advances_per_batch():
    done: list[int] = []
    batches = list(pipeline.run(range(5), _image, None, batch_size=2, workers=1, advance=done.append))
    assert done == [2, 2, 1] and all(b.stacks == [] for b in batches)
    assert [int(o.value[0, 0, 0]) for b in batches for o in b] == [0, 1, 2, 3, 4]


def test_a_compute_error_is_raised_at_its_batch_s_turn():
    def compute(batch: np.ndarray) -> list[int]:
        if 4 in _first_pixels(batch):
            raise BitError("the engine failed on image 4")
        return _first_pixels(batch)

    seen = []
    with pytest.raises(BitError, match="the engine failed on image 4"):
        for batch in pipeline.run(range(8), _image, compute, batch_size=2, workers=2):
            seen.append([o.value for o in batch])
    assert seen == [[0, 1], [2, 3]]  # the batches before it are delivered, nothing after it
