"""`bit eval --report DIR` and `bit finetune --report` for a multi-label model (issue 24): per-class average
precision instead of a confusion matrix, and per class its worst false positives and false negatives with the
Grad-CAM overlay for that class. A tiny model is fine-tuned on rows whose labels raise their own colour channel,
with class names that are hostile HTML; the test split holds two planted images: one without the label IMG but
with IMG's colour (its worst false positive) and one with the label IMG but without its colour (its worst false
negative). transformers is the oracle of the scores, scikit-learn of the AP, headless Chromium of the page."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_main
from PIL import Image

IMG = '<img src=x onerror="window.__pwned=1">'
QUOTE = 'l\'été "🌈"'
SCRIPT = "</td><script>window.__pwned=2</script>"
NAMES = [IMG, QUOTE, SCRIPT]  # each raises its own colour channel (0, 1, 2)
TINY = '{"depths": [1, 1], "hidden_sizes": [32, 64], "embedding_size": 16, "num_groups": 8}'
ARGS = ["--random-init", "--model", TINY, "--resolution", "16", "--workers", "1", "--steps", "30", "--batch-size", "8",
        "--lr", "0.1", "--eval-every", "0"]  # fmt: skip
PLANTED_FP, PLANTED_FN = "planted-fp.png", "planted-fn.png"


def label_sets(n: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[c for c in range(3) if rng.random() < 0.45] or [int(rng.integers(3))] for _ in range(n)]


@pytest.fixture(scope="module")
def multi(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """labels.jsonl (train 48 rows, val 24: the thresholds, test 14: two planted), the run fine-tuned on it with
    --report, and `bit eval labels.jsonl:test --report --plot`'s folder and JSON."""
    root = tmp_path_factory.mktemp("multi-report")
    rows = [(f"{i:03d}.png", s, s, split) for split, sets in (("train", label_sets(48, 0)), ("val", label_sets(24, 1)),
                                                              ("test", label_sets(12, 2)))
            for i, s in enumerate(sets, {"train": 0, "val": 100, "test": 200}[split])]  # fmt: skip
    rows += [(PLANTED_FP, [1], [0, 1], "test"), (PLANTED_FN, [0], [], "test")]  # (file, labels, channels, split)
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    with open(root / "labels.jsonl", "w", encoding="utf-8") as f:
        for name, labels, channels, split in rows:
            array = rng.integers(0, 60, (16, 16, 3), dtype=np.uint8)
            for c in channels:
                array[..., c] += 150
            Image.fromarray(array).save(root / "images" / name)
            f.write(json.dumps({"path": f"images/{name}", "label": [NAMES[c] for c in labels], "split": split}) + "\n")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code, _, err = run_main("finetune", root / "labels.jsonl", "--output", root / "run", "--report", *ARGS)
        assert code == 0, err
        code, out, err = run_main("eval", f"{root / 'labels.jsonl'}:test", "--model", root / "run", "--report",
                                  root / "report", "--plot", root / "ap.png", "-f", "json")  # fmt: skip
        assert code == 0, err
    finally:
        torch.set_num_threads(threads)
    test = [(root / "images" / name, [NAMES[c] for c in labels]) for name, labels, _, split in rows if split == "test"]
    return {"root": root, "run": root / "run", "report": root / "report", "json": json.loads(out), "test": test}


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def oracle(multi: dict) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    """(the test images' paths in the data set's order, their multi-hot labels and transformers' sigmoid scores
    [N, classes] in the model's class order, the model's classes)."""
    import transformers

    model = transformers.BitForImageClassification.from_pretrained(multi["run"]).eval()
    processor = transformers.BitImageProcessorPil.from_pretrained(multi["run"])
    classes = [model.config.id2label[i] for i in range(model.config.num_labels)]
    paths = [str(p) for p, _ in multi["test"]]
    order = [r["path"] for r in read_csv(multi["report"] / "predictions.csv")]
    assert sorted(order) == sorted(paths)
    labels = {str(p): names for p, names in multi["test"]}
    truth = np.array([[int(c in labels[p]) for c in classes] for p in order], dtype=np.uint8)
    with torch.no_grad():
        pixels = processor([Image.open(p) for p in order], return_tensors="pt")["pixel_values"]
        scores = torch.sigmoid(model(pixels).logits).numpy()
    return order, truth, scores, classes


def test_predictions_csv_lists_the_images_in_the_label_file_s_order(multi: dict) -> None:
    """Not grouped by class, as the evaluation reads them: the rows of labels.jsonl's test split as it lists them,
    each with its labels; bit finetune --report's too (its validation split)."""
    test = read_csv(multi["report"] / "predictions.csv")
    listed = [(str(p), sorted(names)) for p, names in multi["test"]]  # (sorted: the model's class order, by name)
    assert [(r["path"], json.loads(r["true_labels"])) for r in test] == listed
    first = [min(sorted(NAMES).index(n) for n in names) for _, names in multi["test"]]  # what groups the rows
    assert first != sorted(first), "the rows are grouped by class already: the test would test nothing"
    rows = [json.loads(line) for line in (multi["root"] / "labels.jsonl").read_text(encoding="utf-8").splitlines()]
    val = [str(multi["root"] / r["path"]) for r in rows if r["split"] == "val"]
    assert [r["path"] for r in read_csv(multi["run"] / "report" / "predictions.csv")] == val


def test_the_csv_files_hold_the_model_s_scores_and_every_error(multi: dict, oracle) -> None:
    """predictions.csv: every class's score as transformers computes it; errors.csv: every (image, class) on the
    wrong side of the class's threshold, class by class (most errors first), false positives by score from the
    highest, then false negatives from the lowest."""
    paths, truth, scores, classes = oracle
    rows = read_csv(multi["report"] / "predictions.csv")
    assert list(rows[0]) == ["path", "true_labels", "predicted_labels", *(f"score:{c}" for c in classes)]
    got = np.array([[float(r[f"score:{c}"]) for c in classes] for r in rows])
    np.testing.assert_allclose(got, scores, atol=2e-6)
    thresholds = [multi["json"]["thresholds"][c] for c in classes]
    assert thresholds == json.loads((multi["run"] / "config.json").read_text())["bitcli_thresholds"]
    assert np.abs(scores - np.array(thresholds)).min() > 1e-5  # no score at a threshold: the errors are exact
    for r, t in zip(rows, truth):
        assert json.loads(r["true_labels"]) == [c for c, x in zip(classes, t) if x]
    predicted = scores >= np.array(thresholds)
    expected = []
    for c, name in enumerate(classes):
        fp = sorted((-scores[i, c], i) for i in range(len(paths)) if predicted[i, c] and not truth[i, c])
        fn = sorted((scores[i, c], i) for i in range(len(paths)) if truth[i, c] and not predicted[i, c])
        cell = [(paths[i], name, "false positive") for _, i in fp] + [(paths[i], name, "false negative") for _, i in fn]
        if cell:
            expected.append(cell)
    expected.sort(key=lambda cell: -len(cell))  # (stable: ties keep the classes' order)
    errors = read_csv(multi["report"] / "errors.csv")
    assert [(r["path"], r["class"], r["error"]) for r in errors] == [e for cell in expected for e in cell]
    for r in errors:
        i, c = paths.index(r["path"]), classes.index(r["class"])
        assert float(r["score"]) == pytest.approx(scores[i, c], abs=2e-6)
        assert json.loads(r["predicted_labels"]) == [classes[k] for k in np.argsort(-scores[i]) if predicted[i, k]]


def test_the_page_in_chromium(multi: dict, oracle, browser_page, tmp_path: Path) -> None:
    """Per-class AP equal to scikit-learn's on transformers' scores, the planted images first among IMG's false
    positives and false negatives with their labels and overlays, every picture loaded, hostile names as text (no
    script ran), the per-class AP picture `--plot` draws, a phone's width; and a screenshot."""
    from sklearn.metrics import average_precision_score

    paths, truth, scores, classes = oracle
    report, result = multi["report"], multi["json"]
    page = browser_page.page
    page.goto((report / "index.html").as_uri())
    sources = page.evaluate(
        "async () => { for (const img of document.images) { img.scrollIntoView(); await img.decode(); }"
        " return [...document.images].map(img => [img.getAttribute('src'), img.naturalWidth]); }"
    )
    errors = read_csv(report / "errors.csv")
    assert len(errors) >= 2 and min(w for _, w in sources) > 0
    overlays = [
        f"images/{n:05d}-{'fp' if r['error'] == 'false positive' else 'fn'}.jpg" for n, r in enumerate(errors, 1)
    ]
    assert sorted(s for s, _ in sources) == sorted(["ap.png", *(f"images/{n:05d}.jpg" for n in range(1, len(errors) + 1)),
                                                    *overlays])  # fmt: skip
    assert (report / "ap.png").read_bytes() == (multi["root"] / "ap.png").read_bytes()  # the picture --plot draws

    table = page.eval_on_selector_all(
        ".per-class tbody tr", "trs => trs.map(tr => [...tr.cells].map(c => c.textContent))"
    )
    ap = {c: average_precision_score(truth[:, k], scores[:, k]) for k, c in enumerate(classes)}
    assert [row[0] for row in table] == sorted(classes, key=lambda c: (ap[c], classes.index(c)))  # lowest AP first
    for name, shown_ap, threshold, *_, images, fp, fn in table:
        assert float(shown_ap) == pytest.approx(ap[name], abs=5.1e-5)
        assert threshold == f"{result['thresholds'][name]:.4f}" and int(images) == truth[:, classes.index(name)].sum()
        assert (int(fp), int(fn)) == tuple(sum(r["class"] == name and r["error"] == k for r in errors)
                                           for k in ("false positive", "false negative"))  # fmt: skip
    stats = dict(page.eval_on_selector_all(".stats li", "lis => lis.map(li => [li.lastChild.textContent, li.firstChild.textContent])"))  # fmt: skip
    assert float(stats["mAP"]) == pytest.approx(average_precision_score(truth, scores, average="macro"), abs=5.1e-5)

    section = f"section[data-class='{IMG}']"
    firsts = {}
    for kind in ("false positive", "false negative"):
        figure = page.query_selector(f"{section} .grid[data-kind='{kind}'] figcaption")
        assert figure is not None, f"no {kind} of {IMG} on the page"
        firsts[kind] = figure.inner_text()
    planted = {"false positive": (PLANTED_FP, [QUOTE]), "false negative": (PLANTED_FN, [IMG])}
    for kind, (name, labels) in planted.items():
        path = str(multi["root"] / "images" / name)
        i = paths.index(path)
        assert firsts[kind].startswith(f"#{[r['path'] for r in errors].index(path) + 1} {path}\n")
        assert f"{kind}: {IMG} score {scores[i, classes.index(IMG)]:.3f}" in firsts[kind]
        assert f"labels: {', '.join(labels)}\n" in firsts[kind]
    text = page.inner_text("body")
    for name in NAMES:
        assert name in text
    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert browser_page.errors == []
    page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    page.set_viewport_size({"width": 390, "height": 800})
    assert page.evaluate("document.documentElement.scrollWidth") <= 390


def test_finetune_s_report_is_the_last_validation_s(multi: dict) -> None:
    """RUN/report of a multi-label run: the validation's per-class AP and thresholds, its picture the run's
    own per-class AP picture (confusion.png of a multi-label run); `bit report` says what it shows."""
    run = multi["run"]
    validation = json.loads((run / "validation.json").read_text())
    page = (run / "report" / "index.html").read_text()
    assert "<h1>bit eval report (multi-label)</h1>" in page
    for name, ap in validation["ap"].items():
        threshold = validation["thresholds"][name]
        assert f"{ap:.4f}</td><td>{threshold:.4f}</td>" in page
    assert (run / "report" / "ap.png").read_bytes() == (run / "confusion.png").read_bytes()
    assert read_csv(run / "report" / "predictions.csv")[0].keys() >= {"path", "true_labels", "predicted_labels"}
    code, out, err = run_main("report", run)
    assert (code, err) == (0, "")
    index = run / "report" / "index.html"
    assert f"  {index}  the last validation's report: metrics, per-class AP, each class's worst false positives and " \
           f"negatives with Grad-CAM (open in a browser: {index.resolve().as_uri()})\n" in out  # fmt: skip


def test_without_matplotlib_the_page_says_so_and_keeps_the_table(
    multi: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bitcli import extras

    available = extras.available
    monkeypatch.setattr(extras, "available", lambda extra: extra != "plots" and available(extra))
    code, _, err = run_main("eval", f"{multi['root'] / 'labels.jsonl'}:test", "--model", multi["run"], "--report",
                            tmp_path / "r", "-f", "json")  # fmt: skip
    assert code == 0, err
    assert not (tmp_path / "r" / "ap.png").exists()
    page = (tmp_path / "r" / "index.html").read_text()
    assert (
        "No per-class AP picture: it needs matplotlib (the plots extra), which is not installed "
        "(pip install &#x27;bitcli[plots]&#x27;)." in page
    )
    assert page.count('<table class="numbers per-class">') == 1
