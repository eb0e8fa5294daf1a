"""`bit audit` on multi-label data (several labels an image): the inventory counts an image in each of its
classes, a duplicate pair's labels disagree when the label sets differ, label issues come from the one-vs-rest
head and cleanlab's multi-label rule (cleanlab the oracle of the flagged set), and --write-clean writes JSONL
in the data's own row order that reads back as the same multi-label data (CSV refused)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_main
from PIL import Image

CHANNEL = {"red": 0, "green": 1, "blue": 2}  # class order (by name): blue, green, red
THRESHOLD = "0.999"  # as tests/test_audit.py: the tiny model's copies are above it, distinct pictures below


def picture(seed: int, labels: list[str], size: int = 64) -> Image.Image:
    """A distinct picture (sinusoids of its own frequencies) with the colour channel of each label raised."""
    r = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    img = np.stack([0.5 + 0.5 * np.sin(2 * np.pi * (r.uniform(1, 6) * x + r.uniform(1, 6) * y) + r.uniform(0, 6))
                    for _ in range(3)], axis=-1)  # fmt: skip
    img *= 0.35
    for label in labels:
        img[..., CHANNEL[label]] += 0.6
    return Image.fromarray(np.clip(img * 255, 0, 255).astype(np.uint8))


SETS = [["red"], ["green"], ["blue"], ["red", "green"], ["green", "blue"], ["red", "blue"]]


@pytest.fixture(scope="module", autouse=True)
def cache_folder(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BITCLI_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    """labels.jsonl (a split column; rows interleaved across splits and classes) over 64-px pictures: train
    has 5 pictures of each label set of SETS, test 2, and
    - exact, train, the same set in another order: t03-0.png (red, green) re-saved as same.png (green, red)
    - exact, train, sets differ (their lowest class, blue, the same): t05-0.png (red, blue) as less.png (blue)
    - exact leak: t04-1.png (green, blue) as test's leak.png (blue, green)
    - a label missing: missing.png, a red and green picture labelled red
    - a label too many: extra.png, a blue picture labelled blue, green
    - an undecodable file: broken.png (red, green)."""
    root = tmp_path_factory.mktemp("multi")
    rows: list[tuple[str, list[str], str]] = []
    for i in range(5):  # class by class would be the grouped order: interleave them, and the splits
        for s, labels in enumerate(SETS):
            picture(100 * s + i, labels).save(root / f"t{s:02d}-{i}.png")
            rows.append((f"t{s:02d}-{i}.png", labels, "train"))
            if i < 2:
                picture(5000 + 100 * s + i, labels).save(root / f"v{s:02d}-{i}.png")
                rows.append((f"v{s:02d}-{i}.png", labels[::-1], "test"))
    for src, name, labels, split in [("t03-0.png", "same.png", ["green", "red"], "train"),
                                     ("t05-0.png", "less.png", ["blue"], "train"),
                                     ("t04-1.png", "leak.png", ["blue", "green"], "test")]:  # fmt: skip
        Image.open(root / src).save(root / name, compress_level=1)
        rows.append((name, labels, split))
    picture(777, ["red", "green"]).save(root / "missing.png")
    picture(778, ["blue"]).save(root / "extra.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    rows += [("missing.png", ["red"], "train"), ("extra.png", ["blue", "green"], "train"),
             ("broken.png", ["red", "green"], "train")]  # fmt: skip
    rows.insert(7, rows.pop())  # the broken file early in the file, the others at the end
    (root / "labels.jsonl").write_text(
        "".join(json.dumps({"path": p, "label": labels, "split": split}) + "\n" for p, labels, split in rows)
    )
    return root


@pytest.fixture(scope="module")
def audited(planted: Path, tiny_dir: Path, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("audited")
    code, out, err = run_main("audit", planted / "labels.jsonl", "-m", tiny_dir, "-o", work / "out", "--threshold",
                              THRESHOLD, "--write-clean", work / "clean.jsonl", "--workers", "0")  # fmt: skip
    assert code == 0, err
    return {"out": out, "err": err, "dir": work / "out", "clean": work / "clean.jsonl",
            "report": json.loads((work / "out/audit.json").read_text())}  # fmt: skip


def name(path: str) -> str:
    return Path(path).name


def test_planted_findings_count_every_label(audited: dict) -> None:
    """Exact counts: each image in each of its classes, pairs whose label sets differ (not their lowest
    class) disagree, the planted missing and extra labels are flagged with the suggested sets."""
    report = audited["report"]
    assert report["counts"] == {
        "duplicates": 3, "exact": 3, "near": 0, "leaks": 1, "conflicts": 1, "label-issues": 3, "undecodable": 1,
        "small-classes": 0, "off-size": 0,
    }  # fmt: skip
    pairs = {(name(d["a"]), name(d["b"])): (d["labels_a"], d["labels_b"], d["conflict"], d["leak"])
             for d in report["duplicates"]}  # fmt: skip
    assert pairs == {
        ("t03-0.png", "same.png"): (["green", "red"], ["green", "red"], False, False),
        ("t05-0.png", "less.png"): (["blue", "red"], ["blue"], True, False),
        ("t04-1.png", "leak.png"): (["blue", "green"], ["blue", "green"], False, True),
    }
    assert all("label_a" not in d and "label_b" not in d for d in report["duplicates"])
    issues = {name(i["path"]): (i["labels"], i["suggested"]) for i in report["label_issues"]}
    assert issues == {
        "missing.png": (["red"], ["green", "red"]),
        "extra.png": (["blue", "green"], ["blue"]),
        "less.png": (["blue"], ["blue", "red"]),
    }
    assert report["label_issues"][0]["action"] == 'relabel as ["green", "red"], or drop'
    inv = report["inventory"]
    assert inv["multi_label"] is True and inv["classes"] == ["blue", "green", "red"]
    # train: 5 of each set (each class in 3 sets), then blue: less.png, extra.png; green: same.png, extra.png;
    # red: same.png, missing.png (broken.png, red and green, is undecodable: listed apart)
    assert inv["splits"]["train"] == {
        "images": 34, "classes": {"blue": 17, "green": 17, "red": 17}, "imbalance": 1.0,
        "undecodable": 1, "labels_per_image": {"min": 1, "median": 1.5, "max": 2},
    }  # fmt: skip
    assert inv["splits"]["test"] == {
        "images": 13, "classes": {"blue": 7, "green": 7, "red": 6}, "imbalance": round(7 / 6, 4),
        "undecodable": 0, "labels_per_image": {"min": 1, "median": 2, "max": 2},
    }  # fmt: skip


def test_the_summary_and_csvs_say_multi_label(audited: dict) -> None:
    lines = audited["out"].splitlines()
    assert lines[0].split() == ["split", "images", "classes", "imbalance", "undecodable", "labels/image"]
    assert lines[1].split() == ["train", "34", "3", "1.00", "1", "1/1.5/2"]
    assert lines[2].split() == ["test", "13", "3", "1.17", "0", "1/2/2"]
    assert lines[3] == "multi-label: a class counts every image that carries it; labels/image is min/median/max"
    rows = list(csv.DictReader(io.StringIO((audited["dir"] / "duplicates.csv").read_text())))
    assert list(rows[0]) == ["a", "b", "split_a", "split_b", "similarity", "exact", "labels_a", "labels_b", "leak",
                             "conflict", "action"]  # fmt: skip
    assert [(name(r["a"]), json.loads(r["labels_a"]), json.loads(r["labels_b"]), r["conflict"]) for r in rows] == [
        ("t05-0.png", ["blue", "red"], ["blue"], "True"),
        ("t04-1.png", ["blue", "green"], ["blue", "green"], "False"),
        ("t03-0.png", ["green", "red"], ["green", "red"], "False"),
    ]
    issues = list(csv.DictReader(io.StringIO((audited["dir"] / "label_issues.csv").read_text())))
    assert list(issues[0]) == ["path", "split", "labels", "suggested", "score", "action"]
    assert (name(issues[0]["path"]), json.loads(issues[0]["labels"]), json.loads(issues[0]["suggested"])) == (
        "missing.png",
        ["red"],
        ["green", "red"],
    )
    page = (audited["dir"] / "index.html").read_text()
    assert "1. labelled red, suggested green; red (score 0.2000, train)" in page
    assert "a: blue; red" in page and "Multi-label data: a class counts every image that carries it" in page


def test_write_clean_is_jsonl_in_the_files_order_and_reads_back_multi_label(audited: dict, planted: Path) -> None:
    from bitcli.sources.labelfile import read_label_file

    source = [json.loads(line) for line in (planted / "labels.jsonl").read_text().splitlines()]
    written = [json.loads(line) for line in audited["clean"].read_text().splitlines()]
    folder = audited["clean"].parent
    dropped = {"broken.png", "same.png", "less.png", "t04-1.png", "missing.png", "extra.png"}
    assert [(name(str((folder / r["path"]).resolve())), r["label"], r["split"]) for r in written] == [
        (r["path"], sorted(r["label"]), r["split"]) for r in source if r["path"] not in dropped
    ]  # the file's row order (splits and label sets interleaved), each row's labels in class order
    assert len(written) == len(source) - 6
    back = read_label_file(audited["clean"]).scan(None, None)
    assert back.multi_label and back.classes == ("blue", "green", "red")
    got = {name(back.paths[i]): [back.classes[c] for c in np.flatnonzero(back.multi_hot[i])] for i in range(len(back))}
    assert got == {name(str((folder / r["path"]).resolve())): r["label"] for r in written}


def test_write_clean_csv_is_refused_for_multi_label_data(planted: Path, tiny_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "clean.csv"
    code, out, err = run_main("audit", planted / "labels.jsonl", "-m", tiny_dir, "--write-clean", target)
    assert (code, out) == (2, "") and not target.exists()
    assert err.strip().splitlines() == [
        f"Error: --write-clean {target}: the data is multi-label, and a CSV whose rows each keep one label reads "
        f"back as single-label; name {tmp_path / 'clean.jsonl'} (a JSON list of labels a row)"
    ]


def test_write_clean_csv_is_refused_for_a_class_holding_the_separator(tmp_path: Path) -> None:
    """Single-label data with a class `rock;roll` (a JSONL string is one label): a CSV would read it back as the
    two classes rock and roll; refused before the model is even loaded (-m names none)."""
    for n in range(2):
        picture(n, ["red"]).save(tmp_path / f"{n}.png")
    data = tmp_path / "labels.jsonl"
    data.write_text('{"path": "0.png", "label": "rock;roll"}\n{"path": "1.png", "label": "jazz"}\n')
    code, out, err = run_main("audit", data, "-m", tmp_path / "no-model", "--write-clean", tmp_path / "c.csv")
    assert (code, out) == (2, "") and not (tmp_path / "c.csv").exists()
    assert err.strip().splitlines() == [
        f"Error: --write-clean {tmp_path / 'c.csv'}: class 'rock;roll' holds ';', which separates labels in a CSV "
        f"label file, so it would read back as several labels; name {tmp_path / 'c.jsonl'}"
    ]


def test_kept_rows_of_one_label_each_still_read_back_multi_label(tmp_path: Path) -> None:
    """The clean file of multi-label data whose only two-label row is dropped: still a list a row."""
    from bitcli.audit.clean import clean_label_file
    from bitcli.audit.examples import audit_parts, gather
    from bitcli.audit.findings import Findings
    from bitcli.sources.labelfile import read_label_file
    from bitcli.sources.locate import Columns

    for n, labels in enumerate([["red"], ["red", "green"], ["blue"], ["green"]]):
        picture(n, labels).save(tmp_path / f"{n}.png")
    data = tmp_path / "labels.jsonl"
    data.write_text('{"path": "2.png", "label": "blue"}\n{"path": "1.png", "label": ["red", "green"]}\n'
                    '{"path": "0.png", "label": ["red"]}\n{"path": "3.png", "label": "green"}\n')  # fmt: skip
    examples = gather(audit_parts(data, None, None, Columns(None, None)))
    dropped = examples.names.index(str(tmp_path / "1.png"))
    findings = Findings(examples=examples, model="m", input_side=64, min_images=5, errors={dropped: "x"},
                        sizes=np.zeros((len(examples), 2), dtype=np.int64))  # fmt: skip
    text, kept = clean_label_file(findings, tmp_path / "clean.jsonl")
    assert kept == 3 and text.decode().splitlines() == [
        '{"path": "2.png", "label": ["blue"]}', '{"path": "0.png", "label": ["red"]}',
        '{"path": "3.png", "label": ["green"]}',
    ]  # fmt: skip
    (tmp_path / "clean.jsonl").write_bytes(text)
    back = read_label_file(tmp_path / "clean.jsonl").scan(None, None)
    assert back.multi_label and back.multi_hot.tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]


def test_multi_label_flagged_set_equals_cleanlab_given_the_same_probabilities() -> None:
    """Synthetic multi-label embeddings (each label adds its class's direction) with 5% of the rows given a
    label too many or too few (fixed seed): the one-vs-rest k-fold head's out-of-sample probabilities, given to
    cleanlab's multi-label find_label_issues, flag exactly what the audit flags; most flips are found, and a
    found flip's suggestion is mostly its true set."""
    import warnings

    from cleanlab.filter import find_label_issues

    from bitcli.audit.labels import SUGGEST_AT, find_multi_label_issues, out_of_sample_probs

    rng = np.random.default_rng(0)
    n, k, d = 500, 5, 16
    truth = (rng.random((n, k)) < 0.35).astype(np.uint8)
    truth[truth.sum(1) == 0, rng.integers(k)] = 1
    x = truth @ (1.5 * rng.normal(size=(k, d))) + rng.normal(size=(n, d))
    noisy = truth.copy()
    flipped = rng.choice(n, size=n // 20, replace=False)
    for i in flipped:
        c = rng.integers(k)
        noisy[i, c] ^= 1
        if not noisy[i].any():
            noisy[i, (c + 1) % k] = 1
    probs = out_of_sample_probs(x.astype(np.float32), noisy.argmax(1), k, multi_hot=noisy)
    assert probs.shape == (n, k) and not np.allclose(probs.sum(1), 1)  # sigmoids, not a softmax
    issues = find_multi_label_issues(noisy, probs)
    ours = {i.example for i in issues}
    labels = [np.flatnonzero(row).tolist() for row in noisy]
    with warnings.catch_warnings():  # (cleanlab deprecates multi_label=True for the function the audit calls)
        warnings.simplefilter("ignore", DeprecationWarning)
        theirs = find_label_issues(labels, probs, multi_label=True)
    assert ours == set(np.flatnonzero(theirs).tolist())
    found = ours & set(flipped.tolist())
    assert len(found) / len(flipped) >= 0.75 and len(found) / len(ours) >= 0.65, (len(found), len(ours))
    for issue in issues:
        at = np.flatnonzero(probs[issue.example] >= SUGGEST_AT)
        assert issue.suggested_set == tuple(at.tolist() or [int(probs[issue.example].argmax())])
    right = sum(issue.suggested_set == tuple(np.flatnonzero(truth[issue.example])) for issue in issues
                if issue.example in found)  # fmt: skip
    assert right >= 0.9 * len(found)


def test_a_class_on_every_image_is_left_out_of_the_label_search() -> None:
    """A tag every image carries cannot be judged (cleanlab refuses a class without a negative, which crashed the
    audit): the search runs on the other classes, as cleanlab's rule flags them given those columns alone."""
    from cleanlab.multilabel_classification.filter import find_label_issues

    from bitcli.audit.labels import find_multi_label_issues

    rng = np.random.default_rng(0)
    multi_hot = np.zeros((40, 3), dtype=np.int64)
    multi_hot[:, 0] = 1  # "photo" on every image
    multi_hot[rng.random(40) < 0.5, 1] = 1
    multi_hot[rng.random(40) < 0.4, 2] = 1
    probs = rng.random((40, 3))
    issues = find_multi_label_issues(multi_hot, probs)
    others = [np.flatnonzero(row[1:]).tolist() for row in multi_hot]  # (a row of "photo" alone: no other label)
    assert {i.example for i in issues} == set(np.flatnonzero(find_label_issues(others, probs[:, 1:], n_jobs=1)))
    assert issues and all(len(i.suggested_set) >= 1 for i in issues)


def test_the_page_shows_every_class_a_suggestion_removes_or_adds() -> None:
    from bitcli.audit.page import PageInput, _compared
    from bitcli.pages.html import Html

    typical = {c: [f"{c}.png"] for c in ("r1", "r2", "r3", "r4", "red", "blue", "b2", "b3", "b4")}
    page = PageInput(title="t", report={}, thumbnail=lambda path: Html(f"<img alt='{path}'>"), typical=typical)
    issue = {"labels": ["r1", "r2", "r3", "r4", "red"], "suggested": ["blue", "b2", "b3", "b4"]}
    given, suggested = _compared(page, issue)
    assert [c for c in typical if f"given: {c}" in str(given)] == ["r1", "r2", "r3", "r4", "red"]
    assert [c for c in typical if f"suggested: {c}" in str(suggested)] == ["blue", "b2", "b3", "b4"]
