"""`bit eval --report DIR` and `bit finetune --report`: the report folder (index.html, errors.csv, predictions.csv,
the pictures) of a tiny model on classes whose names are hostile HTML, with some images in the wrong class
folder. transformers is the oracle of every per-image number, scikit-learn of the per-class metrics, and headless
Chromium of the page itself (console errors, pictures, links, escaping, a phone's width)."""

from __future__ import annotations

import csv
import gc
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_main, write_folder

from bitcli.gallery.build import PER_PAIR
from bitcli.gallery.records import pairs

# Class folders named to break a page that does not escape them; each has its own dominant colour.
IMG = '<img src=x onerror="window.__pwned=1">'
SVG = '"><svg onload=window.__pwned=2>'
AMP = "blue & 'co'"
FILE = '"><img src=y onerror=window.__pwned=3>'  # a file name, too
COLUMNS = ["path", "true_label", "predicted_label", "p_true", "p_pred", "loss", "true_rank"]
ARGS = ["--random-init", "--model", "tiny", "--resolution", "16", "--steps", "12", "--batch-size", "8", "--lr",
        "0.03", "--eval-every", "0", "--workers", "1"]  # fmt: skip


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A data set (train/, val/ with five images moved into another class's folder), a run fine-tuned on it with
    --report, and `bit eval val --report --plot -f json`: {"data", "run", "report", "plot", "json"}."""
    root = tmp_path_factory.mktemp("hostile")
    write_folder(root / "data" / "train", {IMG: 10, SVG: 10, AMP: 10})
    write_folder(root / "data" / "val", {IMG: 6, SVG: 6, AMP: 6}, seed=1)
    for source, target, i in [(IMG, SVG, 0), (IMG, SVG, 1), (SVG, AMP, 0), (AMP, IMG, 0), (IMG, AMP, 2)]:
        val = root / "data" / "val"
        shutil.move(val / source / f"{i:03d}.png", val / target / f"{FILE} {i}.png")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code, _, err = run_main("finetune", root / "data", "--output", root / "run", "--report", *ARGS)
        assert code == 0, err
        code, out, err = run_main("eval", root / "data" / "val", "--model", root / "run", "--report", root / "report",
                                  "--plot", root / "confusion.png", "-f", "json")  # fmt: skip
        assert code == 0, err
    finally:
        torch.set_num_threads(threads)
    return {"data": root / "data", "run": root / "run", "report": root / "report", "plot": root / "confusion.png",
            "json": json.loads(out)}  # fmt: skip


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        return list(reader)


def transformers_probabilities(run: Path, paths: list[str]) -> tuple[np.ndarray, list[str]]:
    """(softmax [N, classes], labels) of the run's model as transformers loads and preprocesses it."""
    import transformers
    from PIL import Image

    model = transformers.BitForImageClassification.from_pretrained(run).eval()
    processor = transformers.BitImageProcessorPil.from_pretrained(run)
    with torch.no_grad():
        logits = model(**processor([Image.open(p).convert("RGB") for p in paths], return_tensors="pt")).logits
    return logits.softmax(dim=1).numpy(), [model.config.id2label[i] for i in range(logits.shape[1])]


def test_every_number_of_the_csv_files_is_the_model_s(hostile: dict[str, Path]) -> None:
    """predictions.csv: one row per image in the data set's order, each number as transformers computes it;
    errors.csv: the wrong ones, grouped by (true, predicted) cell, the largest cell first, by loss within."""
    rows = read_csv(hostile["report"] / "predictions.csv")
    val = hostile["data"] / "val"
    assert [r["path"] for r in rows] == [str(p) for c in sorted([IMG, SVG, AMP]) for p in sorted((val / c).iterdir())]
    assert [r["true_label"] for r in rows] == [Path(r["path"]).parent.name for r in rows]
    probs, labels = transformers_probabilities(hostile["run"], [r["path"] for r in rows])
    for row, p in zip(rows, probs):
        true = labels.index(row["true_label"])
        assert row["predicted_label"] == labels[int(p.argmax())]
        assert float(row["p_true"]) == pytest.approx(p[true], abs=1e-5)
        assert float(row["p_pred"]) == pytest.approx(p.max(), abs=1e-5)
        assert float(row["loss"]) == pytest.approx(-np.log(p[true]), abs=1e-4)
        assert int(row["true_rank"]) == 1 + int((p > p[true]).sum())
    wrong = [r for r in rows if r["true_label"] != r["predicted_label"]]
    errors = read_csv(hostile["report"] / "errors.csv")
    assert sorted(map(tuple, (r.values() for r in errors))) == sorted(map(tuple, (r.values() for r in wrong)))
    assert len({(r["true_label"], r["predicted_label"]) for r in errors}) >= 2, "the data no longer makes errors"
    cells = [(r["true_label"], r["predicted_label"]) for r in errors]
    runs = [cell for i, cell in enumerate(cells) if i == 0 or cells[i - 1] != cell]
    assert len(runs) == len(set(runs))  # each cell's errors together
    sizes = [cells.count(cell) for cell in runs]
    assert sizes == sorted(sizes, reverse=True)
    for cell in runs:
        losses = [float(r["loss"]) for r in errors if (r["true_label"], r["predicted_label"]) == cell]
        assert losses == sorted(losses, reverse=True)


def test_finetune_s_report_is_the_last_validation_and_bit_report_links_it(hostile: dict[str, Path]) -> None:
    ours, theirs = (read_csv(folder / "predictions.csv") for folder in (hostile["report"], hostile["run"] / "report"))
    assert [r["path"] for r in theirs] == [r["path"] for r in ours]
    for a, b in zip(ours, theirs):
        assert (a["true_label"], a["predicted_label"], a["true_rank"]) == (
            b["true_label"],
            b["predicted_label"],
            b["true_rank"],
        )
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), abs=1e-5)
    assert (hostile["run"] / "report" / "images").is_dir()
    code, out, err = run_main("report", hostile["run"])
    assert (code, err) == (0, "")
    page = hostile["run"] / "report" / "index.html"
    assert f"  {page}  the last validation's report: metrics, confusion matrix, the misclassified images with " \
           f"Grad-CAM (open in a browser: {page.resolve().as_uri()})" in out  # fmt: skip


def test_the_report_folder_is_refused_when_it_holds_the_user_s_files(hostile: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "todo.txt").write_text("mine")
    code, out, err = run_main("eval", hostile["data"] / "val", "--model", "nothing-is-loaded", "--report", folder)
    assert (code, out) == (2, "")
    assert err == (
        f"Error: --report {folder}: holds 'todo.txt', which bitcli did not write; give a new or empty folder, "
        "or the folder of an earlier report\n"
    )
    inside = hostile["data"] / "val" / "report"  # its pictures would be a class folder of the next eval
    code, out, err = run_main("eval", hostile["data"] / "val", "--model", "nothing-is-loaded", "--report", inside)
    assert (code, out) == (2, "")
    assert err == f"Error: --report {inside}: is inside the image folder {inside.parent}; choose a folder outside it\n"
    assert not inside.exists()
    code, out, err = run_main("finetune", hostile["data"] / "train", "--output", tmp_path / "run", "--report", *ARGS)
    assert code == 2 and err == (
        "Error: --report shows the errors of the last validation, and this run has no validation set: give --val "
        "DATA or --val-split F (or a DATA with a val split)\n"
    )
    assert not (tmp_path / "run").exists()


def test_finetune_report_takes_a_val_split_as_its_validation(hostile, tmp_path):
    """--val-split F holds out a validation set from DATA: --report has its errors to show (it was refused)."""
    run = tmp_path / "run"
    code, _, err = run_main("finetune", hostile["data"] / "train", "--output", run, "--val-split", "0.2", "--report",
                            *ARGS)  # fmt: skip
    assert code == 0, err
    rows = read_csv(run / "report" / "predictions.csv")
    assert len(rows) == 6  # 0.2 of each class of 10 images held out
    assert {r["true_label"] for r in rows} == {IMG, SVG, AMP}
    assert (run / "report" / "index.html").is_file()


def test_a_rerun_replaces_the_earlier_report_and_keeps_the_user_s_files(
    hostile: dict[str, Path], tmp_path: Path
) -> None:
    """The second report is of two of the three classes: predictions of the third are `(other)` and link to their
    own section; the first report's pictures it does not have are gone, the user's note stays."""
    folder = tmp_path / "report"
    shutil.copytree(hostile["report"], folder)
    (folder / "notes.txt").write_text("mine")
    data = tmp_path / "two"
    for name in (IMG, SVG):
        shutil.copytree(hostile["data"] / "val" / name, data / name)
    code, _, err = run_main("eval", data, "--model", hostile["run"], "--report", folder, "-f", "json")
    assert code == 0, err
    assert gc.get_freeze_count() == 0  # the objects the report kept out of full collections are back in them
    assert (folder / "notes.txt").read_text() == "mine"
    errors = read_csv(folder / "errors.csv")
    pictures = sorted(p.name for p in (folder / "images").iterdir())
    shown = [f"{n:05d}{s}.jpg" for n in range(1, len(errors) + 1) for s in ("", "-pred", "-true")]
    assert pictures == sorted(shown)  # PER_PAIR is not reached: every error is shown, and nothing else is there
    assert len(errors) <= PER_PAIR * 2
    page = (folder / "index.html").read_text()
    axis = {SVG: 0, IMG: 1}  # the model's label order ('"' before '<'), then the (other) column
    outside = {r["true_label"] for r in errors if r["predicted_label"] == AMP}  # named as the model names it
    assert outside, "the data no longer makes a prediction outside the two classes"
    for true in outside:
        anchor = f"pair-{axis[true]}-2"
        assert f'<a href="#{anchor}">' in page and f'<section class="pair" id="{anchor}">' in page
    assert "a label outside the evaluated classes" in page


def test_an_onnx_model_gets_the_gallery_without_grad_cam(tiny_dir: Path, tiny_onnx: Path, tmp_path: Path) -> None:
    """The same errors as its torch checkpoint's (random weights: most images are wrong), no overlays, and the
    page says why."""
    write_folder(tmp_path / "fruit", {"apple": 3, "banana": 3, "cherry": 3}, size=24)
    for model, report in ((tiny_dir, "torch"), (tiny_onnx, "onnx")):
        code, _, err = run_main("eval", tmp_path / "fruit", "--model", model, "--report", tmp_path / report)
        assert code == 0, err
    page = (tmp_path / "onnx" / "index.html").read_text()
    assert "No Grad-CAM overlays: " in page and "Grad-CAM needs the torch checkpoint the ONNX file was exported" in page
    assert not [p for p in (tmp_path / "onnx" / "images").iterdir() if p.stem.endswith(("-pred", "-true"))]
    assert [p for p in (tmp_path / "torch" / "images").iterdir() if p.stem.endswith(("-pred", "-true"))]
    ours, theirs = read_csv(tmp_path / "onnx" / "errors.csv"), read_csv(tmp_path / "torch" / "errors.csv")
    assert len(theirs) >= 3
    assert [(r["path"], r["predicted_label"]) for r in ours] == [(r["path"], r["predicted_label"]) for r in theirs]
    for a, b in zip(ours, theirs):
        assert float(a["p_true"]) == pytest.approx(float(b["p_true"]), abs=1e-4)


def test_the_page_in_chromium(hostile: dict[str, Path], browser_page, tmp_path: Path) -> None:
    """No console error, every picture loads, the gallery is errors.csv's rows in its order, a confusion cell's
    link scrolls to its section, the per-class table is scikit-learn's, hostile names are text (no script ran),
    a phone's width scrolls no page sideways; and a screenshot."""
    from sklearn.metrics import precision_recall_fscore_support

    page = browser_page.page
    page.goto((hostile["report"] / "index.html").as_uri())
    widths = page.evaluate(
        "async () => { for (const img of document.images) { img.scrollIntoView(); await img.decode(); }"
        " return [...document.images].map(img => img.naturalWidth); }"
    )
    errors = read_csv(hostile["report"] / "errors.csv")
    assert len(widths) == 3 * len(errors) + 1 and min(widths) > 0  # and the reliability diagram
    figures = page.eval_on_selector_all("figure .path", "nodes => nodes.map(n => n.textContent)")
    assert figures == [f"#{i} {r['path']}" for i, r in enumerate(errors, 1)]
    headings = page.eval_on_selector_all("section.pair h3", "nodes => nodes.map(n => n.textContent)")
    cells = [(r["true_label"], r["predicted_label"]) for r in errors]
    expected = list(dict.fromkeys(cells))
    counts = [cells.count(c) for c in expected]
    assert headings == [f"{t} \u2192 {p}: {n} image{'s' * (n != 1)}" for (t, p), n in zip(expected, counts)]

    page.evaluate("window.scrollTo(0, 0)")
    target = page.eval_on_selector_all(".confusion a", "links => links.map(a => a.getAttribute('href'))")[-1]
    page.click(f".confusion a[href='{target}']")
    assert page.evaluate("location.hash") == target
    assert page.evaluate(f"document.querySelector('{target}').matches(':target')")
    scrolled, expected = page.evaluate(
        f"() => {{ const top = document.querySelector('{target}').getBoundingClientRect().top + scrollY;"
        " return [scrollY, Math.min(top - 8, document.documentElement.scrollHeight - innerHeight)]; }"
    )  # the section at the top (less its scroll margin), or the page scrolled to its end
    assert scrolled > 0 and abs(scrolled - expected) <= 2

    rows = read_csv(hostile["report"] / "predictions.csv")
    classes = sorted({r["true_label"] for r in rows})
    p, r, f, _ = precision_recall_fscore_support([x["true_label"] for x in rows], [x["predicted_label"] for x in rows],
                                                 labels=classes, zero_division=0)  # fmt: skip
    shown = page.eval_on_selector_all(
        ".per-class tbody tr", "trs => trs.map(tr => [...tr.cells].map(c => c.textContent))"
    )
    expected_rows = sorted(([c, f"{r[i]:.4f}", f"{p[i]:.4f}", f"{f[i]:.4f}"] for i, c in enumerate(classes)),
                           key=lambda row: (row[3], row[1], row[2], row[0]))  # fmt: skip
    assert [[row[0], row[2], row[3], row[4]] for row in shown] == expected_rows

    text = page.inner_text("body")
    for name in (IMG, SVG, AMP, FILE):
        assert name in text
    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert browser_page.errors == []
    shot = page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    assert shot[:8] == b"\x89PNG\r\n\x1a\n"

    page.set_viewport_size({"width": 390, "height": 800})
    assert page.evaluate("document.documentElement.scrollWidth") <= 390


def test_the_page_shows_the_reliability_diagram_ece_and_nll(hostile: dict[str, Path], browser_page) -> None:
    """The reliability diagram that --plot draws (the same bytes), ECE and NLL beside top-1, and the 15 bins as
    numbers: bit eval's JSON. Fine-tuning's report says its scores are before the temperature it fitted."""
    result, report = hostile["json"], hostile["report"]
    plotted = hostile["plot"].with_name("confusion-reliability.png")  # --plot's reliability diagram
    assert (report / "reliability.png").read_bytes() == plotted.read_bytes()
    page = browser_page.page
    page.goto((report / "index.html").as_uri())
    picture = page.query_selector(".plot img")
    assert picture is not None and picture.get_attribute("src") == "reliability.png"
    picture.scroll_into_view_if_needed()
    assert page.evaluate("async img => { await img.decode(); return img.naturalWidth; }", picture) == 600
    stats = dict(page.eval_on_selector_all(".stats li", "lis => lis.map(li => [li.lastChild.textContent, li.firstChild.textContent])"))  # fmt: skip
    assert {k: stats[k] for k in ("top-1", "NLL", "ECE")} == {k: f"{result[j]:.4f}" for k, j in
                                                             (("top-1", "top1"), ("NLL", "nll"), ("ECE", "ece"))}  # fmt: skip
    assert not page.is_visible(".reliability")  # folded under the picture ...
    page.click("details summary")
    assert page.is_visible(".reliability")  # ... until opened
    rows = page.eval_on_selector_all(
        ".reliability tbody tr", "trs => trs.map(tr => [...tr.cells].map(c => c.textContent))"
    )
    rel = result["reliability"]
    assert len(rows) == 15 and (rows[0][0], rows[-1][0]) == ("(0.000, 0.067]", "(0.933, 1.000]")
    assert [int(r[1]) for r in rows] == rel["count"] and sum(rel["count"]) == result["count"]
    for row, n, confidence, accuracy in zip(rows, rel["count"], rel["confidence"], rel["accuracy"]):
        want = [f"{confidence:.4f}", f"{accuracy:.4f}", f"{accuracy - confidence:+.4f}"] if n else ["\u2013"] * 3
        assert row[2:] == want
    assert browser_page.errors == []
    fitted = json.loads((hostile["run"] / "summary.json").read_text())["calibration"]
    finetuned = (hostile["run"] / "report" / "index.html").read_text()
    assert fitted["temperature"] != 1.0
    assert (
        "The scores on this page are the last validation&#x27;s at temperature 1; the model saved in the run "
        f"applies the temperature fitted on them (calibrated: temperature {fitted['temperature']:.4g} fitted on 18 "
        f"validation images; ECE {fitted['val_ece_before']:.4f} -&gt; {fitted['val_ece_after']:.4f}, "
    ) in finetuned
    assert (hostile["run"] / "report" / "reliability.png").is_file()


def test_without_matplotlib_the_bins_are_a_table_and_the_page_says_why(
    hostile: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bitcli import extras

    available = extras.available
    monkeypatch.setattr(extras, "available", lambda extra: extra != "plots" and available(extra))
    code, out, err = run_main("eval", hostile["data"] / "val", "--model", hostile["run"], "--report", tmp_path / "r",
                              "-f", "json")  # fmt: skip
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "r").iterdir() if p.is_file()) == [
        ".bitcli-page.json", "errors.csv", "index.html", "predictions.csv"
    ]  # fmt: skip
    page = (tmp_path / "r" / "index.html").read_text()
    assert (
        '<p class="note">No reliability picture: it needs matplotlib (the plots extra), which is not installed '
        "(pip install &#x27;bitcli[plots]&#x27;); the bins are below as numbers.</p>"
        '<div class="scroll"><table class="numbers reliability">'
    ) in page
    assert "<details>" not in page
    assert f"<li><b>{json.loads(out)['ece']:.4f}</b>ECE</li>" in page


def test_an_undecodable_image_is_one_line_and_no_report_is_written(tiny_dir: Path, tmp_path: Path) -> None:
    """Metrics of a pass that skipped an image would be wrong: bit eval stops with one line naming the file, and
    the report folder is not even created."""
    write_folder(tmp_path / "fruit", {"apple": 2, "banana": 2}, size=24)
    broken = tmp_path / "fruit" / "banana" / f"{FILE}.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not a picture")
    code, out, err = run_main("eval", tmp_path / "fruit", "--model", tiny_dir, "--report", tmp_path / "report")
    assert (code, out) == (1, "")
    assert err == f"Error: {broken}: not an image PIL can read (empty, corrupt or another format)\n"
    assert not (tmp_path / "report").exists()


def test_an_image_spoilt_before_the_gallery_is_drawn_is_shown_with_why(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gallery decodes the images it shows again: one that no longer decodes (replaced while the pass ran)
    keeps its place, scores and CSV rows, without pictures, the page saying why; every other one is drawn."""
    import bitcli.commands.eval as eval_command

    write_folder(tmp_path / "fruit", {"apple": 3, "banana": 3, "cherry": 3}, size=24)
    write = eval_command.write_report
    spoilt: list[str] = []

    def spoil_the_first_then_write(folder: Path, engine, source, *, result, results, batch_size, workers) -> None:
        first = int(pairs(results)[0].rows[0])  # the gallery's first image
        path = Path(source.ds.paths[int(results.index[first])])
        path.write_bytes(b"spoilt")
        spoilt.append(str(path))
        write(folder, engine, source, result=result, results=results, batch_size=batch_size, workers=workers)

    monkeypatch.setattr(eval_command, "write_report", spoil_the_first_then_write)
    code, _, err = run_main("eval", tmp_path / "fruit", "--model", tiny_dir, "--report", tmp_path / "report")
    assert code == 0, err
    errors = read_csv(tmp_path / "report" / "errors.csv")
    assert errors[0]["path"] == spoilt[0] and len(errors) >= 3  # random weights: most images are wrong
    page = (tmp_path / "report" / "index.html").read_text()
    why = f"could not be read again: {spoilt[0]}: not an image PIL can read (empty, corrupt or another format)"
    assert f'<div class="note">{why}</div>' in page
    pictures = sorted(p.name for p in (tmp_path / "report" / "images").iterdir())
    assert pictures == sorted(
        f"{n:05d}{kind}.jpg" for n in range(2, len(errors) + 1) for kind in ("", "-pred", "-true")
    )


def test_folders_and_pictures_another_command_owns_are_refused_at_flag_time(
    hostile: dict[str, Path], tmp_path: Path
) -> None:
    """Before any work (exit 2): `bit explain`'s folder, a --plot inside the --report folder, and `bit finetune
    --overwrite --report` whose report folder holds a file of the user's (it would be left there, unmarked)."""
    from bitcli.pages.folder import EXPLAIN, write_page_folder

    val = hostile["data"] / "val"
    write_page_folder(tmp_path / "explained", {"explain.jsonl": b""}, EXPLAIN)
    code, out, err = run_main("eval", val, "--model", "nothing-is-loaded", "--report", tmp_path / "explained")
    assert (code, out) == (2, "")
    assert err == (
        f"Error: --report {tmp_path / 'explained'}: was written by bit explain; give a new or empty folder, or one "
        "that bit eval --report wrote\n"
    )
    plot = tmp_path / "rep" / "confusion.png"
    code, out, err = run_main("eval", val, "--model", "nothing-is-loaded", "--plot", plot, "--report", plot.parent)
    assert (code, out) == (2, "")
    assert err == (
        f"Error: --plot {plot}: is inside the --report folder {plot.parent}, which holds only the report's files "
        "(its confusion matrix included); write the picture elsewhere\n"
    )
    assert not plot.parent.exists()
    run = tmp_path / "run"
    shutil.copytree(hostile["run"], run)
    (run / "report" / "mine.txt").write_text("mine")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    code, out, err = run_main("finetune", hostile["data"], "--output", run, "--report", "--overwrite", *ARGS)
    assert (code, out) == (2, "")
    assert err == (
        f"Error: --report: the report folder {run / 'report'}: holds 'mine.txt', which bitcli did not write and "
        "--overwrite would leave in the new report's folder; move it out first\n"
    )
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # no training, nothing removed


def test_cells_beyond_the_cap_of_pictures_are_table_rows_not_sections(
    hostile: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With one picture allowed in all, only the first cell has a section; every other cell is one row of a
    single table, which the confusion matrix's link still reaches."""
    import bitcli.gallery.build as build

    monkeypatch.setattr(build, "MAX_SHOWN", 1)
    code, _, err = run_main("eval", hostile["data"] / "val", "--model", hostile["run"], "--report", tmp_path / "r",
                            "-f", "json")  # fmt: skip
    assert code == 0, err
    page = (tmp_path / "r" / "index.html").read_text()
    errors = read_csv(tmp_path / "r" / "errors.csv")
    cells = list(dict.fromkeys((r["true_label"], r["predicted_label"]) for r in errors))
    assert len(cells) >= 3, "the data no longer makes errors in three cells"
    assert page.count('<section class="pair"') == 1
    first = sum(1 for r in errors if (r["true_label"], r["predicted_label"]) == cells[0])
    if first > 1:
        assert f"1 shown; the other {first - 1} {'is' if first == 2 else 'are'} in errors.csv." in page
    assert f"The other {len(cells) - 1} cells: no picture shown" in page
    links = re.findall(r'<a href="#(pair-\d+-\d+)">', page)
    assert len(links) == len(cells)
    for anchor in links:
        assert page.count(f'id="{anchor}"') == 1
    assert page.count('<tr id="pair-') == len(cells) - 1


def test_per_class_ties_keep_the_classes_order() -> None:
    """Equal F1, recall and precision: the classes' own order (a label file's, here c, a, b), not the names'."""
    from bitcli.gallery.page import _per_class
    from bitcli.metrics import EvalResult

    result = EvalResult(top1=0.5, top5=None, loss=1.0, count=6, per_class={"c": 0.5, "a": 0.5, "b": 0.5},
                        labels=["c", "a", "b"], confusion=[[1, 1, 0], [0, 1, 1], [1, 0, 1]])  # fmt: skip
    assert re.findall(r"<tr><td>(\w)</td>", _per_class(result)) == ["c", "a", "b"]
