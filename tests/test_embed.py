"""`bit embed` end to end through the real CLI entry point (in this process): the vectors against transformers'
BitModel pooler output on real photos, in input order, in every output format; --normalize; head-less
checkpoints; failures; the format and flag checks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from conftest import BIT50_PREPROCESSOR, run_main, save_hf_model
from PIL import Image
from safetensors import safe_open

from bitcli.options import EmbedFormat, EmbedOptions, Precision

TINY_ARCH = {"embedding_size": 16, "hidden_sizes": [32, 64], "depths": [1, 1], "num_groups": 8}


def _peer(model_dir: Path, paths: list[Path]) -> np.ndarray:
    """transformers' answer: its PIL processor's pixels into BitModel, pooler_output flattened to [N, D]."""
    model = transformers.BitModel.from_pretrained(model_dir).eval()
    processor = transformers.BitImageProcessorPil.from_pretrained(model_dir)
    pixels = processor([Image.open(p) for p in paths], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return model(pixels).pooler_output.flatten(1).numpy()


def _assert_close(got: np.ndarray, expected: np.ndarray) -> None:
    """Every vector within 1e-4 of the peer's, relative (Euclidean norm of the difference over the norm of the
    vector), row by row. (Component by component the channels_last fp32 convolutions differ from the peer's
    channels-first ones by up to about 2e-4 of the largest component at 448 px: as far from float64 as they
    are from each other.)"""
    assert got.dtype == np.float32 and got.shape == expected.shape
    assert expected.std(axis=0).max() > 1e-3  # different images give different vectors: an order mix-up shows
    relative = np.linalg.norm(got - expected, axis=1) / np.linalg.norm(expected, axis=1)
    assert relative.max() <= 1e-4, relative


def _read_safetensors(path: Path) -> tuple[np.ndarray, list[str], list[dict]]:
    with safe_open(str(path), framework="np") as f:
        meta = f.metadata()
        assert f.keys() == ["embeddings"]
        return f.get_tensor("embeddings"), json.loads(meta["paths"]), json.loads(meta["errors"])


def _read_jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture()
def album(tmp_path, photos, monkeypatch) -> list[str]:
    """Five real photos named in an order that is not sorted, one of them twice, as relative paths."""
    monkeypatch.chdir(tmp_path)
    names = ["rocket.jpg", "chelsea.png", "coffee.png", "china.jpg", "astronaut.png"]
    for name in names:
        shutil.copy(photos[name], tmp_path / name)
    return [*names, "chelsea.png"]


def test_r50_vectors_equal_transformers_on_real_photos(bit50_dir, photos, tmp_path):
    """google/bit-50's layout and preprocessing (448 px), every test photo: the 2048-d pre-logits."""
    paths = list(photos.values())
    out = tmp_path / "emb.safetensors"
    code, stdout, err = run_main("embed", *paths, "--model", bit50_dir, "--output", out, "--device", "cpu", "-b", "3")
    assert (code, stdout, err) == (0, "", "")
    vectors, names, errors = _read_safetensors(out)
    assert names == [str(p) for p in paths] and errors == []
    assert vectors.shape == (len(paths), 2048)
    _assert_close(vectors, _peer(bit50_dir, paths))


def test_every_format_holds_the_same_vectors_in_input_order(tiny_dir, album):
    expected = _peer(tiny_dir, [Path(p) for p in album])
    base = ["embed", *album, "--model", tiny_dir, "-b", "2"]  # batches of two: the order crosses batches

    assert run_main(*base, "-o", "e.safetensors") == (0, "", "")
    vectors, names, errors = _read_safetensors(Path("e.safetensors"))
    assert (names, errors) == (album, [])
    _assert_close(vectors, expected)
    assert np.array_equal(vectors[1], vectors[5])  # the repeated photo: the same vector on both rows

    assert run_main(*base, "-o", "e.npy") == (0, "", "")
    npy = np.load("e.npy", allow_pickle=False)
    assert Path("e.paths.txt").read_text() == "".join(p + "\n" for p in album)
    assert np.array_equal(npy, vectors)  # the same float32 values, bit for bit

    assert run_main(*base, "-o", "e.jsonl") == (0, "", "")
    rows = _read_jsonl(Path("e.jsonl").read_text())
    assert [r["path"] for r in rows] == album
    assert np.array_equal(
        np.array([r["embedding"] for r in rows], dtype=np.float32), vectors
    )  # JSON keeps them exactly

    code, stdout, err = run_main(*base, "-f", "jsonl")
    assert (code, err) == (0, "")
    assert stdout == Path("e.jsonl").read_text()


def test_normalize_gives_unit_vectors_in_the_same_direction(tiny_dir, album):
    expected = _peer(tiny_dir, [Path(p) for p in album])
    assert run_main("embed", *album, "--model", tiny_dir, "--normalize", "-o", "n.npy") == (0, "", "")
    got = np.load("n.npy", allow_pickle=False)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6, rtol=0)
    _assert_close(got, expected / np.linalg.norm(expected, axis=1, keepdims=True))


def test_headless_checkpoint_gives_features(album, tmp_path):
    """A features-only checkpoint (BiT-M upstream) has no head to classify with, but its features are the point."""
    folder = save_hf_model(tmp_path / "headless", {**BIT50_PREPROCESSOR, "size": {"shortest_edge": 32},
                           "crop_size": {"height": 32, "width": 32}}, num_labels=0, **TINY_ARCH)  # fmt: skip
    assert run_main("predict", album[0], "--model", folder)[0] == 1  # predict refuses it ...
    code, _, err = run_main("embed", *album, "--model", folder, "-o", "h.safetensors")
    assert (code, err) == (0, "")  # ... embed does not
    vectors, names, _ = _read_safetensors(Path("h.safetensors"))
    assert names == album
    _assert_close(vectors, _peer(folder, [Path(p) for p in album]))


def test_bad_inputs_are_listed_and_the_others_embedded(tiny_dir, album):
    Path("broken.jpg").write_bytes(Path("rocket.jpg").read_bytes()[:300])  # a header, then nothing
    args = ["embed", "chelsea.png", "broken.jpg", "coffee.png", "gone.png", "--model", tiny_dir]
    good = ["chelsea.png", "coffee.png"]
    expected = _peer(tiny_dir, [Path(p) for p in good])
    code, out, _ = run_main("predict", *args[1:], "-f", "json")  # exactly the errors predict gives
    errors = [row["error"] for row in json.loads(out) if "error" in row]
    assert (
        code == 1
        and errors[0].startswith("broken.jpg: cannot decode image (")
        and errors[1] == "gone.png: no such file or folder"
    )
    stderr = "".join(f"error: {e}\n" for e in errors)

    assert run_main(*args, "-o", "b.safetensors") == (1, "", stderr)
    vectors, names, listed = _read_safetensors(Path("b.safetensors"))
    assert names == good
    assert listed == [{"path": "broken.jpg", "error": errors[0]}, {"path": "gone.png", "error": errors[1]}]
    _assert_close(vectors, expected)

    assert run_main(*args, "-o", "b.npy") == (1, "", stderr)
    assert Path("b.paths.txt").read_text().splitlines() == good
    assert np.array_equal(np.load("b.npy", allow_pickle=False), vectors)

    code, out, err = run_main(*args, "-f", "jsonl")
    assert (code, err) == (1, stderr)
    rows = _read_jsonl(out)
    assert [r.get("error") for r in rows] == [None, errors[0], None, errors[1]]
    assert np.array_equal(np.array([rows[0]["embedding"], rows[2]["embedding"]], dtype=np.float32), vectors)


def test_npy_refuses_a_path_with_a_line_break_before_running(tiny_dir, album):
    """FILE.paths.txt lists one path per line: a name holding a line break would read as two paths."""
    for name in ("two\nlines.png", "carriage\rreturn.png", "para\u2029graph.png"):
        shutil.copy("chelsea.png", name)
        code, out, err = run_main("embed", "coffee.png", name, "--model", "no/such-model", "-o", "x.npy")
        assert (code, out) == (2, "")
        assert (
            err.startswith("Error: ")
            and "x.paths.txt could not list it one per line; write .safetensors or .jsonl" in err
        )
        assert err.count("\n") == 1
        assert not Path("x.npy").exists() and not Path("x.paths.txt").exists()
    # the JSON formats keep such a name exactly
    assert run_main("embed", "two\nlines.png", "--model", tiny_dir, "-o", "ok.safetensors")[0] == 0
    assert _read_safetensors(Path("ok.safetensors"))[1] == ["two\nlines.png"]


def test_npy_and_its_paths_are_written_together_or_not_at_all(tiny_dir, album, monkeypatch):
    """FILE.npy without FILE.paths.txt (or beside an older one) could not be read right. A folder named
    FILE.paths.txt is refused before the model loads (exit 2); should the paths still fail to be written
    (the folder appearing during the run), the old FILE.npy stays and no temporary file is left."""
    import bitcli.cli

    Path("p.npy").write_bytes(b"an older array")
    Path("p.paths.txt").mkdir()
    before = sorted(p.name for p in Path().iterdir())
    assert run_main("embed", "chelsea.png", "--model", tiny_dir, "-o", "p.npy") == (
        2, "", "Error: --output p.npy: its paths go to p.paths.txt, which is a folder; give a file name\n",
    )  # fmt: skip
    monkeypatch.setattr(bitcli.cli, "check_embed_output", lambda fmt, output: None, raising=False)
    code, out, err = run_main("embed", "chelsea.png", "--model", tiny_dir, "-o", "p.npy")
    assert (code, out) == (1, "") and err == (
        "Error: p.paths.txt: cannot write it (Is a directory); nothing was written: p.npy and p.paths.txt are as "
        "they were\n"
    )
    assert Path("p.npy").read_bytes() == b"an older array" and Path("p.paths.txt").is_dir()
    assert sorted(p.name for p in Path().iterdir()) == before


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "give --output FILE (.safetensors, .npy or .jsonl), or -f jsonl to write JSON lines to stdout"),
        (["-f", "npy"], "--format npy is binary; give --output FILE (only jsonl goes to stdout)"),
        (["-o", "e.bin"], "--output e.bin: name the file *.safetensors, *.npy or *.jsonl, or give --format"),
        (
            ["-o", "e.npy", "-f", "jsonl"],
            "--format jsonl contradicts --output e.npy (a .npy file holds npy); drop --format or give the file a name that matches",
        ),
    ],
)
def test_output_choices_are_checked_before_anything_runs(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    assert run_main("embed", "x.jpg", "--model", "no/such-model", *args) == (2, "", f"Error: {message}\n")
    assert list(tmp_path.iterdir()) == []


def test_embed_gets_typed_options_by_keyword(monkeypatch):
    from bitcli.commands import embed

    seen = []
    monkeypatch.setattr(embed, "run", lambda opts: seen.append(opts) or 0)
    args = ["a.jpg", "b", "-m", "m", "--revision", "v1", "-b", "8", "--device", "CUDA:1", "--precision", "BF16",
            "-o", "out.bin", "-f", "NPY", "--normalize", "-r", "--workers", "0"]  # fmt: skip
    assert run_main("embed", *args) == (0, "", "")
    assert run_main("embed", "x.jpg", "-o", "e.Safetensors") == (0, "", "")
    assert seen == [
        EmbedOptions(
            images=["a.jpg", "b"],
            model="m",
            revision="v1",
            batch_size=8,
            device="cuda:1",
            precision=Precision.bf16,
            format=EmbedFormat.npy,
            output=Path("out.bin"),
            normalize=True,
            recursive=True,
            workers=0,
        ),
        EmbedOptions(images=["x.jpg"], format=EmbedFormat.safetensors, output=Path("e.Safetensors")),
    ]
