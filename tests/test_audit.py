"""`bit audit`: planted duplicates, leaks, flipped labels and broken files found with exact counts, cleanlab as
the oracle of the flagged set, the embedding cache, --fail-on, --write-clean, the page in a browser, hostile
names and refused output folders."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import run_main
from PIL import Image

CLASSES = ("a", "b", "c")
THRESHOLD = "0.999"  # the tiny random-weight model's copies are >= 0.9997, its distinct images <= 0.993


def pattern(seed: int, channel: int, size: int = 64) -> Image.Image:
    """A distinct picture (sinusoids of its own frequencies) whose class is its dominant colour channel."""
    r = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    img = np.stack([0.5 + 0.5 * np.sin(2 * np.pi * (r.uniform(1, 6) * x + r.uniform(1, 6) * y) + r.uniform(0, 6))
                    for _ in range(3)], axis=-1)  # fmt: skip
    img *= 0.35
    img[..., channel] += 0.6
    return Image.fromarray(np.clip(img * 255, 0, 255).astype(np.uint8))


def write_split(root: Path, per_class: int, seed: int) -> None:
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pattern(seed + 100 * c + i, c).save(root / name / f"{i:03d}.png")


def resave(src: Path, dst: Path, upscale: float = 1.0) -> None:
    """The same pixels in a new file (PNG at another compression level), or upscaled (a near-duplicate)."""
    im = Image.open(src).convert("RGB")
    if upscale != 1.0:
        im = im.resize((round(im.width * upscale), round(im.height * upscale)), Image.Resampling.BICUBIC)
    dst.parent.mkdir(parents=True, exist_ok=True)
    im.save(dst, compress_level=1)


@pytest.fixture(scope="module", autouse=True)
def cache_folder(tmp_path_factory):
    """This module's embedding cache ($BITCLI_CACHE), restored afterwards."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BITCLI_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    """train/ (3 classes x 12), val/ and test/ (3 x 5) with planted findings:
    - exact, within train, same label: train/a/000.png re-saved as train/a/copy.png
    - exact, within train, labels disagree: train/a/001.png as train/b/conflict.png (also a label error)
    - exact leak: train/b/003.png as test/b/leak.png
    - near leak: train/c/005.png upscaled 1.25x as val/c/near.png
    - two flipped labels: class-a pictures in train/c/flip1.png and train/b/flip2.png
    - an undecodable file: train/a/broken.png
    """
    root = tmp_path_factory.mktemp("audit") / "data"
    write_split(root / "train", 12, seed=0)
    write_split(root / "val", 5, seed=5000)
    write_split(root / "test", 5, seed=9000)
    resave(root / "train/a/000.png", root / "train/a/copy.png")
    resave(root / "train/a/001.png", root / "train/b/conflict.png")
    resave(root / "train/b/003.png", root / "test/b/leak.png")
    resave(root / "train/c/005.png", root / "val/c/near.png", upscale=1.25)
    pattern(777, 0).save(root / "train/c/flip1.png")
    pattern(778, 0).save(root / "train/b/flip2.png")
    (root / "train/a/broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root


@pytest.fixture(scope="module")
def audited(planted: Path, tiny_dir: Path, tmp_path_factory) -> dict:
    """One audit of `planted` with -o and --write-clean; its outputs and timings, for the tests that read them."""
    work = tmp_path_factory.mktemp("audited")
    code, out, err = run_main("audit", planted, "-m", tiny_dir, "-o", work / "out", "--threshold", THRESHOLD,
                              "--write-clean", work / "clean.csv", "--workers", "0")  # fmt: skip
    return {"code": code, "out": out, "err": err, "dir": work / "out", "clean": work / "clean.csv", "work": work}


def rel(root: Path, path: str) -> str:
    return Path(path).relative_to(root).as_posix()


def test_planted_findings_are_found_with_exact_counts(audited: dict, planted: Path) -> None:
    assert audited["code"] == 0, audited["err"]
    report = json.loads((audited["dir"] / "audit.json").read_text())
    pairs = {
        (rel(planted, d["a"]), rel(planted, d["b"]), d["exact"], d["split_a"], d["split_b"])
        for d in report["duplicates"]
    }
    assert pairs == {
        ("train/a/000.png", "train/a/copy.png", True, "train", "train"),
        ("train/a/001.png", "train/b/conflict.png", True, "train", "train"),
        ("train/b/003.png", "test/b/leak.png", True, "train", "test"),
        ("train/c/005.png", "val/c/near.png", False, "train", "validation"),
    }
    near = next(d for d in report["duplicates"] if not d["exact"])
    assert 0.999 <= near["similarity"] < 1
    assert report["counts"] == {
        "duplicates": 4, "exact": 3, "near": 1, "leaks": 2, "conflicts": 1, "label-issues": 3, "undecodable": 1,
        "small-classes": 0, "off-size": 0,
    }  # fmt: skip
    issues = {rel(planted, i["path"]): (i["label"], i["suggested"]) for i in report["label_issues"]}
    assert issues == {
        "train/c/flip1.png": ("c", "a"),
        "train/b/flip2.png": ("b", "a"),
        "train/b/conflict.png": ("b", "a"),
    }
    inv = report["inventory"]
    assert inv["splits"]["train"]["classes"] == {"a": 13, "b": 14, "c": 13}  # broken.png: listed apart, undecodable
    assert inv["splits"]["train"]["images"] == 40 and inv["splits"]["train"]["undecodable"] == 1
    assert inv["splits"]["test"]["classes"] == {"a": 5, "b": 6, "c": 5}
    assert [rel(planted, u["path"]) for u in inv["undecodable"]] == ["train/a/broken.png"]
    assert "broken.png" in inv["undecodable"][0]["error"]


def test_summary_table_and_csvs(audited: dict, planted: Path) -> None:
    lines = audited["out"].splitlines()
    assert lines[0].split() == ["split", "images", "classes", "imbalance", "undecodable"]
    assert lines[1].split() == ["train", "40", "3", "1.08", "1"]  # decodable images, then the undecodable one
    assert lines[2].split() == ["validation", "16", "3", "1.20", "0"]
    assert lines[3].split() == ["test", "16", "3", "1.20", "0"]
    assert lines[9].split() == ["leaks", "2"] and lines[11].split() == ["label-issues", "3"]
    rows = list(csv.DictReader(io.StringIO((audited["dir"] / "duplicates.csv").read_text())))
    assert [(rel(planted, r["a"]), rel(planted, r["b"]), r["leak"], r["conflict"]) for r in rows][:3] == [
        ("train/a/000.png", "train/a/copy.png", "False", "False"),
        ("train/a/001.png", "train/b/conflict.png", "False", "True"),
        ("train/b/003.png", "test/b/leak.png", "True", "False"),
    ]
    issues = list(csv.DictReader(io.StringIO((audited["dir"] / "label_issues.csv").read_text())))
    assert sorted(rel(planted, r["path"]) for r in issues) == [
        "train/b/conflict.png",
        "train/b/flip2.png",
        "train/c/flip1.png",
    ]
    assert all(0 <= float(r["score"]) < 0.5 for r in issues)
    assert (audited["dir"] / "undecodable.csv").read_text().count("\n") == 2  # the header and broken.png


def test_write_clean_lists_the_unflagged_rows_and_reads_back(
    audited: dict, planted: Path, tiny_dir: Path, tmp_path: Path
) -> None:
    rows = list(csv.DictReader(io.StringIO(audited["clean"].read_text())))
    folder = audited["clean"].parent
    listed = {
        (folder / r["path"]).resolve().relative_to(planted.resolve()).as_posix(): (r["label"], r["split"]) for r in rows
    }
    dropped = {"train/a/broken.png", "train/a/copy.png", "train/b/conflict.png", "train/b/003.png", "train/c/005.png",
               "train/c/flip1.png", "train/b/flip2.png"}  # fmt: skip
    every = {p.relative_to(planted).as_posix() for p in planted.rglob("*.png")}
    assert set(listed) == every - dropped and len(rows) == 73 - 7
    assert listed["test/b/leak.png"] == ("b", "test") and listed["val/c/near.png"] == ("c", "val")
    assert all(p.exists() for p in planted.rglob("*.png")) and len(every) == 73  # the data is untouched
    # the clean file is a label file bitcli reads: nothing left to report but the small classes
    code, _, err = run_main("audit", audited["clean"], "-m", tiny_dir, "--threshold", THRESHOLD, "--workers", "0",
                              "--fail-on", "duplicates", "--fail-on", "undecodable")  # fmt: skip
    assert code == 0, err
    assert "embedded 66 images (0 computed, 66 from the cache, 0 undecodable)" in err


def test_the_cache_makes_a_second_audit_compute_nothing_and_give_the_same_json(audited: dict, planted: Path,
                                                                            tiny_dir: Path, tmp_path: Path) -> None:  # fmt: skip
    assert "embedded 73 images (72 computed, 0 from the cache, 1 undecodable)" in audited["err"]
    code, _, err = run_main("audit", planted, "-m", tiny_dir, "-o", tmp_path / "again", "--threshold", THRESHOLD,
                            "--workers", "0")  # fmt: skip
    assert code == 0, err
    assert "embedded 73 images (0 computed, 72 from the cache, 1 undecodable)" in err
    assert (tmp_path / "again/audit.json").read_bytes() == (audited["dir"] / "audit.json").read_bytes()


def test_fail_on_rules_set_the_exit_code(audited: dict, planted: Path, tiny_dir: Path) -> None:
    base = ("audit", planted, "-m", tiny_dir, "--threshold", THRESHOLD, "--workers", "0")
    code, _, err = run_main(*base, "--fail-on", "leaks>2", "--fail-on", "label-issues>3")
    assert code == 0, err
    code, _, err = run_main(*base, "--fail-on", "leaks>1", "--fail-on", "near")
    assert code == 1
    assert err.splitlines()[-2:] == ["fail: leaks: 2 > 1", "fail: near: 1 > 0"]
    code, _, err = run_main(*base, "--fail-on", "leakage")
    assert code == 2 and "--fail-on 'leakage': use NAME or NAME>N" in err
    code, _, err = run_main(*base, "--threshold", "1.5")
    assert code == 2 and "--threshold '1.5': use a cosine similarity in (0, 1]" in err
    code, _, err = run_main(*base, "--write-clean", planted / "clean.txt")
    assert code == 2 and "name a .csv file" in err


def test_a_label_file_gives_the_same_findings(audited: dict, planted: Path, tiny_dir: Path, tmp_path: Path) -> None:
    """The same images listed in a label file with a split column: the same pairs, issues and counts."""
    listing = tmp_path / "labels.csv"
    words = {"train": "train", "val": "val", "test": "test"}
    lines = ["path,label,split"] + [f"{p},{p.parent.name},{words[p.parts[-3]]}" for p in sorted(planted.rglob("*.png"))]
    listing.write_text("\n".join(lines) + "\n")
    code, _, err = run_main(
        "audit", listing, "-m", tiny_dir, "-o", tmp_path / "out", "--threshold", THRESHOLD, "--workers", "0"
    )
    assert code == 0, err
    mine = json.loads((tmp_path / "out/audit.json").read_text())
    theirs = json.loads((audited["dir"] / "audit.json").read_text())
    assert mine["counts"] == theirs["counts"]
    key = lambda d: (rel(planted, d["a"]), rel(planted, d["b"]), d["split_a"], d["split_b"], d["exact"])  # noqa: E731
    assert sorted(map(key, mine["duplicates"])) == sorted(map(key, theirs["duplicates"]))
    assert sorted(rel(planted, i["path"]) for i in mine["label_issues"]) == sorted(
        rel(planted, i["path"]) for i in theirs["label_issues"]
    )


def test_flagged_set_equals_cleanlab_given_the_same_probabilities() -> None:
    """Digits with 5% of labels flipped (fixed seed): the k-fold head's out-of-sample probabilities, given to
    cleanlab.filter.find_label_issues, flag exactly what the audit flags; and most flips are found."""
    from cleanlab.filter import find_label_issues
    from sklearn.datasets import load_digits

    from bitcli.audit.labels import find_issues, out_of_sample_probs

    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(0)
    noisy = y.copy()
    flipped = rng.choice(len(y), size=len(y) // 20, replace=False)
    noisy[flipped] = (y[flipped] + rng.integers(1, 10, len(flipped))) % 10
    probs = out_of_sample_probs(x.astype(np.float32), noisy, 10)
    ours = {i.example for i in find_issues(noisy, probs)}
    assert ours == set(np.flatnonzero(find_label_issues(noisy, probs)).tolist())
    found = len(ours & set(flipped.tolist()))
    assert found / len(flipped) >= 0.8 and found / len(ours) >= 0.6, (found, len(ours), len(flipped))


def test_blockwise_search_equals_the_full_matrix() -> None:
    """Small blocks (rows 7, columns 11) find the same top-k later neighbours as the whole similarity matrix."""
    import torch

    from bitcli.audit.duplicates import nearest_later, unit_rows

    vectors = np.random.default_rng(1).normal(size=(50, 8)).astype(np.float32)
    unit = unit_rows(vectors)
    sims, idx = nearest_later(unit, 4, rows=7, columns=11)
    full = unit @ unit.T
    for i in range(50):
        later = full[i, i + 1 :]
        want = later.topk(min(4, len(later))) if len(later) else None
        got = sims[i][idx[i] >= 0]
        if want is None:
            assert len(got) == 0
            continue
        torch.testing.assert_close(got, want.values)
        assert (idx[i][: len(want.indices)] == want.indices + i + 1).all()


HOSTILE = "<img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def hostile(tiny_dir: Path, tmp_path_factory) -> dict:
    """A class named like markup, a file name with markup and one that is not UTF-8, an exact duplicate and an
    undecodable file, audited into a folder."""
    work = tmp_path_factory.mktemp("hostile")
    data = work / "data"
    for c, name in enumerate(("cat", HOSTILE)):
        (data / name).mkdir(parents=True)
        for i in range(6):
            pattern(300 + 10 * c + i, c).save(data / name / f"{i}.png")
    resave(data / "cat/0.png", data / HOSTILE / "<b>copy'&\".png")
    odd = os.fsencode(str(data / "cat")) + b"/\xff\xfe.png"
    Image.open(data / "cat/1.png").save(os.fsdecode(odd), format="PNG", compress_level=1)
    (data / "cat" / "<i>broken.png").write_bytes(b"GIF89a nonsense")
    code, out, err = run_main(
        "audit", data, "-m", tiny_dir, "-o", work / "out", "--threshold", THRESHOLD, "--workers", "0"
    )
    assert code == 0, err
    return {"data": data, "out": work / "out", "work": work, "stdout": out}


def test_the_page_in_chromium(hostile: dict, browser_page, tmp_path: Path) -> None:
    """No console error, every picture loads, the duplicate pairs and undecodable files are listed, hostile
    names are text (no element made of them, no script), and a phone's width scrolls no page sideways."""
    report = json.loads((hostile["out"] / "audit.json").read_text())
    assert report["counts"]["exact"] == 2 and report["counts"]["undecodable"] == 1
    page = browser_page.page
    page.goto((hostile["out"] / "index.html").as_uri())
    widths = page.evaluate(
        "async () => { for (const img of document.images) { img.scrollIntoView(); await img.decode(); }"
        " return [...document.images].map(img => img.naturalWidth); }"
    )
    assert len(widths) >= 4 and min(widths) > 0
    assert page.evaluate("[...document.images].every(img => !img.getAttribute('src').startsWith('x'))")
    captions = page.eval_on_selector_all("figure .path", "nodes => nodes.map(n => n.textContent)")
    assert captions[:4] == [f"{k}: {d[k]}" for d in report["duplicates"][:2] for k in ("a", "b")]
    text = page.evaluate("document.body.innerText")
    assert f"{HOSTILE}/<b>copy'&\".png" in text and "<i>broken.png" in text and "\ufffd\ufffd.png" in text
    assert page.evaluate("document.querySelectorAll('b i, main > img, script').length") == 0
    cells = page.eval_on_selector_all("table.numbers tbody tr td:first-child", "n => n.map(x => x.textContent)")
    assert cells[:2] == [HOSTILE, "cat"]  # class order: by name
    assert browser_page.errors == []
    page.set_viewport_size({"width": 390, "height": 800})
    assert page.evaluate("document.documentElement.scrollWidth") <= 390


def test_a_folder_with_user_files_is_refused_and_an_earlier_audit_is_replaced(hostile: dict, tiny_dir: Path) -> None:
    mine = hostile["work"] / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    code, out, err = run_main("audit", hostile["data"], "-m", tiny_dir, "-o", mine)
    assert code == 2 and out == ""
    assert err.strip().splitlines()[-1] == (
        f"Error: --output {mine}: holds 'notes.txt', which bitcli did not write; give a new or empty folder, "
        "or the folder of an earlier report"
    )
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"
    (hostile["out"] / "mine.txt").write_text("added by the user")
    before = (hostile["out"] / "audit.json").read_bytes()
    code, _, err = run_main("audit", hostile["data"], "-m", tiny_dir, "-o", hostile["out"], "--threshold", THRESHOLD)
    assert code == 0, err
    assert (hostile["out"] / "audit.json").read_bytes() == before
    assert (hostile["out"] / "mine.txt").read_text() == "added by the user"


def test_the_summary_prints_no_data_and_the_undecodable_file_is_named(hostile: dict) -> None:
    report = json.loads((hostile["out"] / "audit.json").read_text())
    [bad] = report["inventory"]["undecodable"]
    assert bad["path"].endswith("cat/<i>broken.png") and "<i>broken.png" in bad["error"]
    assert HOSTILE not in hostile["stdout"]  # the table holds split names and numbers only


def test_ctrl_c_keeps_what_was_embedded_and_the_next_audit_resumes(
    planted: Path, tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopped by Ctrl-C after two batches of 8: exit 130, nothing written to -o; the same command again
    computes only the images not done before."""
    from bitcli.audit import embedding

    monkeypatch.setenv("BITCLI_CACHE", str(tmp_path / "cache"))
    compute, calls = embedding._compute, []

    def stop_at_the_third(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        compute(*args, **kw)

    args = ("audit", planted, "-m", tiny_dir, "-o", tmp_path / "out", "-b", "8", "--workers", "0")
    with monkeypatch.context() as patch:
        patch.setattr(embedding, "_compute", stop_at_the_third)
        code, out, err = run_main(*args)
    assert code == 130 and out == "" and not (tmp_path / "out").exists()
    [key] = (tmp_path / "cache/embeddings").iterdir()
    assert err.splitlines()[-1] == (
        f"interrupted: 16 of 73 images embedded, nothing written; the 15 computed are kept in the embedding cache "
        f"{key}, so the same command computes only the rest"
    )
    code, _, err = run_main(*args)
    assert code == 0, err
    # the first two batches are train/a/000-011, broken.png (undecodable: not cached), copy.png and b/000-001
    assert "embedded 73 images (57 computed, 15 from the cache, 1 undecodable)" in err


def test_bf16_candidates_give_the_float32_pairs() -> None:
    """Near-duplicates planted at similarities around the threshold: the bf16 candidate search, re-scored in
    float32, reports exactly the pairs of the float32 search, with the same similarities."""
    from bitcli.audit.duplicates import find_pairs

    rng = np.random.default_rng(3)
    vectors = np.abs(rng.standard_normal((400, 64))).astype(np.float32) + 0.2
    for j, noise in enumerate(np.linspace(0.05, 0.6, 60)):  # similarities from about 0.99 down to 0.7
        vectors[200 + j] = vectors[j] + noise * rng.standard_normal(64).astype(np.float32)
    pixels = [bytes([i % 256, i // 256]) for i in range(400)]
    exact32 = find_pairs(vectors, pixels, 0.9, fast=False)
    fast = find_pairs(vectors, pixels, 0.9, fast=True)
    assert 10 < len(exact32) < 60
    assert [(p.a, p.b) for p in fast] == [(p.a, p.b) for p in exact32]
    assert np.allclose([p.similarity for p in fast], [p.similarity for p in exact32], atol=2e-6)


def test_torchrun_is_refused(planted: Path, tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, out, err = run_main("audit", planted, "-m", tiny_dir)
    assert code == 2 and out == ""
    assert err.strip().splitlines()[-1].startswith("Error: bit audit runs in one process: drop torchrun")


def test_cache_entries_survive_a_round_trip_whatever_their_bytes(tmp_path: Path) -> None:
    """Keys and pixel hashes ending in zero bytes (1 SHA-256 in 256 does) read back exactly (numpy's bytes
    dtype would drop them), and a shard of another dimension is ignored."""
    from bitcli.audit.cache import EmbeddingCache, Entry

    cache = EmbeddingCache(tmp_path, "key", 4)
    keys = [bytes(31) + b"\x01", b"\x07" + bytes(31), bytes(32)]
    for n, key in enumerate(keys):
        cache.put(key, Entry(np.full(4, n, dtype=np.float32), key[::-1], (n, n + 1)))
    cache.flush()
    again = EmbeddingCache(tmp_path, "key", 4)
    assert sorted(again.entries) == sorted(keys)
    for n, key in enumerate(keys):
        entry = again.get(key)
        assert entry is not None and entry.pixels == key[::-1] and entry.size == (n, n + 1)
        assert entry.vector.tolist() == [n] * 4
    assert EmbeddingCache(tmp_path, "key", 8).entries == {}


def test_write_clean_never_replaces_an_audited_source(planted: Path, tiny_dir: Path, tmp_path: Path) -> None:
    """--write-clean naming DATA, --val or --test (through ../ or a symlink) or a file inside an audited image
    folder: exit 2 before any work, one line, the file untouched."""
    (tmp_path / "sub").mkdir()
    labels = tmp_path / "sub/labels.csv"
    labels.write_text("path,label\n" + "".join(f"{p},{p.parent.name}\n" for p in sorted(planted.glob("val/*/*.png"))))
    before = labels.read_bytes()
    (tmp_path / "link.csv").symlink_to(labels)
    base = ("audit", "-m", tiny_dir, "--workers", "0")
    cases = [
        ((labels, "--write-clean", tmp_path / "sub/../sub/labels.csv"), f"is the input {labels}"),
        ((labels, "--write-clean", tmp_path / "link.csv"), f"is the input {labels}"),
        ((planted / "train", "--val", tmp_path / "link.csv", "--write-clean", labels),
         f"is the input {tmp_path / 'link.csv'}"),
        ((planted / "train", "--test", labels, "--write-clean", tmp_path / "link.csv"), f"is the input {labels}"),
        ((labels, "--test", planted / "test", "--write-clean", planted / "test/b/clean.csv"),
         f"is inside the image folder {planted / 'test'}"),
    ]  # fmt: skip
    for args, why in cases:
        code, out, err = run_main(*base[:1], *args[:1], *base[1:], *args[1:])
        assert code == 2 and out == "", err
        [line] = err.strip().splitlines()
        assert line.startswith(f"Error: --write-clean {args[-1]}: {why}"), line
    assert labels.read_bytes() == before and not (planted / "test/b/clean.csv").exists()


def test_an_output_folder_inside_an_audited_folder_is_refused(planted: Path, tiny_dir: Path, tmp_path: Path) -> None:
    """-o inside DATA, --val or --test: its thumbnails would be images of the next audit."""
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\n" + "".join(f"{p},{p.parent.name}\n" for p in sorted(planted.glob("val/*/*.png"))))
    for args, folder in [
        ((planted, "-o", planted / "train/report"), planted),
        ((labels, "--val", planted / "val", "-o", planted / "val/c/report"), planted / "val"),
        ((labels, "--test", planted / "test", "-o", planted / "test/report"), planted / "test"),
    ]:
        code, out, err = run_main("audit", *args, "-m", tiny_dir)
        assert code == 2 and out == ""
        assert err.strip().splitlines() == [
            f"Error: --output {args[-1]}: is inside the image folder {folder}; choose a folder outside it"
        ]
        assert not args[-1].exists()


def garbage_shards() -> dict[str, bytes]:
    """Files that are not an intact shard: each kind numpy.load(allow_pickle=False) or the arrays trip on."""

    def npz(compressed: bool = False, **arrays: np.ndarray) -> bytes:
        out = io.BytesIO()
        (np.savez_compressed if compressed else np.savez)(out, **arrays)
        return out.getvalue()

    digests = np.zeros((2, 32), np.uint8)
    whole = dict(files=digests, pixels=digests, sizes=np.ones((2, 2), np.int64), vectors=np.ones((2, 4), np.float32))
    damaged = bytearray(npz(compressed=True, **whole))
    damaged[60:90] = b"x" * 30
    bare = io.BytesIO()
    np.save(bare, np.arange(3))
    return {
        "zip-magic": b"PK\x03\x04",
        "empty": b"",
        "text": b"not numpy at all",
        "pickle-magic": b"\x80\x04K\x01.",
        "bare-npy": bare.getvalue(),
        "truncated": npz(**whole)[:300],
        "damaged-deflate": bytes(damaged),
        "missing-array": npz(files=digests),
        "object-array": npz(**{**whole, "vectors": np.array([[{}] * 4] * 2, dtype=object)}),
        "text-array": npz(**{**whole, "vectors": np.array([["a"] * 4] * 2)}),
        "flat-sizes": npz(**{**whole, "sizes": np.ones(2, np.int64)}),
    }


def test_a_cache_file_that_does_not_read_is_ignored_and_bitclis_own_replaced(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Each kind of garbage beside a good shard: read without an error (a warning names it), the good shard's
    entries kept; after the next write, bitcli's own damaged shards are gone, a foreign file is left alone."""
    from bitcli.audit.cache import EmbeddingCache, Entry

    good = EmbeddingCache(tmp_path, "key", 4)
    good.put(b"\x01" * 32, Entry(np.ones(4, np.float32), b"\x02" * 32, (3, 4)))
    good.flush()
    folder = tmp_path / "embeddings/key"
    kinds = garbage_shards()
    for n, data in enumerate(kinds.values()):
        (folder / f"{n}-1.npz").write_bytes(data)  # bitcli's names: {time_ns}-{pid}.npz
    (folder / "x.npz").write_bytes(b"PK\x03\x04")  # the user's
    capsys.readouterr()
    cache = EmbeddingCache(tmp_path, "key", 4)
    assert list(cache.entries) == [b"\x01" * 32]
    warned = capsys.readouterr().err.splitlines()
    assert len(warned) == len(kinds) + 1
    assert all(w.startswith(f"warning: the embedding cache file {folder}/") and "does not read" in w for w in warned)
    assert warned[-1].endswith("ignored, delete it if it is not needed")
    cache.put(b"\x03" * 32, Entry(np.zeros(4, np.float32), b"\x04" * 32, (1, 1)))
    cache.flush()
    assert sorted(p.name for p in folder.iterdir() if not p.name[0].isdigit()) == ["x.npz"]
    assert len(list(folder.iterdir())) == 3  # the good shard, the new one and x.npz
    assert sorted(EmbeddingCache(tmp_path, "key", 4).entries) == [b"\x01" * 32, b"\x03" * 32]


def test_an_audit_goes_on_past_a_damaged_cache_file(hostile: dict, tiny_dir: Path) -> None:
    """The reviewer's crash: a file that starts like a zip in the model's cache folder; the audit warns and runs."""
    [key] = (Path(os.environ["BITCLI_CACHE"]) / "embeddings").iterdir()
    bad = key / "x.npz"
    bad.write_bytes(b"PK\x03\x04")
    try:
        code, _, err = run_main("audit", hostile["data"], "-m", tiny_dir, "--threshold", THRESHOLD, "--workers", "0")
    finally:
        bad.unlink()
    assert code == 0, err
    assert f"warning: the embedding cache file {bad} does not read (File is not a zip file)" in err
    assert "embedded 15 images (0 computed, 14 from the cache, 1 undecodable)" in err


def test_val_or_test_that_is_the_training_data_is_warned_about(hostile: dict, tiny_dir: Path) -> None:
    data = hostile["data"]
    code, _, err = run_main("audit", data, "--test", data / "../data", "-m", tiny_dir, "--threshold", THRESHOLD)
    assert code == 0, err
    assert (
        f"warning: --test {data / '../data'}: is the training data ({data}), so every image is a leak of itself; "
        "pass the rows held out for it"
    ) in err.splitlines()


def test_counts_in_words() -> None:
    from bitcli.commands.audit import images

    assert [images(0), images(1), images(2)] == ["0 images", "1 image", "2 images"]


def test_the_pixel_hash_is_the_digest_earlier_caches_hold() -> None:
    """Taken from Pillow's bytes, the digest is still SHA-256 of the numpy array's shape and bytes (what the
    cache's entries written before hold), so exact duplicates of a cached image are still found."""
    import hashlib

    from bitcli.audit.embedding import pixel_hash

    picture = pattern(3, 1).resize((37, 23))
    array = np.asarray(picture)
    assert pixel_hash(picture) == hashlib.sha256(f"{array.shape}".encode() + array.tobytes()).digest()
    with pytest.raises(ValueError, match="needs an RGB picture, not RGBA"):
        pixel_hash(picture.convert("RGBA"))
