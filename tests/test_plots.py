"""The pictures (bitcli.plots): PNGs that decode, have the size the layout gives and show something; the same
numbers give the same bytes; every class up to 50, the most confused ones beyond; class names drawn literally;
`bit eval --plot` (the confusion picture and the reliability diagram); one line when matplotlib is missing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run_main, write_folder
from PIL import Image

from bitcli import extras, plots
from bitcli.metrics import OTHER


def decoded(data: bytes | Path) -> np.ndarray:
    """The picture's pixels; it must be a PNG that is not blank (many colours, not one flat field)."""
    import io

    image = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
    assert image.format == "PNG"
    pixels = np.asarray(image.convert("RGB"))
    assert pixels.std() > 10 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50
    return pixels


def expected_size(row_names: list[str], col_names: list[str], totals: list[int]) -> tuple[int, int]:
    """Pixels: the layout's inches (matrix, names as drawn) at the fixed dpi."""
    width, height = plots.confusion_size(*plots.tick_labels(row_names, col_names, np.asarray(totals)))
    return round(width * plots.DPI), round(height * plots.DPI)


def records(steps: int, every: int) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for s in range(steps):
        r = {
            "step": s,
            "lr": 0.1 * min(1.0, s / 10),
            "loss": float(2 * np.exp(-s / 30) + 0.1 * rng.random()),
            "images_per_s": 50.0,
        }
        if (s + 1) % every == 0:
            r |= {"val_top1": 1 - np.exp(-s / 30), "val_top5": None, "val_loss": float(np.exp(-s / 30))}
        out.append(r)
    return out


def test_confusion_size_leaves_room_for_the_names() -> None:
    """Ten digits: a 4-inch matrix, upright column names; long names widen the picture, not squeeze the matrix."""
    digits = [str(d) for d in range(10)]
    assert plots.confusion_size(*plots.tick_labels(digits, digits, np.full(10, 36))) == (6.71, 5.49)
    long = ["a very long class name that goes on"] * 10
    width, height = plots.confusion_size(*plots.tick_labels(long, long, np.full(10, 36)))
    assert (width, height) == (8.67, 7.44)  # 4 + 2.2 + 29 characters x 0.085 in; 4 + 1.4 + 24 x 0.085 in (turned)


def test_curves_are_deterministic_and_span_the_whole_run() -> None:
    data = plots.curves_png(records(60, 20), total_steps=100, title="training curves: step 60 of 100")
    pixels = decoded(data)
    assert pixels.shape == (800, 800, 3)
    assert plots.curves_png(records(60, 20), 100, "training curves: step 60 of 100") == data  # byte-identical
    assert b"matplotlib" not in data.lower() and b"Software" not in data  # no version or timestamp in the file
    assert plots.curves_png(records(61, 20), 100, "training curves: step 60 of 100") != data


def test_curves_count_steps_from_1_as_every_message_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """A record of step index s is drawn at x = s + 1, the number the progress line and the title give it:
    validations after steps 3, 6, 9, 12 at x = 3, 6, 9, 12; the lr of step k at k, so that a drop "after step 6"
    (steps 1-6 at 0.1, 7-12 at 0.01) is drawn at x = 6; the warm-up's lr 0 (step 1) is not drawn."""
    figures = []
    monkeypatch.setattr(plots, "_png", lambda fig: figures.append(fig) or b"")
    lrs = [0.0, 0.05, 0.1, 0.1, 0.1, 0.1] + [0.01] * 6
    rows = [{"step": s, "lr": lrs[s], "loss": 2.0 - 0.1 * s, "images_per_s": 50.0} for s in range(12)]
    for s in (2, 5, 8, 11):
        rows[s] |= {"val_top1": 0.05 * s, "val_top5": None, "val_loss": 1.0 - 0.05 * s}
    plots.curves_png(rows, total_steps=12, title="training curves: 12 of 12 steps")
    ax_loss, ax_acc, ax_lr = figures[0].axes
    every = list(range(1, 13))
    assert [(line.get_label(), list(line.get_xdata())) for line in ax_loss.lines] == [
        ("training loss (each step)", every),
        ("validation loss", [3, 6, 9, 12]),
    ]
    assert [list(line.get_xdata()) for line in ax_acc.lines] == [[3, 6, 9, 12]]
    (lr_line,) = ax_lr.lines
    assert list(lr_line.get_xdata()) == every[1:] and list(lr_line.get_ydata()) == lrs[1:]
    from matplotlib.cbook import STEP_LOOKUP_MAP

    x, y = STEP_LOOKUP_MAP[lr_line.get_drawstyle()](lr_line.get_xdata(), lr_line.get_ydata())
    assert min(x[y == 0.01]) == 6 and max(x[y == 0.1]) == 6  # the drop after step 6, at x = 6


def confusion(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.diag(rng.integers(20, 40, n)) + rng.poisson(0.5, (n, n))


@pytest.mark.parametrize("n", [3, 50])
def test_confusion_shows_every_class_up_to_50(n: int) -> None:
    names = [f"class {i}" for i in range(n)]
    counts = np.pad(confusion(n), ((0, 1), (0, 1)))  # an (other) column and its empty row
    counts[0, n] = 2
    data = plots.confusion_png([*names, OTHER], counts.tolist(), "title", other=OTHER)
    assert decoded(data).shape[1::-1] == expected_size(names, [*names, OTHER], counts[:n].sum(axis=1).tolist())
    row_names, col_names, shown, note = plots.summarise([*names, OTHER], counts, OTHER)
    assert (row_names, col_names, note) == (names, [*names, OTHER], "")
    assert shown.tolist() == counts[:n].tolist()


def test_confusion_beyond_50_classes_shows_the_most_confused() -> None:
    n = 120
    counts = np.diag(np.full(n, 10))
    for true, pred, k in [(7, 9, 5), (100, 7, 3), (55, 56, 1)]:  # errors: 7 is in two confusions
        counts[true, pred] = k
    names = [f"c{i}" for i in range(n)]
    rows, cols, shown, note = plots.summarise(names, counts, None)
    confused = {7, 9, 55, 56, 100}  # every class with an error, then the first classes without (ties: by position)
    picked = sorted(confused | set([i for i in range(n) if i not in confused][:25]))
    assert rows == [names[i] for i in picked]
    assert cols == [*rows, plots.REST]
    assert (
        shown.sum(axis=1).tolist() == counts[[names.index(r) for r in rows]].sum(axis=1).tolist()
    )  # rows keep their images
    assert note == f"the 30 of 120 classes with the most errors; {plots.REST}: predictions of any other class"
    data = plots.confusion_png(names, counts.tolist(), "ImageNet-size", other=None)
    assert decoded(data).shape[1::-1] == expected_size(rows, cols, shown.sum(axis=1).tolist())


def test_class_names_are_drawn_literally() -> None:
    """ "$x^2$" is not mathtext, "[bold]" not markup, a newline is shown as \\n; a long name is shortened."""
    names = ["$x^2$", "[bold]cat[/bold]", "a\nb", "a very long class name that goes on and on", "猫"]
    data = plots.confusion_png(names, confusion(5).tolist(), "title with $ in it", other=None)
    assert decoded(data).shape[1::-1] == expected_size(names, names, confusion(5).sum(axis=1).tolist())
    assert plots._short(names[3]) == "a very long class name …" and plots._short("a\nb") == "a\\nb"


BOXED = "(install a font that has them, e.g. Noto Sans CJK for Chinese, Japanese and Korean)"
NO_FONT = "\U0010ff00"  # a private-use character of plane 16: no font maps it (Last Resort draws a box for any)


def square_font(path: Path, family: str, characters: str) -> Path:
    """A TrueType font `family` that draws each of `characters` as a filled square (fontTools: matplotlib's)."""
    from fontTools.fontBuilder import FontBuilder
    from fontTools.pens.ttGlyphPen import TTGlyphPen

    def glyph(filled: bool):
        pen = TTGlyphPen(None)
        if filled:
            pen.moveTo((100, 0))
            for corner in [(100, 700), (900, 700), (900, 0)]:
                pen.lineTo(corner)
            pen.closePath()
        return pen.glyph()

    names = [f"u{ord(c):X}" for c in characters]
    builder = FontBuilder(1000, isTTF=True)
    builder.setupGlyphOrder([".notdef", *names])
    builder.setupCharacterMap({ord(c): name for c, name in zip(characters, names)})
    builder.setupGlyf({".notdef": glyph(False), **{name: glyph(True) for name in names}})
    builder.setupHorizontalMetrics(dict.fromkeys([".notdef", *names], (1000, 100)))
    builder.setupHorizontalHeader(ascent=800, descent=-200)
    builder.setupNameTable({"familyName": family, "styleName": "Regular"})
    builder.setupOS2(sTypoAscender=800, sTypoDescender=-200, usWinAscent=800, usWinDescent=200)
    builder.setupPost()
    builder.save(str(path))
    return path


def test_class_names_no_font_can_draw_are_named_once(capsys, monkeypatch) -> None:
    """A class name with characters no installed font has: one warning line naming those classes literally,
    however often the picture is drawn (fine-tuning draws it at every validation); the bytes stay the same."""
    monkeypatch.setattr(plots, "_warned", set(), raising=False)
    names = ["cat", f"x{NO_FONT}", f"dog\n{NO_FONT}[bold]", "$y$"]
    first = plots.confusion_png(names, confusion(4).tolist(), "title", other=None)
    assert plots.confusion_png(names, confusion(4).tolist(), "title", other=None) == first
    assert capsys.readouterr() == (
        "",
        f"warning: no installed font has every character of the class names 'x{NO_FONT}', 'dog\\n{NO_FONT}[bold]'; "
        f"the confusion picture shows those characters as boxes {BOXED}\n",
    )
    plots.confusion_png(["cat", "dog"], confusion(2).tolist(), f"run {NO_FONT}", other=None)
    assert capsys.readouterr().err == (
        f"warning: no installed font has every character of the title; the confusion picture shows those characters "
        f"as boxes {BOXED}\n"
    )
    many = [f"{i}{NO_FONT}" for i in range(12)]  # the first ten are named
    plots.confusion_png(many, confusion(12).tolist(), f"run {NO_FONT}", other=None)
    assert capsys.readouterr().err == (
        "warning: no installed font has every character of the class names "
        + ", ".join(f"'{name}'" for name in many[:10])
        + f" and 2 more and the title; the confusion picture shows those characters as boxes {BOXED}\n"
    )


def test_the_warning_names_the_picture_it_is_about(capsys, monkeypatch) -> None:
    """The reliability and per-class AP pictures warn in their own name, not the confusion picture's; each
    picture warns once, even when another one has already warned about the same title."""
    monkeypatch.setattr(plots, "_warned", set(), raising=False)
    title = f"run {NO_FONT}"
    plots.confusion_png(["cat", "dog"], confusion(2).tolist(), title, other=None)
    assert capsys.readouterr().err == (
        f"warning: no installed font has every character of the title; the confusion picture shows those characters "
        f"as boxes {BOXED}\n"
    )
    reliability = {"count": 10, "ece": 0.1, "nll": 0.2,
                   "reliability": {"count": [0, 10], "confidence": [None, 0.8], "accuracy": [None, 0.7]}}  # fmt: skip
    plots.reliability_png(reliability, title)
    plots.reliability_png(reliability, title)
    assert capsys.readouterr().err == (
        f"warning: no installed font has every character of the title; the reliability picture shows those "
        f"characters as boxes {BOXED}\n"
    )
    names = ["cat", f"x{NO_FONT}"]
    ap = {"labels": names, "ap": {"cat": 0.9, names[1]: 0.5}, "f1": {"cat": 0.8, names[1]: 0.4}, "count": 10,
          "mAP": 0.7, "micro_f1": 0.6, "macro_f1": 0.6}  # fmt: skip
    plots.ap_png(ap, "run")
    assert capsys.readouterr().err == (
        f"warning: no installed font has every character of the class names 'x{NO_FONT}'; the per-class AP picture "
        f"shows those characters as boxes {BOXED}\n"
    )


def test_names_the_default_font_lacks_are_drawn_with_an_installed_font_that_has_them(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    """DejaVu Sans has no 猫: a font that has it follows in matplotlib's fallback list, and nothing is warned."""
    from matplotlib import font_manager

    monkeypatch.setattr(plots, "_warned", set(), raising=False)
    names, counts = ["猫", f"x{NO_FONT}", "cat"], confusion(3).tolist()
    without = plots.confusion_png(names, counts, "title", other=None)
    assert f"'x{NO_FONT}'" in capsys.readouterr().err
    monkeypatch.setattr(font_manager.fontManager, "ttflist", list(font_manager.fontManager.ttflist))  # put back after
    font_manager.fontManager.addfont(square_font(tmp_path / "squares.ttf", "Bitcli Squares", f"猫{NO_FONT}"))
    with_font = plots.confusion_png(names, counts, "title", other=None)
    assert capsys.readouterr() == ("", "")
    assert with_font != without  # squares, not Last Resort's boxes
    assert plots.confusion_png(names, counts, "title", other=None) == with_font  # deterministic
    from bitcli import fonts

    assert fonts.fallback(names) == (["DejaVu Sans", "Bitcli Squares"], set())
    assert fonts.fallback(["cat", "Ωμέγα", "Ж"]) == (["DejaVu Sans"], set())  # DejaVu Sans has them: no fallback


def test_a_font_installed_after_matplotlib_built_its_cache_is_found(tmp_path: Path, monkeypatch) -> None:
    """matplotlib lists the fonts of its cache; one installed since (apt-get install fonts-noto-cjk) is found."""
    from matplotlib import font_manager

    from bitcli import fonts

    path = square_font(tmp_path / "late.ttf", "Bitcli Late", NO_FONT)
    monkeypatch.setattr(font_manager.fontManager, "ttflist", list(font_manager.fontManager.ttflist))
    monkeypatch.setattr(font_manager, "findSystemFonts", lambda *a, **kw: [str(path)])
    fonts._add_fonts_installed_since_the_cache.cache_clear()
    try:
        assert fonts.fallback([NO_FONT]) == (["DejaVu Sans", "Bitcli Late"], set())
    finally:
        fonts._add_fonts_installed_since_the_cache.cache_clear()  # the real system fonts, for later tests


def test_eval_plot_writes_the_confusion_picture(tiny_dir: Path, tmp_path: Path) -> None:
    write_folder(tmp_path / "data", {"apple": 3, "banana": 3, "cherry": 2})
    picture = tmp_path / "out" / "confusion.png"
    code, out, err = run_main(
        "eval", tmp_path / "data", "--model", tiny_dir, "--format", "json", "--device", "cpu", "--plot", picture
    )
    assert (code, err) == (0, "")
    result = json.loads(out)
    rows = [name for name in result["labels"] if name != OTHER]
    assert decoded(picture).shape[1::-1] == expected_size(rows, result["labels"], [3, 3, 2])
    first = picture.read_bytes()
    reliability = tmp_path / "out" / "confusion-reliability.png"  # the reliability diagram, beside it
    assert decoded(reliability).shape[1::-1] == (600, 700)
    second = reliability.read_bytes()
    code, _, err = run_main("eval", tmp_path / "data", "--model", tiny_dir, "--device", "cpu", "--plot", picture)
    assert (code, err) == (0, "") and picture.read_bytes() == first  # the same evaluation, the same bytes
    assert reliability.read_bytes() == second
    assert sorted(p.name for p in picture.parent.iterdir()) == ["confusion-reliability.png", "confusion.png"]
    # (no temporary file left)

    code, out, err = run_main("eval", tmp_path / "data", "--model", tiny_dir, "--plot", tmp_path / "c.pdf")
    assert (code, out) == (2, "")
    assert err == f"Error: --plot '{tmp_path / 'c.pdf'}': the picture is a PNG; give a file name ending in .png\n"


def test_without_matplotlib_plot_and_report_say_what_to_install(tiny_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed: find_spec None, import fails
    assert not extras.available("plots")
    write_folder(tmp_path / "data", {"apple": 1})
    code, out, err = run_main("eval", tmp_path / "data", "--model", tiny_dir, "--plot", tmp_path / "c.png")
    assert (code, out) == (1, "")
    assert err == "Error: --plot needs matplotlib, which is not installed: pip install 'bitcli[plots]'\n"
    assert not (tmp_path / "c.png").exists()


def test_reliability_diagram_is_deterministic_and_shows_the_bins() -> None:
    """The diagram of a stored evaluation: a PNG of the fixed size, the same bytes for the same numbers, other
    bytes for other bins; empty bins (None) are drawn as nothing, not as errors."""
    result = {"count": 100, "ece": 0.0812, "nll": 0.4321, "temperature": 1.5, "tta": "flip",
              "reliability": {"count": [0] * 10 + [5, 10, 15, 30, 40],
                              "confidence": [None] * 10 + [0.7, 0.77, 0.84, 0.9, 0.97],
                              "accuracy": [None] * 10 + [0.6, 0.7, 0.8, 0.9, 1.0]}}  # fmt: skip
    first = plots.reliability_png(result, "digits with $HOME/model")
    assert decoded(first).shape[1::-1] == (600, 700)
    assert plots.reliability_png(result, "digits with $HOME/model") == first
    other = {**result, "reliability": {**result["reliability"], "accuracy": [None] * 10 + [0.2, 0.3, 0.4, 0.5, 0.6]}}
    assert plots.reliability_png(other, "digits with $HOME/model") != first
