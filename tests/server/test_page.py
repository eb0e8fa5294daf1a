"""The upload page at `GET /` in headless Chromium: choose an image, see the top five with bars (what the API
answers for that file), labels that are HTML shown as text, errors shown, nothing loaded from anywhere else."""

from __future__ import annotations

import base64
import itertools

import pytest
import torch
from playwright.sync_api import expect

from .conftest import HOSTILE_LABELS
from .helpers import call, post, serving


@pytest.fixture(scope="module")
def hostile_server(hostile_dir):
    from bitcli.engine import load_engine
    from bitcli.hub import load_checkpoint

    engine = load_engine(load_checkpoint(str(hostile_dir)), torch.device("cpu"), torch.float32)
    with serving(engine) as url:
        yield url


def model_line_reads(page, text: str) -> None:
    """Wait until the model line (filled in from GET /v1/model) contains `text`. Playwright's auto-waiting
    assertion, not wait_for_function("..."): the page's policy forbids eval, and wait_for_function evaluates a
    string predicate with it whenever the first check is false (the line not yet there on a busy machine)."""
    expect(page.locator("#model")).to_contain_text(text, timeout=30_000)


def test_upload_shows_the_top_five_with_bars(browser_page, hostile_server, pictures):
    page, url = browser_page.page, hostile_server
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(url)
    model_line_reads(page, "5 classes")
    page.set_input_files("#file", str(pictures["b.jpg"]))
    page.wait_for_selector("#results .row:nth-child(5)")

    expected = post(url, "/v1/predict?top_k=5&name=b.jpg", pictures["b.jpg"].read_bytes()).json[0]["predictions"]
    assert sorted(p["label"] for p in expected) == sorted(HOSTILE_LABELS)
    assert page.locator("#results .label").all_inner_texts() == [p["label"] for p in expected]
    assert page.locator("#results .score").all_inner_texts() == [f"{p['score'] * 100:.1f}%" for p in expected]
    widths = page.eval_on_selector_all("#results .bar", "bars => bars.map(b => b.style.width)")
    # (the browser gives a width back in its shortest form: 53.0% as 53%)
    assert [float(w.removesuffix("%")) for w in widths] == [float(f"{p['score'] * 100:.1f}") for p in expected]
    assert page.inner_text("#status") == "b.jpg"
    assert page.evaluate("window.__pwned") is None  # the labels were never parsed as HTML
    assert page.locator("img").count() == 1 and page.locator("script").count() == 1  # the preview; the page's own
    assert browser_page.errors == []
    assert all(r.startswith((url, "blob:", "data:")) for r in requests), requests


def test_a_file_that_is_not_an_image_shows_its_error(browser_page, hostile_server, pictures):
    page = browser_page.page
    page.goto(hostile_server)
    page.set_input_files("#file", str(pictures["notes.txt"]))
    page.wait_for_selector("#status.error")
    assert page.inner_text("#status") == "notes.txt: not an image PIL can read (empty, corrupt or another format)"
    assert page.locator("#results .row").count() == 0
    # the one console line is the browser's own note of the 400 answer; nothing else went wrong
    assert [e for e in browser_page.errors if "status of 400" not in e] == []


def test_the_page_forbids_every_other_source(hostile_server):
    reply = call(hostile_server, "GET", "/")
    assert reply.status == 200 and reply.headers["content-type"].startswith("text/html")
    assert reply.headers["content-security-policy"].startswith("default-src 'none'; ")
    assert b"http://" not in reply.body and b"https://" not in reply.body and b"innerHTML" not in reply.body


def test_an_image_dropped_on_the_page_is_classified(browser_page, hostile_server, pictures):
    page = browser_page.page
    page.goto(hostile_server)
    data = base64.b64encode(pictures["c.png"].read_bytes()).decode()
    dropped = page.evaluate_handle(
        """([name, data]) => {
            const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, { type: "image/png" }));
            return transfer;
        }""",
        ["dropped c.png", data],
    )
    page.dispatch_event("#drop", "dragover", {"dataTransfer": dropped})
    assert page.get_attribute("#drop", "class") == "over"
    page.dispatch_event("#drop", "drop", {"dataTransfer": dropped})
    page.wait_for_selector("#results .row:nth-child(5)")
    expected = post(hostile_server, "/v1/predict?name=c.png", pictures["c.png"].read_bytes()).json[0]["predictions"]
    assert page.locator("#results .label").all_inner_texts() == [p["label"] for p in expected]
    assert page.inner_text("#status") == "dropped c.png" and page.get_attribute("#drop", "class") == ""
    assert browser_page.errors == []


def test_the_page_s_blocks_do_not_overlap_on_a_wide_or_a_phone_screen(browser_page, hostile_server):
    """The title, the model line, the drop zone, the status and the results stack without overlapping (an
    inline drop zone's padding and border used to spill over the model line), and nothing is wider than the
    screen, down to a 380-px phone."""
    page = browser_page.page
    for width in (1280, 380):
        page.set_viewport_size({"width": width, "height": 800})
        page.goto(hostile_server)
        model_line_reads(page, "5 classes")
        boxes = page.evaluate(
            """() => ["h1", "#model", "#drop", "#status", "#results"].map((s) => {
                const r = document.querySelector(s).getBoundingClientRect();
                return {name: s, top: r.top, bottom: r.bottom, left: r.left, right: r.right};
            })"""
        )
        for upper, lower in itertools.pairwise(boxes):
            assert upper["bottom"] <= lower["top"], (width, upper, lower)
        assert all(b["left"] >= 0 and b["right"] <= width for b in boxes), (width, boxes)
        drop = boxes[2]
        assert drop["bottom"] - drop["top"] > 50  # a zone to drop on, not a line of text
    assert browser_page.errors == []


def test_a_multi_label_model_s_labels_are_shown_above_the_bars(browser_page, hostile_dir, pictures, tmp_path):
    """A multi-label model's answer: the labels at or above their thresholds, as the API gives them, in one line
    above the top-five bars (labels that are HTML shown as text); a single-label model's page has no such line."""
    import dataclasses

    from bitcli.engine import load_engine
    from bitcli.formats import bitcli as bitcli_format
    from bitcli.hub import load_checkpoint

    model = tmp_path / "multi.safetensors"
    checkpoint = load_checkpoint(str(hostile_dir))
    bitcli_format.write(dataclasses.replace(checkpoint, thresholds=[0.0, 0.0, 1.0, 1.0, 1.0]), model)
    engine = load_engine(load_checkpoint(str(model)), torch.device("cpu"), torch.float32)
    page = browser_page.page
    with serving(engine) as url:
        page.goto(url)
        model_line_reads(page, "5 classes (multi-label)")
        page.set_input_files("#file", str(pictures["b.jpg"]))
        page.wait_for_selector("#results .row:nth-child(5)")
        labels = post(url, "/v1/predict?top_k=5&name=b.jpg", pictures["b.jpg"].read_bytes()).json[0]["labels"]
    assert sorted(p["label"] for p in labels) == sorted(HOSTILE_LABELS[:2])  # thresholds 0: always; 1: never
    shown = ", ".join(f"{p['label']} {p['score'] * 100:.1f}%" for p in labels)
    assert page.inner_text("#labels") == f"Labels at or above their thresholds: {shown}"
    assert page.evaluate("window.__pwned") is None
    assert browser_page.errors == []


def test_a_single_label_model_s_page_has_no_labels_line(browser_page, hostile_server, pictures):
    page = browser_page.page
    page.goto(hostile_server)
    page.set_input_files("#file", str(pictures["b.jpg"]))
    page.wait_for_selector("#results .row:nth-child(5)")
    assert page.locator("#labels").is_hidden()
    assert "multi-label" not in page.inner_text("#model")


def test_the_page_shows_the_server_s_top_k_whatever_the_number_of_classes(browser_page, hostile_dir, pictures):
    """The page asks for the server's own default (--top-k, at most the number of classes): a model with fewer
    than five classes, or a server started with --top-k 3, is answered, not refused for top_k=5."""
    from bitcli.engine import load_engine
    from bitcli.hub import load_checkpoint

    engine = load_engine(load_checkpoint(str(hostile_dir)), torch.device("cpu"), torch.float32)
    page = browser_page.page
    with serving(engine, top_k=3) as url:
        page.goto(url)
        page.set_input_files("#file", str(pictures["b.jpg"]))
        page.wait_for_selector("#results .row:nth-child(3)")
        expected = post(url, "/v1/predict?name=b.jpg", pictures["b.jpg"].read_bytes()).json[0]["predictions"]
    assert len(expected) == 3
    assert page.locator("#results .label").all_inner_texts() == [p["label"] for p in expected]
    assert page.inner_text("#status") == "b.jpg"
    assert browser_page.errors == []
