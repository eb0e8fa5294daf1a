"""An output that is one of the command's inputs (the same file, also through a symlink) or lies inside eval's
DATA folder is refused with exit 2 and one line, before any work, and the input is left as it was; convert's
SRC == DST (rewriting a model file in place) still works."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import run_main, write_folder


@pytest.fixture()
def work(tmp_path, monkeypatch, photos) -> Path:
    monkeypatch.chdir(tmp_path)
    shutil.copy(photos["chelsea.png"], tmp_path / "a.png")
    write_folder(tmp_path / "data", {"apple": 2, "banana": 2})
    return tmp_path


def _refused(args: list, kept: Path, message: str) -> None:
    before = kept.read_bytes()
    code, out, err = run_main(*args)
    assert (code, out) == (2, ""), err
    assert err == f"Error: {message}\n"
    assert kept.read_bytes() == before


@pytest.mark.parametrize("command", [["predict"], ["embed", "-f", "jsonl"]])
def test_output_that_is_an_input_image_is_refused(work, tiny_dir, command):
    _refused(
        [*command, "a.png", "-m", tiny_dir, "-o", "a.png"],
        work / "a.png",
        "--output a.png: is the input a.png; writing there would replace it, so choose another file",
    )


def test_output_symlink_to_an_input_found_in_a_folder_is_refused(work, tiny_dir):
    os.symlink("data/banana/001.png", "out.csv")
    _refused(
        ["predict", "data", "--recursive", "-m", tiny_dir, "-o", "out.csv"],
        work / "data" / "banana" / "001.png",
        "--output out.csv: is the input data/banana/001.png; writing there would replace it, so choose another file",
    )


def test_embed_paths_file_that_is_an_input_is_refused(work, tiny_dir):
    os.symlink("a.png", "e.paths.txt")  # e.npy's paths would be written through the link into the image
    _refused(
        ["embed", "a.png", "-m", tiny_dir, "-o", "e.npy"],
        work / "a.png",
        "--output e.npy: its paths file e.paths.txt: is the input a.png; writing there would replace it, "
        "so choose another file",
    )
    assert not Path("e.npy").exists()


@pytest.mark.parametrize("plot", ["data/apple/000.png", "data/new.png", "data/../data/banana/x.png"])
def test_eval_plot_inside_the_data_folder_is_refused(work, tiny_dir, plot):
    _refused(
        ["eval", "data", "-m", tiny_dir, "--plot", plot],
        work / "data" / "apple" / "000.png",
        f"--plot {plot}: is inside the data folder data (DATA), where it would be taken for an image of the "
        "data set, or replace one; choose a file outside it",
    )
    assert sorted(p.name for p in (work / "data").rglob("*")) == sorted(
        ["apple", "banana", "000.png", "001.png", "000.png", "001.png"]
    )


def test_eval_plot_s_reliability_diagram_linked_into_the_data_is_refused(work, tiny_dir):
    os.symlink("data/apple/000.png", "z-reliability.png")  # --plot z.png writes z-reliability.png beside it
    _refused(
        ["eval", "data", "-m", tiny_dir, "--plot", "z.png"],
        work / "data" / "apple" / "000.png",
        "--plot z-reliability.png: is inside the data folder data (DATA), where it would be taken for an image of "
        "the data set, or replace one; choose a file outside it",
    )
    assert not Path("z.png").exists()


@pytest.mark.parametrize(("plot", "replaced"), [("lab.png", "labels.csv"), ("img.png", "./img.png")])
def test_eval_plot_over_a_label_file_or_its_images_is_refused(work, tiny_dir, plot, replaced):
    Path("labels.csv").write_text("path,label\ndata/apple/000.png,apple\nimg.png,banana\n")
    shutil.copy("data/banana/000.png", "img.png")
    os.symlink("labels.csv", "lab.png")  # a picture written through this link would replace the label file
    _refused(
        ["eval", "labels.csv", "-m", tiny_dir, "--plot", plot],
        work / replaced,
        f"--plot {plot}: is the input {replaced}; writing there would replace it, so choose another file",
    )


def test_convert_in_place_still_works(work, tiny_dir):
    assert run_main("convert", tiny_dir, "m.safetensors")[0] == 0
    code, _, err = run_main("convert", "m.safetensors", "m.safetensors", "--overwrite")
    assert code == 0, err
    code, out, err = run_main("predict", "a.png", "-m", "m.safetensors", "-f", "csv")
    assert (code, err) == (0, "")
    assert out.startswith("path,rank,label,index,score,error,image_label\na.png,1,")
