"""Fonts for the text the pictures draw from data (class names, paths). matplotlib's default font, DejaVu Sans,
has Latin, Greek and Cyrillic but no CJK, so a class named 猫 would show as a box: when its characters are
missing from DejaVu Sans, the installed fonts that have them follow it in matplotlib's font fallback list
(rcParams["font.family"] as a list). The choice depends only on the text and the installed fonts, so a
picture's bytes stay the same for the same numbers on the same machine. Called with matplotlib imported.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable

DEFAULT = "DejaVu Sans"  # matplotlib's default sans-serif, always installed with it: every picture draws with it
# Unicode's Last Resort font draws a placeholder box for any character: having one is not having the glyph.
NOT_A_FALLBACK = {DEFAULT, "Last Resort High-Efficiency", "LastResort"}


@functools.cache
def _characters(path: str) -> frozenset[int]:
    """The code points the font file maps to a glyph (its first face); none if it cannot be read."""
    from matplotlib import ft2font

    try:
        return frozenset(ft2font.FT2Font(path).get_charmap())
    except (OSError, RuntimeError, ValueError):  # a broken font file is not ours to report
        return frozenset()


@functools.cache
def _add_fonts_installed_since_the_cache() -> None:
    """matplotlib lists the fonts it found when it built its font cache; a font installed since (apt-get install
    fonts-noto-cjk) is added here, once per process, so that it is found without deleting that cache."""
    from matplotlib import font_manager

    known = {os.path.realpath(entry.fname) for entry in font_manager.fontManager.ttflist}
    for path in sorted(font_manager.findSystemFonts()):
        if os.path.realpath(path) not in known:
            try:
                font_manager.fontManager.addfont(path)
            except (OSError, RuntimeError, ValueError):
                continue


def _families() -> dict[str, str]:
    """Installed font family -> one of its files (the first by name: the same on every call)."""
    from matplotlib import font_manager

    files: dict[str, str] = {}
    for entry in sorted(font_manager.fontManager.ttflist, key=lambda e: (e.name, e.fname)):
        files.setdefault(entry.name, entry.fname)
    return files


def fallback(texts: Iterable[str]) -> tuple[list[str], set[str]]:
    """(the font families to draw `texts` with, DEFAULT first; the characters none of them has). Beyond
    DEFAULT, each next family is the one that has most of the characters still missing (ties: by name)."""
    from matplotlib import font_manager

    wanted = {ord(c) for text in texts for c in text if not c.isspace()}
    missing = wanted - _characters(font_manager.findfont(DEFAULT))
    if not missing:
        return [DEFAULT], set()
    _add_fonts_installed_since_the_cache()
    candidates = {name: _characters(path) for name, path in _families().items() if name not in NOT_A_FALLBACK}
    chosen = [DEFAULT]
    while missing:
        best = min(candidates, key=lambda name: (-len(missing & candidates[name]), name), default=None)
        if best is None or not missing & candidates[best]:
            break
        chosen.append(best)
        missing -= candidates.pop(best)
    return chosen, {chr(c) for c in missing}
