"""The report page's calibration section: how far the scores can be trusted. The reliability diagram that
`bit eval --plot` draws beside the confusion picture (bitcli.plots.reliability_png, a picture file in the report
folder), and the same ECE_BINS bins as a table: its numbers are text, and the page has them without matplotlib
(the plots extra), which it then says.
"""

from __future__ import annotations

from bitcli.extras import install
from bitcli.gallery.drawing import Picture
from bitcli.metrics import ECE_BINS, EvalResult
from bitcli.pages.html import Html, element, image, join, table

RELIABILITY = "reliability.png"  # the picture's file in the report folder
NO_PICTURE = (
    f"No reliability picture: it needs matplotlib (the plots extra), which is not installed ({install('plots')}); "
    "the bins are below as numbers."
)


def calibration(result: EvalResult, picture: Picture | None) -> Html:
    """The section's content: the reliability picture (`picture`, its file beside the page; None: not drawn,
    which the page says) and the bins as a table, folded away under the picture."""
    settings = f"temperature {result.temperature:.4g}" + (f", --tta {result.tta}" if result.tta else "")
    intro = element("p", f"The images binned by their top-1 score ({ECE_BINS} equal-width bins): where the scores "
                         "can be trusted, each bin's accuracy equals its mean score (the diagonal). ECE is the gap, "
                         f"weighted by the bins' share of the images. Scores at {settings}.")  # fmt: skip
    bins = _bins(result)
    if picture is None:
        return join([intro, element("p", NO_PICTURE, attrs={"class": "note"}), bins])
    alt = "reliability diagram: accuracy against mean top-1 score per bin, and each bin's share of the images"
    shown = element("div", image(picture.src, alt, width=picture.width, height=picture.height), attrs={"class": "plot"})
    folded = element("details", element("summary", f"The {ECE_BINS} bins as numbers"), bins)
    return join([intro, shown, folded])


def _bins(result: EvalResult) -> Html:
    """One row per bin: its score range, images, mean score, accuracy and their gap (empty bins: a dash)."""
    assert result.reliability is not None
    rel = result.reliability
    rows = []
    for i, (n, confidence, accuracy) in enumerate(zip(rel["count"], rel["confidence"], rel["accuracy"])):
        span = f"({i / ECE_BINS:.3f}, {(i + 1) / ECE_BINS:.3f}]"  # (a top-1 score is never 0)
        if not n:
            rows.append([span, "0", "\u2013", "\u2013", "\u2013"])
            continue
        rows.append([span, str(n), f"{confidence:.4f}", f"{accuracy:.4f}", f"{accuracy - confidence:+.4f}"])
    head = ["top-1 score", "images", "mean score", "accuracy", "accuracy \u2212 score"]
    return element("div", table(head, rows, cls="numbers reliability"), attrs={"class": "scroll"})
