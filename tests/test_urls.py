"""Images named by http(s) URL (bitcli.urls): on the command line, on a `-` stdin line and in a label file's
path column; size cap, timeouts, redirect limit, refused schemes, each failure an error row. Every request goes
to a loopback http.server started here (127.0.0.1, a free port); nothing leaves the machine."""

from __future__ import annotations

import io
import json
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from conftest import run_main
from PIL import Image

from bitcli import urls
from bitcli.errors import BitError


def _png(size: int, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


CAT = _png(24, 0)  # 1.8 kB
BIG = _png(80, 1)  # 19 kB of noise: over a 0.01 MB cap
STOP = threading.Event()  # set when the module's tests end: the slow handlers stop waiting
HITS: Counter[str] = Counter()  # requests per path


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def _send(self, code: int, body: bytes, content_type: str = "image/png", length: bool = True) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        if length:
            self.send_header("Content-Length", str(len(body)))
        else:
            self.send_header("Connection", "close")  # the body ends when the connection does
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        path = self.path
        HITS[path] += 1
        if path in ("/cat.png", "/counted/cat.png"):
            self._send(200, CAT)
        elif path.startswith("/hop/"):  # /hop/N: N redirects (relative Locations), then the cat
            n = int(path.rsplit("/", 1)[1])
            if n:
                self._redirect(f"/hop/{n - 1}")
            else:
                self._send(200, CAT)
        elif path == "/to-file":
            self._redirect("file:///etc/passwd")
        elif path == "/missing.png":
            self._send(404, b"not here", "text/plain")
        elif path == "/big.png":
            self._send(200, BIG)
        elif path == "/big-undeclared.png":  # no Content-Length: the cap must stop the reading itself
            self._send(200, BIG, length=False)
        elif path == "/text.png":
            self._send(200, b"hello, not an image", "text/plain")
        elif path == "/silent.png":  # headers never come
            STOP.wait(10)
        elif path == "/drip.png":  # a byte at a time, each within the read timeout
            self.send_response(200)
            self.send_header("Content-Length", str(len(CAT)))
            self.end_headers()
            for byte in CAT:
                if STOP.wait(0.05):
                    return
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
        elif path == "/drip-headers.png":  # the status line, then a header a byte at a time, each within the read
            self.wfile.write(b"HTTP/1.1 200 OK\r\n")  # timeout; the headers end (after 4 s) with the connection
            self.close_connection = True
            for byte in b"X-Drip: " + b"a" * 200:
                if STOP.wait(0.02):
                    return
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
        else:
            self._send(404, b"", "text/plain")


@pytest.fixture(scope="module")
def web() -> Iterator[str]:
    """http://127.0.0.1:PORT of a loopback server for this module's tests."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    STOP.clear()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        STOP.set()
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fetch_follows_five_redirects_and_refuses_six(web):
    assert urls.fetch(f"{web}/hop/5") == CAT
    with pytest.raises(BitError) as err:
        urls.fetch(f"{web}/hop/6")
    assert str(err.value) == f"{web}/hop/6: more than 5 redirects; pass the URL they end at"


def test_fetch_failures_are_one_line_naming_the_url(web, closed_port):
    small = urls.Limits(max_bytes=10_000)
    expected = {
        f"{web}/missing.png": "the server answered HTTP 404 (Not Found); check the URL",
        f"{web}/to-file": "redirected to the scheme file://; only http and https redirects are followed",
        f"{web}/big.png": "the image is 0.019348 MB, over the 0.01 MB download limit; raise --max-download-mb or download it first",
        f"{web}/big-undeclared.png": "the download passed the 0.01 MB limit; raise --max-download-mb or download it first",
        f"https://127.0.0.1:{closed_port}/cat.png": "cannot download (connection refused); check the URL and the network, or download the file first",
        "ftp://127.0.0.1/cat.png": "only http:// and https:// URLs are fetched, not ftp://; download the file and pass its path",
    }  # fmt: skip
    for url, reason in expected.items():
        with pytest.raises(BitError) as err:
            urls.fetch(url, small)
        assert str(err.value) == f"{url}: {reason}"


def test_a_silent_server_times_out_and_a_dripping_one_meets_the_deadline(web):
    quick = urls.Limits(connect_timeout_s=2, read_timeout_s=0.3)
    with pytest.raises(BitError) as err:
        urls.fetch(f"{web}/silent.png", quick)
    assert str(err.value) == (
        f"{web}/silent.png: cannot download (no answer within 2 s to connect or 0.3 s to read); "
        "check the URL and the network, or download the file first"
    )
    deadline = urls.Limits(read_timeout_s=2, total_timeout_s=0.3)  # every byte comes in time, the whole does not
    with pytest.raises(BitError) as err:
        urls.fetch(f"{web}/drip.png", deadline)
    assert str(err.value) == f"{web}/drip.png: the download took over 0.3 s; download the file and pass its path"


def test_the_deadline_covers_headers_that_trickle_in(web):
    """A server that sends its headers a byte at a time answers every read in time: the whole download's
    deadline still ends it, when it passes."""
    limits = urls.Limits(read_timeout_s=2, total_timeout_s=0.5)
    start = time.monotonic()
    with pytest.raises(BitError) as err:
        urls.fetch(f"{web}/drip-headers.png", limits)
    assert (
        str(err.value) == f"{web}/drip-headers.png: the download took over 0.5 s; download the file and pass its path"
    )
    assert time.monotonic() - start < 0.5 + 1.5


def test_explain_draws_a_url_s_overlay_from_its_one_download(web, tiny_dir, tmp_path):
    """`bit explain URL` explains the image and draws its overlay on it, from the one download (the overlay
    equals that of the same bytes in a file)."""
    local = tmp_path / "cat.png"
    local.write_bytes(CAT)
    HITS.clear()
    code, out, err = run_main("explain", f"{web}/counted/cat.png", local, "-m", tiny_dir, "-o", tmp_path / "cams")
    assert (code, "error" in err) == (0, False), err
    by_url, by_file = (json.loads(line) for line in out.splitlines())
    assert by_url["path"] == f"{web}/counted/cat.png" and by_url["overlay"] == str(tmp_path / "cams" / "00001-cat.png")
    assert {k: by_url[k] for k in ("target", "index", "score")} == {k: by_file[k] for k in ("target", "index", "score")}
    drawn = [np.asarray(Image.open(row["overlay"])) for row in (by_url, by_file)]
    assert drawn[0].shape == (24, 24, 3) and np.array_equal(drawn[0], drawn[1])
    assert HITS == {"/counted/cat.png": 1}


def test_predict_urls_are_rows_in_place(web, closed_port, tiny_dir, tmp_path, monkeypatch):
    """Good URLs classify exactly as the same bytes in a file; every failure is an error row in its place
    (exit 1), and stdin lines may be URLs too."""
    local = tmp_path / "cat.png"
    local.write_bytes(CAT)
    refused = f"https://127.0.0.1:{closed_port}/cat.png"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(f"{web}/hop/2\n".encode())))
    args = [f"{web}/cat.png", f"{web}/hop/6", f"{web}/missing.png", f"{web}/big-undeclared.png", f"{web}/text.png",
            refused, "file:///etc/passwd", "-", str(local)]  # fmt: skip
    code, out, err = run_main("predict", *args, "-m", tiny_dir, "-f", "json", "--max-download-mb", "0.01")
    rows = json.loads(out)
    assert code == 1
    assert [r["path"] for r in rows] == [*args[:7], f"{web}/hop/2", str(local)]
    assert rows[0]["predictions"] == rows[7]["predictions"] == rows[8]["predictions"]
    assert [r.get("error") for r in rows[1:7]] == [
        f"{web}/hop/6: more than 5 redirects; pass the URL they end at",
        f"{web}/missing.png: the server answered HTTP 404 (Not Found); check the URL",
        f"{web}/big-undeclared.png: the download passed the 0.01 MB limit; raise --max-download-mb or download it first",
        f"{web}/text.png: not an image PIL can read (empty, corrupt or another format)",
        f"{refused}: cannot download (connection refused); check the URL and the network, or download the file first",
        "file:///etc/passwd: only http:// and https:// URLs are fetched, not file://; download the file and pass its path",
    ]
    assert err.count("error: ") == 6


def test_embed_takes_urls(web, tiny_dir, tmp_path):
    local = tmp_path / "cat.png"
    local.write_bytes(CAT)
    code, out, err = run_main("embed", f"{web}/cat.png", local, "-m", tiny_dir, "-f", "jsonl")
    assert (code, err) == (0, "")
    first, second = (json.loads(line) for line in out.splitlines())
    assert first["path"] == f"{web}/cat.png" and first["embedding"] == second["embedding"]


def test_max_download_mb_is_checked_with_the_flags(tiny_dir):
    code, out, err = run_main("predict", "x.png", "-m", tiny_dir, "--max-download-mb", "0")
    assert (code, out) == (2, "")
    assert err == "Error: --max-download-mb 0: must be a number > 0\n"
    # under one byte the cap would refuse every download and print as "0 MB"
    code, out, err = run_main("predict", "x.png", "-m", tiny_dir, "--max-download-mb", "0.0000004")
    assert (code, out, err) == (2, "", "Error: --max-download-mb 0.0000004: must be at least 0.000001 (one byte)\n")
    code, out, err = run_main("predict", "x.png", "-m", tiny_dir, "--max-download-mb", "0.0000006", "-f", "json")
    assert code == 1 and "--max-download-mb" not in err and "x.png" in err  # one byte: accepted; x.png is missing


def test_a_label_file_may_list_urls(web, tiny_dir, tmp_path):
    """eval over a label file whose rows are URLs gives what it gives over the same images as files; a URL that
    fails names its row, and a refused scheme stops the file as a missing image does."""
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(CAT)
    (tmp_path / "files.csv").write_text("path,label\na.png,apple\nb.png,banana\n")
    (tmp_path / "urls.csv").write_text(f"path,label\n{web}/cat.png,apple\n{web}/hop/1,banana\n")
    by_file = run_main("eval", tmp_path / "files.csv", "-m", tiny_dir, "-f", "json")
    by_url = run_main("eval", tmp_path / "urls.csv", "-m", tiny_dir, "-f", "json")
    assert by_file[0] == by_url[0] == 0, by_url[2]
    assert json.loads(by_url[1]) == json.loads(by_file[1])
    assert json.loads(by_url[1])["count"] == 2

    (tmp_path / "ftp.csv").write_text("path,label\nftp://127.0.0.1/cat.png,apple\n")
    code, out, err = run_main("eval", tmp_path / "ftp.csv", "-m", tiny_dir)
    assert (code, out) == (1, "")
    assert err == (
        f"Error: {tmp_path / 'ftp.csv'}:2: ftp://127.0.0.1/cat.png: only http:// and https:// URLs are fetched, "
        "not ftp://; download the file and pass its path\n"
    )


def test_a_label_file_url_that_fails_names_its_row(web, tmp_path):
    from bitcli.sources.labelfile import read_label_file
    from bitcli.sources.rows import load_example

    (tmp_path / "urls.csv").write_text(f"path,label\n{web}/missing.png,apple\n")
    labels = read_label_file(tmp_path / "urls.csv")
    with pytest.raises(BitError) as err:
        load_example(labels.row_path(0))
    assert str(err.value) == (
        f"{tmp_path / 'urls.csv'}:2: {web}/missing.png: the server answered HTTP 404 (Not Found); check the URL"
    )


def test_a_local_folder_named_like_a_scheme_is_not_a_url(tiny_dir, tmp_path, monkeypatch):
    """Only `scheme://` makes a URL: `http:` alone is an ordinary relative path."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "http:").mkdir()
    (tmp_path / "http:" / "cat.png").write_bytes(CAT)
    code, out, err = run_main("predict", "http:/cat.png", "-m", tiny_dir, "-f", "json")
    assert (code, err) == (0, "")
    assert json.loads(out)[0]["path"] == "http:/cat.png"


def test_is_url():
    assert urls.is_url("https://host/cat.jpg") and urls.is_url("HTTP://HOST/x") and urls.is_url("ftp://x")
    assert not urls.is_url("cat.jpg") and not urls.is_url("http:/x") and not urls.is_url("/tmp/http://x")
    assert urls.refusal("https://host/x") is None and urls.refusal("HTTP://host/x") is None


def test_explain_takes_max_download_mb(web, tiny_dir, tmp_path):
    """`bit explain --max-download-mb` caps its URLs as predict's flag does (an error row, the rest explained);
    without it the 50 MB default takes the same image."""
    args = [f"{web}/big.png", f"{web}/cat.png", "-m", tiny_dir]
    code, out, err = run_main("explain", *args, "-o", tmp_path / "capped", "--max-download-mb", "0.01")
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 1, err
    assert rows[0] == {
        "path": f"{web}/big.png",
        "error": f"{web}/big.png: the image is 0.019348 MB, over the 0.01 MB download limit; raise "
        "--max-download-mb or download it first",
    }
    assert rows[1]["path"] == f"{web}/cat.png" and "error" not in rows[1]
    code, out, err = run_main("explain", *args, "-o", tmp_path / "default")
    assert code == 0, err
    assert [json.loads(line)["overlay"] for line in out.splitlines()] == [
        str(tmp_path / "default" / "00001-big.png"),
        str(tmp_path / "default" / "00002-cat.png"),
    ]
    code, out, err = run_main("explain", "x.png", "-o", tmp_path / "bad", "--max-download-mb", "-1")
    assert (code, out, err) == (2, "", "Error: --max-download-mb -1: must be a number > 0\n")
    assert not (tmp_path / "bad").exists()
