"""The audit's index.html: the counts, the inventory (images per class and split as a table with bars), each
duplicate pair's thumbnails side by side and each likely label error beside the typical images of its given
class and of the suggested one (multi-label data: of each class the suggestion adds or removes), then the
undecodable files, the small classes and the off-size images. Every
path and label goes through bitcli.pages.html's escaping; the pictures are files beside the page."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bitcli.labels import LIST_SEPARATOR
from bitcli.pages.html import Html, document, element, image, join, table
from bitcli.pages.pictures import THUMB

MAX_PAIRS = 100  # duplicate pairs shown (every one is in audit.json and duplicates.csv)
MAX_ISSUES = 100  # label issues shown
MAX_LISTED = 200  # rows of each list of files
TYPICAL = 3  # typical images shown per class


@dataclass(frozen=True)
class PageInput:
    title: str
    report: dict  # audit.json's content
    thumbnail: Callable[[str], Html]  # a path as audit.json names it -> its picture (or why there is none)
    typical: dict[str, Sequence[str]]  # class -> paths of its most typical images


def render(p: PageInput) -> str:
    report, counts = p.report, p.report["counts"]
    body = [
        element("h1", "bit audit"),
        element("p", p.title, attrs={"class": "muted"}),
        element("ul", *(element("li", element("b", str(v)), k) for k, v in counts.items()), attrs={"class": "stats"}),
        _links(),
        element("h2", "Images per class and split"),
        _inventory(report["inventory"]),
        element("h2", f"Duplicates ({counts['duplicates']}: {counts['leaks']} across splits)"),
        _duplicates(p),
        element("h2", f"Likely label errors ({counts['label-issues']})"),
        _issues(p),
        *_files(report["inventory"]),
    ]
    return document(f"bit audit: {p.title}", join(body, "\n"))


def _links() -> Html:
    names = ["audit.json", "inventory.csv", "duplicates.csv", "label_issues.csv", "undecodable.csv", "off_size.csv"]
    links = join((element("a", n, attrs={"href": n}) for n in names), ", ")
    return element("p", join(["Every finding, with its paths, scores and suggested action: ", links, "."]))


def _inventory(inv: dict) -> Html:
    splits = list(inv["splits"])
    most = max((n for s in inv["splits"].values() for n in s["classes"].values()), default=0) or 1
    rows = []
    for c in inv["classes"]:
        cells: list[object] = [c]
        for s in splits:
            n = inv["splits"][s]["classes"][c]
            bar = element("span", attrs={"style": f"display:inline-block;height:.8em;width:{100 * n / most:.1f}px;"
                                                  "background:#0b63c5;margin-right:6px;vertical-align:middle"})  # fmt: skip
            cells.append(join([bar, str(n)]))
        rows.append(cells)
    totals = ["images", *(str(inv["splits"][s]["images"]) for s in splits)]
    imbalance = ["imbalance (largest / smallest class)", *(_ratio(inv["splits"][s]["imbalance"]) for s in splits)]
    extra = []
    if inv.get("multi_label"):
        extra = [["labels per image (min / median / max)",
                  *(_spread(inv["splits"][s]["labels_per_image"]) for s in splits)]]  # fmt: skip
    grid = table(["class", *splits], [*rows, totals, imbalance, *extra], cls="numbers")
    scroll = element("div", grid, attrs={"class": "scroll"})
    if not inv.get("multi_label"):
        return scroll
    note = element("p", "Multi-label data: a class counts every image that carries it, so the classes add up to "
                   "more than the images.", attrs={"class": "muted"})  # fmt: skip
    return join([note, scroll])


def _spread(stats: dict) -> str:
    if stats["min"] is None:
        return "n/a"
    return f"{stats['min']} / {stats['median']:g} / {stats['max']}"


def _labels(row: dict, key: str) -> str:
    """A duplicate's or issue's label(s) as text: one label, or a multi-label image's list joined by `; ` (no
    multi-label class name holds the separator, so the list reads back unambiguously; a comma may be in a name)."""
    value = row[key]
    return f"{LIST_SEPARATOR} ".join(value) if isinstance(value, list) else value


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _picture(p: PageInput, path: str, caption: str) -> Html:
    return element("div", p.thumbnail(path), element("span", caption, attrs={"title": caption}))


def _duplicates(p: PageInput) -> Html:
    pairs = p.report["duplicates"]
    if not pairs:
        return element("p", "None found.")
    figures = []
    for n, d in enumerate(pairs[:MAX_PAIRS], 1):
        kind = "exact" if d["exact"] else f"similarity {d['similarity']:.4f}"
        where = d["split_a"] if d["split_a"] == d["split_b"] else f"{d['split_a']} and {d['split_b']}: a leak"
        label_a, label_b = (_labels(d, f"labels_{k}" if f"labels_{k}" in d else f"label_{k}") for k in "ab")
        pics = element("div", _picture(p, d["a"], f"a: {label_a}"), _picture(p, d["b"], f"b: {label_b}"),
                       attrs={"class": "pics"})  # fmt: skip
        lines = [element("div", element("b", f"{kind}, {where}")), element("div", d["action"]),
                 element("div", "a: ", d["a"], attrs={"class": "path"}), element("div", "b: ", d["b"], attrs={"class": "path"})]  # fmt: skip
        caption = element("figcaption", join(lines))
        figures.append(element("figure", pics, caption, attrs={"id": f"duplicate-{n}"}))
    return join(
        [_shown_note(len(figures), len(pairs), "duplicates.csv"), element("div", *figures, attrs={"class": "grid"})]
    )


def _issues(p: PageInput) -> Html:
    issues = p.report["label_issues"]
    if not issues:
        return element("p", "None found.")
    if any("labels" in issue for issue in issues):  # multi-label: label sets
        said = ("Each image beside the most typical images of each class that the suggestion of a held-out "
                "one-vs-rest linear head on the embeddings removes or adds (confident learning, cleanlab).")  # fmt: skip
    else:
        said = ("Each image beside the most typical images of its given class and of the class a held-out linear "
                "head on the embeddings suggests (confident learning, cleanlab).")  # fmt: skip
    note = element("p", said, attrs={"class": "muted"})
    sections = []
    for n, issue in enumerate(issues[:MAX_ISSUES], 1):
        label = _labels(issue, "labels" if "labels" in issue else "label")
        own = element("div", _picture(p, issue["path"], f"labelled {label}"), attrs={"class": "pics"})
        given, suggested = _compared(p, issue)
        heading = element("h3", join([f"{n}. labelled ", label, ", suggested ", _labels(issue, "suggested"),
                                      f" (score {issue['score']:.4f}, {issue['split']})"]))  # fmt: skip
        path = element("div", issue["path"], attrs={"class": "path"})
        sections.append(element("section", heading, path, element("div", own, given, suggested, attrs={"class": "grid"}),
                                attrs={"class": "pair", "id": f"label-issue-{n}"}))  # fmt: skip
    return join([note, _shown_note(len(sections), len(issues), "label_issues.csv"), *sections])


def _compared(p: PageInput, issue: dict) -> tuple[Html, Html]:
    """The typical images of the given and the suggested class; multi-label: of each class the suggestion
    removes and of each it adds (of the given classes when it changes none)."""
    if "labels" not in issue:
        return _typical(p, issue["label"], "given"), _typical(p, issue["suggested"], "suggested")
    removed = [c for c in issue["labels"] if c not in issue["suggested"]]
    added = [c for c in issue["suggested"] if c not in issue["labels"]]
    if not removed and not added:
        removed = issue["labels"]
    return (join([_typical(p, c, "given") for c in removed]),
            join([_typical(p, c, "suggested") for c in added]))  # fmt: skip


def _typical(p: PageInput, label: str, role: str) -> Html:
    paths = p.typical.get(label, ())
    pictures = [_picture(p, path, f"{role}: {label}") for path in paths]
    return (
        element("div", *pictures, attrs={"class": "pics"}) if pictures else element("p", f"no typical image of {label}")
    )


def _shown_note(shown: int, total: int, csv: str) -> Html:
    if shown == total:
        return Html("")
    return element("p", f"{shown} of {total} shown; {csv} lists every one.", attrs={"class": "muted"})


def _files(inv: dict) -> list[Html]:
    """The small classes, undecodable files and off-size images, each a heading and a table (or "None.")."""
    small, bad, off = inv["small_classes"], inv["undecodable"], inv["off_size"]
    side = inv["model"]["input_side"]
    return [
        *_listing(f"Classes under {inv['min_images']} images ({len(small)})", ["class", "split", "images"],
                  [[s["class"], s["split"], str(s["images"])] for s in small]),
        *_listing(f"Undecodable files ({len(bad)})", ["path", "split", "error"],
                  [[b["path"], b["split"], b["error"]] for b in bad]),
        *_listing(f"Images far from the model's {side}-pixel input ({len(off)})", ["path", "split", "width", "height"],
                  [[o["path"], o["split"], str(o["width"]), str(o["height"])] for o in off]),
    ]  # fmt: skip


def _listing(title: str, head: list[str], rows: list[list[str]]) -> list[Html]:
    if not rows:
        return [element("h2", title), element("p", "None.")]
    note = _shown_note(min(len(rows), MAX_LISTED), len(rows), "audit.json")
    return [element("h2", title), note, _scroll(table(head, rows[:MAX_LISTED]))]


def _scroll(content: Html) -> Html:
    """A wide table scrolls sideways on its own, never the page."""
    return element("div", content, attrs={"class": "scroll"})


def thumb(src: str | None, alt: str, problem: str | None = None) -> Html:
    """An image beside the page, or the reason there is none."""
    if src is None:
        return element("p", problem or "no picture", attrs={"class": "muted"})
    return image(src, alt, width=THUMB, height=THUMB)
