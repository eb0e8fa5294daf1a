"""HTML for the pages bitcli writes: data becomes text in one place (`text`), markup is built only from
escaped pieces (`Html`, `element`), and `document` wraps a body in the one page skeleton: inline CSS, no script,
no font or stylesheet from the network, a policy that forbids scripts, so that a page opens from file:// on
any machine and a hostile label or file name (`<img src=x onerror=...>`) shows as the text it is.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable, Mapping

from bitcli.ui import visible

# Lone surrogates that are no byte of a file name (os.fsdecode escapes a byte as \udc80-\udcff)
_NOT_A_BYTE = re.compile("[\ud800-\udbff\udc00-\udc7f]")


class Html(str):
    """Markup that is safe to insert as it is: made only by this module's builders, from escaped text."""


def text(value: object) -> Html:
    """Data (a label, a path, a number) as HTML text: valid UTF-8 (`utf8`), on one line with control
    characters shown as escapes (ui.visible), and every <, >, &, " and ' escaped, so that it is text in an
    element and in a quoted attribute alike."""
    return Html(html.escape(visible(utf8(str(value))), quote=True))


def utf8(s: str) -> str:
    """`s` as valid UTF-8 text: a file name's undecodable bytes (surrogate escapes) and any other lone
    surrogate (a JSON label's "\\ud800") become U+FFFD."""
    if s.isascii():  # no surrogate: as it is (the common case, 10,000 paths of a report's CSV files)
        return s
    s = _NOT_A_BYTE.sub("\ufffd", s)
    return s.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def piece(value: object) -> Html:
    """Markup as it is, anything else as text."""
    return value if isinstance(value, Html) else text(value)


def join(parts: Iterable[object], separator: str = "") -> Html:
    """Pieces (markup, or data made text) one after the other, `separator` (this program's, "\\n" or ", ")
    between them."""
    return Html(html.escape(separator).join(piece(p) for p in parts))


def element(tag: str, *children: object, attrs: Mapping[str, object | None] | None = None) -> Html:
    """<tag attr="value">children</tag>; `tag` and the attribute names are this program's own, the values and
    children are escaped unless they are Html. An attribute whose value is None is left out."""
    attributes = "".join(f' {name}="{piece(value)}"' for name, value in (attrs or {}).items() if value is not None)
    return Html(f"<{tag}{attributes}>{join(children)}</{tag}>")


def image(src: str, alt: object, *, width: int | None = None, height: int | None = None) -> Html:
    """An <img> of a file beside the page (a relative link), loaded lazily; its size given so that the page
    does not move while pictures arrive."""
    attrs = {"src": src, "alt": alt, "width": width, "height": height, "loading": "lazy", "decoding": "async"}
    attributes = "".join(f' {name}="{piece(value)}"' for name, value in attrs.items() if value is not None)
    return Html(f"<img{attributes}>")


def table(head: Iterable[object], rows: Iterable[Iterable[object]], *, cls: str | None = None) -> Html:
    """A table: one header row, then the rows (cells: markup, or data made text)."""
    header = element("tr", *(element("th", h, attrs={"scope": "col"}) for h in head))
    body = (element("tr", *(element("td", cell) for cell in row)) for row in rows)
    return element("table", element("thead", header), element("tbody", *body), attrs={"class": cls})


# No script runs on these pages and nothing is fetched from the network; inline styles and the page's own
# pictures (files beside it, or data: URLs) are all it uses.
POLICY = (
    "default-src 'none'; img-src 'self' file: data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
)

CSS = """
*{box-sizing:border-box}
body{margin:0;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;
color:#1d232b;background:#fff}
main{max-width:1280px;margin:0 auto;padding:12px 16px 48px}
h1{font-size:1.45rem;margin:.4em 0}h2{font-size:1.2rem;margin:1.4em 0 .5em;border-bottom:1px solid #d9dee3}
h3{font-size:1.02rem;margin:0 0 .5em}
p,li{max-width:75ch}.muted{color:#5b6570}.note{background:#fff7e0;border-left:4px solid #e0a800;padding:6px 10px}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;font-variant-numeric:tabular-nums}
th,td{padding:3px 8px;border-bottom:1px solid #e4e8ec;text-align:right;white-space:nowrap}
th:first-child,td:first-child{text-align:left;white-space:normal;overflow-wrap:anywhere}
.stats{display:flex;flex-wrap:wrap;gap:8px 24px;padding:0;list-style:none}
.stats b{font-size:1.25rem;display:block}
.confusion td,.confusion th{text-align:center;padding:2px 5px;min-width:2.4em;border:1px solid #e4e8ec}
.confusion th{font-size:.8rem;max-width:10em;white-space:normal;overflow-wrap:anywhere}
.confusion th[scope=row],.confusion thead th:first-child{text-align:left;min-width:7em}
.confusion a{display:block;color:inherit}
table.numbers td:first-child{min-width:9em}
section.pair{margin:18px 0;padding:8px;border-radius:8px;scroll-margin-top:8px}
section.pair:target{outline:3px solid #0b63c5;background:#eef5fd}
.unshown tr{scroll-margin-top:8px}.unshown tr:target{outline:3px solid #0b63c5;background:#eef5fd}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(280px,1fr));gap:10px}
figure{margin:0;background:#f5f7f9;border-radius:8px;padding:8px;min-width:0}
.pics{display:grid;grid-template-columns:repeat(3,minmax(0,1fr));gap:4px}
.pics.two{grid-template-columns:repeat(2,minmax(0,1fr))}
.pics img{display:block;width:100%;height:auto;aspect-ratio:1/1;object-fit:contain;background:#e9edf1;
border-radius:4px}
.pics span{font-size:.72rem;text-align:center;color:#5b6570;display:block;white-space:nowrap;overflow:hidden;
text-overflow:ellipsis}
figcaption{font-size:.85rem;margin-top:6px}
.path{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.78rem;overflow-wrap:anywhere}
figcaption ol{margin:.2em 0 0;padding-left:1.4em}
a{color:#0b63c5}
.plot img{display:block;max-width:100%;height:auto}
details{margin:.5em 0}summary{cursor:pointer;color:#0b63c5}
@media (max-width:600px){main{padding:8px}.grid{grid-template-columns:1fr}h1{font-size:1.2rem}}
"""


def document(title: object, body: Html) -> str:
    """A whole page: UTF-8, readable from a phone's width up, the CSS inline, scripts forbidden."""
    return (
        "<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width,initial-scale=1">'
        f'<meta http-equiv="Content-Security-Policy" content="{text(POLICY)}">'
        f"<title>{text(title)}</title><style>{CSS}</style></head>\n"
        f"<body><main>\n{body}\n</main></body></html>\n"
    )
