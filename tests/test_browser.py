"""The browser fixture itself: a page from a file:// URL renders, and its console errors are recorded (the
pages bitcli writes are tested with it: the error gallery, the audit report, the serve upload page)."""

from __future__ import annotations

from pathlib import Path


def test_a_file_page_renders_and_its_errors_are_recorded(browser_page, tmp_path: Path) -> None:
    page = tmp_path / "index.html"
    page.write_text(
        "<!doctype html><html><body><h1 id=title>bitcli</h1>"
        "<script>console.error('seen by the test'); missing_function();</script></body></html>",
        encoding="utf-8",
    )
    browser_page.page.goto(page.as_uri())
    assert browser_page.page.inner_text("#title") == "bitcli"
    assert browser_page.errors[0] == "console error: seen by the test"
    assert browser_page.errors[1].startswith("page error: ") and "missing_function" in browser_page.errors[1]
    shot = browser_page.page.screenshot(path=str(tmp_path / "shot.png"))
    assert shot[:8] == b"\x89PNG\r\n\x1a\n"
