"""The page machinery (bitcli.pages): a page folder's write rules (never a file bitcli did not write), escaping,
and the heat-map overlay drawn on the model's view of the image."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bitcli.errors import BitError
from bitcli.pages.folder import (
    EVAL_REPORT,
    EXPLAIN,
    MARKER,
    PageFolder,
    listed,
    refusal,
    remove_page_folder,
    write_page_folder,
)
from bitcli.pages.html import document, element, text
from bitcli.pages.pictures import CUT_OFF_WEIGHT, HEAT_WEIGHT, JET, colorize, fit, overlay
from bitcli.preprocess import Preprocess

HOSTILE = '<img src=x onerror="window.__pwned=1">'


def test_a_new_or_empty_folder_takes_a_page_and_a_foreign_one_is_refused(tmp_path: Path) -> None:
    assert refusal(tmp_path / "new" / "report") is None
    (tmp_path / "empty").mkdir()
    assert refusal(tmp_path / "empty") is None
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    assert refusal(tmp_path / "mine") == (
        "holds 'notes.txt', which bitcli did not write; give a new or empty folder, or the folder of an earlier report"
    )
    with pytest.raises(BitError, match=r"notes\.txt"):
        write_page_folder(tmp_path / "mine", {"index.html": b"x"}, "test")
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]  # nothing written
    (tmp_path / "file").write_text("x")
    assert refusal(tmp_path / "file") == "is not a folder; give a folder name"
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / MARKER).write_text('{"format": "something else", "files": ["a"]}')
    assert refusal(tmp_path / "fake") is not None  # a marker of another format is no page of bitcli's


def test_a_rerun_replaces_only_what_bitcli_wrote(tmp_path: Path) -> None:
    folder = tmp_path / "report"
    write_page_folder(folder, {"index.html": b"one", "images/1.jpg": b"a", "images/2.jpg": b"b", "x.csv": b"1"}, "t")
    assert listed(folder) == ["index.html", "images/1.jpg", "images/2.jpg", "x.csv"]
    (folder / "notes.txt").write_text("the user's")  # added by the user: stays, and does not block a rerun
    (folder / "images" / "mine.jpg").write_text("the user's too")
    (folder / "x.csv").unlink()
    (folder / "x.csv").symlink_to(tmp_path / "elsewhere.csv")  # a link put in place of bitcli's file: kept
    (folder / ".index.html.abcd1234.tmp").write_text("a killed write")
    assert refusal(folder) is None
    write_page_folder(folder, {"index.html": b"two", "images/1.jpg": b"c"}, "t")
    assert (folder / "index.html").read_bytes() == b"two" and (folder / "images" / "1.jpg").read_bytes() == b"c"
    assert not (folder / "images" / "2.jpg").exists()  # the earlier page's file that this one lacks
    assert (folder / "notes.txt").read_text() == "the user's" and (folder / "images" / "mine.jpg").exists()
    assert (folder / "x.csv").is_symlink()
    assert not (folder / ".index.html.abcd1234.tmp").exists()
    assert listed(folder) == ["index.html", "images/1.jpg"]


def test_a_page_replaces_the_earlier_one_only_once_every_new_file_is_on_disk(tmp_path: Path, monkeypatch) -> None:
    """Every new file is synced before the first of them is renamed into place; the renames follow one another
    with nothing between them, and the folders are synced after the last."""
    folder = tmp_path / "report"
    names = ["index.html", "errors.csv", *(f"images/{i:05d}.jpg" for i in range(1, 6))]
    write_page_folder(folder, dict.fromkeys(names, b"old"), EVAL_REPORT)
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: str, dst: str) -> None:
        events.append(("rename", os.path.realpath(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_page_folder(folder, dict.fromkeys(names, b"new"), EVAL_REPORT)
    real = Path(os.path.realpath(folder))
    renamed = [i for i, (kind, path) in enumerate(events) if kind == "rename" and not path.endswith(MARKER)]
    first, last = renamed[0], renamed[-1]
    assert [events[i][1] for i in renamed] == [str(real / name) for name in names]
    assert last - first == len(names) - 1  # one burst of renames
    synced = [Path(path) for kind, path in events[:first] if kind == "fsync" and path.endswith(".tmp")]
    synced_for = {p.parent / re.sub(r"^\.(.*)\.[a-z0-9_]{8}\.tmp$", r"\1", p.name) for p in synced}
    assert synced_for - {real / MARKER} == {real / name for name in names}  # (the marker: written first)
    assert {("fsync", str(real)), ("fsync", str(real / "images"))} <= set(events[last:])
    assert {name: (folder / name).read_bytes() for name in names} == dict.fromkeys(names, b"new")


def test_a_page_that_cannot_be_written_whole_leaves_the_earlier_one_whole(tmp_path: Path) -> None:
    """A folder where the new page's third picture goes: no file of the earlier page is replaced (one line says
    so), no temporary file is left, and a rerun once the folder is gone writes the page."""
    folder = tmp_path / "report"
    names = ["index.html", *(f"images/{i:05d}.jpg" for i in range(1, 6))]
    write_page_folder(folder, dict.fromkeys(names, b"old"), EVAL_REPORT)
    (folder / "images" / "00003.jpg").unlink()
    (folder / "images" / "00003.jpg").mkdir()
    with pytest.raises(BitError) as caught:
        write_page_folder(folder, dict.fromkeys(names, b"new"), EVAL_REPORT)
    assert str(caught.value) == (
        f"{folder / 'images' / '00003.jpg'}: cannot write it (Is a directory); nothing was written: the 6 files are "
        "as they were"
    )
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) == sorted(
        [MARKER, "images", "images/00003.jpg", *(n for n in names if n != "images/00003.jpg")]
    )
    assert {n: (folder / n).read_bytes() for n in names if n != "images/00003.jpg"} == {
        n: b"old" for n in names if n != "images/00003.jpg"
    }
    (folder / "images" / "00003.jpg").rmdir()
    write_page_folder(folder, dict.fromkeys(names, b"new"), EVAL_REPORT)
    assert {n: (folder / n).read_bytes() for n in names} == dict.fromkeys(names, b"new")


def test_a_marker_naming_paths_outside_the_folder_removes_nothing_there(tmp_path: Path) -> None:
    folder = tmp_path / "report"
    folder.mkdir()
    (tmp_path / "precious.txt").write_text("keep")
    (folder / MARKER).write_text(json.dumps({"format": "bitcli-page/1", "files": ["../precious.txt", "/etc/x"]}))
    write_page_folder(folder, {"index.html": b"x"}, "t")
    remove_page_folder(folder)
    assert (tmp_path / "precious.txt").read_text() == "keep"
    assert not folder.exists()  # only bitcli's files were in it


def test_remove_page_folder_keeps_the_user_s_files(tmp_path: Path) -> None:
    folder = tmp_path / "report"
    write_page_folder(folder, {"index.html": b"x", "images/1.jpg": b"a"}, "t")
    (folder / "notes.txt").write_text("the user's")
    remove_page_folder(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "index.html").write_text("not bitcli's")
    remove_page_folder(tmp_path / "foreign")
    assert (tmp_path / "foreign" / "index.html").exists()


def test_a_page_folder_lists_its_planned_files_before_writing_them(tmp_path: Path) -> None:
    """A kill after the first marker leaves a folder the next run takes back, with every bitcli file listed."""
    page = PageFolder(tmp_path / "out", "t", ["a.png", "b.png", "rows.jsonl"])
    assert listed(tmp_path / "out") == ["a.png", "b.png", "rows.jsonl"]
    page.write("a.png", b"1")
    with pytest.raises(ValueError, match="not a planned file"):
        page.write("c.png", b"2")
    assert refusal(tmp_path / "out") is None  # "killed" here
    page.finish()
    assert listed(tmp_path / "out") == ["a.png"]


def test_a_subfolder_replaced_by_a_link_is_never_written_or_emptied_through(tmp_path: Path) -> None:
    """images/ made a link to a folder of the user's: a rerun is refused (one line) and removing the page
    leaves every file there as it was, the ones named like the page's pictures too."""
    folder, theirs = tmp_path / "report", tmp_path / "my-photos"
    write_page_folder(folder, {"index.html": b"x", "images/00001.jpg": b"a", "images/00002.jpg": b"b"}, EVAL_REPORT)
    theirs.mkdir()
    for name in ("00001.jpg", "00002.jpg", "holiday.jpg"):
        (theirs / name).write_bytes(b"the user's " + name.encode())
    for p in (folder / "images").iterdir():
        p.unlink()
    (folder / "images").rmdir()
    (folder / "images").symlink_to(theirs)
    reason = (
        "its subfolder 'images' is a link, which bitcli neither writes nor removes through; replace the link "
        "by a folder or give another folder"
    )
    assert refusal(folder, EVAL_REPORT) == reason
    for pictures in ({"images/00001.jpg": b"new"}, {}):  # the same pictures, or none (the old ones are stale)
        with pytest.raises(BitError) as caught:
            write_page_folder(folder, {"index.html": b"y", **pictures}, EVAL_REPORT)
        assert str(caught.value) == f"{folder}: {reason}"
    remove_page_folder(folder)  # `bit finetune --overwrite`
    assert {p.name: p.read_bytes() for p in theirs.iterdir()} == {
        n: b"the user's " + n.encode() for n in ("00001.jpg", "00002.jpg", "holiday.jpg")
    }
    assert (folder / "images").is_symlink()


@pytest.mark.parametrize("name", ["index.html", "reliability.png"])  # a file of the earlier page, or a new one
def test_a_page_file_replaced_by_a_link_is_never_written_through(tmp_path: Path, name: str) -> None:
    """A link where the page writes a file (put there after the earlier page, pointing at the user's file): the
    rerun is refused (one line) before anything is written, and the user's file keeps its bytes. (A link in place
    of an earlier page's file that the new page does not write is left alone: test_a_rerun_replaces_only_what_...)"""
    folder, theirs = tmp_path / "report", tmp_path / "precious.png"
    write_page_folder(folder, {"index.html": b"x", "images/00001.jpg": b"a"}, EVAL_REPORT)
    theirs.write_bytes(b"the user's picture")
    (folder / name).unlink(missing_ok=True)
    (folder / name).symlink_to(theirs)
    reason = (
        f"its file '{name}' is a link, which bitcli did not make and would write through; remove the link or "
        "give another folder"
    )
    with pytest.raises(BitError) as caught:
        write_page_folder(folder, {"index.html": b"y", "reliability.png": b"z"}, EVAL_REPORT)
    assert str(caught.value) == f"{folder}: {reason}"
    assert theirs.read_bytes() == b"the user's picture"
    assert (folder / name).is_symlink()


def test_another_command_s_page_folder_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "out"
    write_page_folder(folder, {"explain.jsonl": b"{}\n"}, EXPLAIN)
    assert refusal(folder, EVAL_REPORT) == (
        "was written by bit explain; give a new or empty folder, or one that bit eval --report wrote"
    )
    assert refusal(folder, EXPLAIN) is None and refusal(folder) is None
    with pytest.raises(BitError, match="was written by bit explain"):
        write_page_folder(folder, {"index.html": b"x"}, EVAL_REPORT)
    assert sorted(p.name for p in folder.iterdir()) == [MARKER, "explain.jsonl"] and listed(folder) == ["explain.jsonl"]


def test_a_stale_file_that_cannot_be_removed_stays_listed_and_is_one_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a file made immutable (chattr +i) is: the new page is written, the marker still lists the old file
    (a rerun removes it), and the error is one line naming it."""
    folder = tmp_path / "report"
    write_page_folder(folder, {"index.html": b"one", "images/1.jpg": b"a", "images/2.jpg": b"b"}, "t")
    stuck = folder / "images" / "2.jpg"
    unlink = Path.unlink

    def refuse(self: Path, missing_ok: bool = False) -> None:
        if self == stuck:
            raise PermissionError(1, "Operation not permitted", str(self))
        unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", refuse)
    with pytest.raises(BitError) as caught:
        write_page_folder(folder, {"index.html": b"two", "images/1.jpg": b"c"}, "t")
    assert str(caught.value) == (
        f"{stuck}: cannot remove this file of the earlier page (Operation not permitted); the new page is "
        "written; make it removable and run again"
    )
    assert (folder / "index.html").read_bytes() == b"two" and stuck.read_bytes() == b"b"
    assert listed(folder) == ["index.html", "images/1.jpg", "images/2.jpg"]
    monkeypatch.setattr(Path, "unlink", unlink)
    write_page_folder(folder, {"index.html": b"three", "images/1.jpg": b"d"}, "t")
    assert not stuck.exists() and listed(folder) == ["index.html", "images/1.jpg"]


def test_removed_first_refuses_a_folder_holding_more_than_the_earlier_page(tmp_path: Path) -> None:
    """`bit finetune --overwrite --report` removes the earlier report first: the user's files would be left in
    a folder no longer marked, which the new report could not take."""
    folder = tmp_path / "report"
    write_page_folder(folder, {"index.html": b"x", "images/1.jpg": b"a"}, EVAL_REPORT)
    (folder / ".index.html.abcd1234.tmp").write_text("a killed write")
    assert refusal(folder, EVAL_REPORT, removed_first=True) is None
    (folder / "images" / "mine.txt").write_text("mine")
    assert refusal(folder, EVAL_REPORT) is None
    assert refusal(folder, EVAL_REPORT, removed_first=True) == (
        "holds 'images/mine.txt', which bitcli did not write and --overwrite would leave in the new report's "
        "folder; move it out first"
    )


def test_text_is_escaped_for_elements_and_attributes() -> None:
    assert text(HOSTILE) == "&lt;img src=x onerror=&quot;window.__pwned=1&quot;&gt;"
    assert text("a'b&c\nd") == "a&#x27;b&amp;c\\nd"  # one line: a newline in a folder name shows as \n
    assert text("caf\udcc3\udca9 \ud800") == "caf\u00e9 \ufffd"  # a file name's bytes; a lone surrogate
    assert element("a", HOSTILE, attrs={"title": '"><b>'}) == (
        '<a title="&quot;&gt;&lt;b&gt;">&lt;img src=x onerror=&quot;window.__pwned=1&quot;&gt;</a>'
    )
    page = document("t", element("p", "x"))
    assert "<script" not in page and "http" not in page.replace("http-equiv", "")  # nothing from the network


def test_colour_map_and_overlay_on_the_model_s_view() -> None:
    assert colorize(np.array([[0.0, 1.0]])).tolist() == [[[0, 0, 128], [128, 0, 0]]]  # jet: dark blue to dark red
    image = Image.new("RGB", (40, 20), (200, 100, 50))
    heat = np.ones((8, 8), dtype=np.float32)
    box = (10.0, 0.0, 30.0, 20.0)  # the model saw the middle half
    out = np.asarray(overlay(image, heat, box, size=40)).astype(int)
    seen = np.rint(np.array([200, 100, 50]) * (1 - HEAT_WEIGHT) + JET[255] * HEAT_WEIGHT)
    greyed = np.rint(np.array([200, 100, 50]) * (1 - CUT_OFF_WEIGHT) + 128 * CUT_OFF_WEIGHT)
    assert (out[:, 10:30] == seen).all() and (out[:, :10] == greyed).all() and (out[:, 30:] == greyed).all()
    small = overlay(image, heat, box, size=20)  # fitted: the longer side is 20
    assert small.size == (20, 10)
    whole = overlay(image, heat, (0.0, 0.0, 40.0, 20.0), size=40, fitted=fit(image, 40))  # the model saw it all
    assert (np.asarray(whole).astype(int) == seen).all()
    assert (
        overlay(image, heat, box, size=40, fitted=fit(image, 40)).tobytes() == overlay(image, heat, box, 40).tobytes()
    )


@pytest.mark.parametrize(
    ("preprocess", "size", "box"),
    [
        (Preprocess(resize=448, crop=(448, 448)), (640, 427), (111 * 640 / 671, 0.0, 559 * 640 / 671, 427.0)),
        (Preprocess(resize=448, crop=(448, 448), crop_rounding="round"), (640, 427), (112 * 640 / 671, 0.0, 560 * 640 / 671, 427.0)),
        (Preprocess(resize=None, crop=None), (50, 30), (0.0, 0.0, 50.0, 30.0)),
        (Preprocess(resize=None, crop=(80, 80)), (100, 50), (10.0, -15.0, 90.0, 65.0)),  # padded above and below
        (Preprocess.square(64, 64), (300, 100), (0.0, 0.0, 300.0, 100.0)),
    ],
)  # fmt: skip
def test_view_box_is_where_the_model_input_lies(preprocess: Preprocess, size, box) -> None:
    """640x427 at shortest edge 448 is 671x448, a margin of 223: the crop starts at 111 (transformers' floor) or
    112 (timm's round); a crop larger than the image pads ceil(pad / 2) before it (BIT_FACTS.md)."""
    assert preprocess.view_box(*size) == pytest.approx(box)
