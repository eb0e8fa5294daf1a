"""`--model BiT-M-R50x1`: a published name downloads `$BITCLI_MODELS_URL/<name>.npz` into `$BITCLI_CACHE`.

A real HTTP server on 127.0.0.1 plays Google's bucket (Content-Length, `x-goog-hash: md5=...`). The file it
serves is a tiny BiT in Google's layout under a published name: the architecture comes from the shapes.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import socket
import threading
from pathlib import Path

import pytest
from conftest import run_bit
from test_convert import TINY, bit, google_arrays, save_npz

NAME = "BiT-M-R50x1"


class Bucket:
    """`routes[path] = (status, headers, body)`; every request is recorded in `hits`."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, list[tuple[str, str]], bytes]] = {}
        self.hits: list[str] = []
        bucket = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                bucket.hits.append(self.path)
                status, headers, body = bucket.routes.get(self.path, (404, [], b"<Error>NoSuchKey</Error>"))
                self.send_response(status)
                for key, value in headers:
                    self.send_header(key, value)
                if not any(k == "Content-Length" for k, _ in headers):
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)  # HTTP/1.0: the connection closes after this, short or not

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def serve(self, body: bytes, md5_of: bytes | None = None, length: int | None = None) -> None:
        """Like Google's bucket: two x-goog-hash headers (crc32c, md5) and a Content-Length."""
        md5 = base64.b64encode(hashlib.md5(body if md5_of is None else md5_of).digest()).decode()
        headers = [
            ("Content-Type", "application/octet-stream"),
            ("Content-Length", str(len(body) if length is None else length)),
            ("x-goog-hash", "crc32c=n8g5Tg=="),
            ("x-goog-hash", f"md5={md5}"),
        ]
        self.routes[f"/{NAME}.npz"] = (200, headers, body)


@pytest.fixture
def bucket():
    b = Bucket()
    b.thread.start()
    yield b
    b.server.shutdown()
    b.server.server_close()


@pytest.fixture(scope="module")
def npz_bytes(tmp_path_factory) -> bytes:
    arrays = google_arrays(TINY["depths"], widths=TINY["widths"], stem=TINY["stem"], num_classes=10, seed=11)
    return save_npz(tmp_path_factory.mktemp("bucket") / "tiny.npz", arrays).read_bytes()


def env_for(bucket_url: str, cache: Path) -> dict[str, str]:
    return {"BITCLI_MODELS_URL": bucket_url, "BITCLI_CACHE": str(cache), "HF_HUB_OFFLINE": "0"}


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_download_caches_and_second_run_uses_the_cache(bucket, npz_bytes, tmp_path, photos, monkeypatch):
    bucket.serve(npz_bytes)
    cache = tmp_path / "cache"
    image = photos["chelsea.png"]
    first = run_bit("predict", image, "--model", NAME, "--format", "json", env=env_for(bucket.url, cache))
    assert first.returncode == 0, first.stderr
    assert bucket.hits == [f"/{NAME}.npz"]
    assert listing(cache) == [f"{NAME}.npz"]  # no .part file beside it
    assert (cache / f"{NAME}.npz").read_bytes() == npz_bytes
    predictions = json.loads(first.stdout)[0]["predictions"]
    assert {p["label"] for p in predictions} <= {f"class_{i}" for i in range(10)}  # 10 classes, from the shapes

    for key, value in env_for(bucket.url, cache).items():
        monkeypatch.setenv(key, value)
    code, out, err = bit("predict", image, "--model", NAME, "--format", "json")  # in this process: cheaper
    assert code == 0, err
    assert bucket.hits == [f"/{NAME}.npz"]  # served from the cache: the bucket saw no second request
    assert out == first.stdout

    code, out, err = bit("predict", image, "--model", cache / f"{NAME}.npz", "--format", "json")
    assert json.loads(out)[0]["predictions"] == predictions  # the same model as the .npz itself


def _unreachable_url() -> str:
    with socket.socket() as s:  # a port that was free a moment ago and has no listener now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.mark.parametrize(
    "case, message",
    [
        ("wrong md5", f"{NAME}: download from {{url}}/{NAME}.npz does not match the server's MD5; the file is corrupt"),
        (
            "short body",
            f"{NAME}: download from {{url}}/{NAME}.npz is incomplete ({{got}} of {{want}} bytes); run again",
        ),
        ("404", f"{NAME}: download failed, HTTP 404 from {{url}}/{NAME}.npz; check the name"),
        ("unreachable", f"{NAME}: cannot reach {{url}}/{NAME}.npz ("),
        ("not an npz", f"{NAME}: the file downloaded from {{url}}/{NAME}.npz is not a usable BiT .npz (not an .npz"),
        ("malformed md5 header", f"{NAME}: {{url}}/{NAME}.npz sent a malformed x-goog-hash md5"),
        ("offline", f"{NAME}: not in the cache ({{cache}}/{NAME}.npz) and offline mode forbids downloading"),
    ],
)
def test_failed_download_is_one_line_and_leaves_the_cache_empty(
    case, message, bucket, npz_bytes, tmp_path, monkeypatch, photos
):
    cache, url = tmp_path / "cache", bucket.url
    fields = {"url": url, "cache": cache}
    if case == "wrong md5":
        bucket.serve(npz_bytes, md5_of=npz_bytes + b"x")
    elif case == "short body":
        bucket.serve(npz_bytes[:5000], length=len(npz_bytes))
        fields.update(got=5000, want=len(npz_bytes))
    elif case == "unreachable":
        url = fields["url"] = _unreachable_url()
    elif case == "not an npz":
        bucket.serve(b"<html>Service Unavailable</html>")
    elif case == "malformed md5 header":
        bucket.serve(npz_bytes)
        status, headers, body = bucket.routes[f"/{NAME}.npz"]
        bucket.routes[f"/{NAME}.npz"] = (status, [*headers[:-1], ("x-goog-hash", "md5=not-base64!")], body)
    for key, value in env_for(url, cache).items():
        monkeypatch.setenv(key, value)
    if case == "offline":
        bucket.serve(npz_bytes)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    code, out, err = bit("predict", photos["chelsea.png"], "--model", NAME, "--format", "json")
    assert code == 1, err
    assert out == ""
    assert err.startswith("Error: ") and err.count("\n") == 1, err
    assert message.format(**fields) in err, err
    assert listing(cache) == []  # no partial download, no temporary file
    if case == "offline":
        assert bucket.hits == []


def test_download_through_a_real_process_reports_one_line(bucket, npz_bytes, tmp_path, photos):
    bucket.serve(npz_bytes, md5_of=b"something else")
    result = run_bit("predict", photos["chelsea.png"], "--model", NAME, env=env_for(bucket.url, tmp_path / "cache"))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        f"Error: {NAME}: download from {bucket.url}/{NAME}.npz does not match the server's MD5; "
        "the file is corrupt, run again\n"
    )
    assert listing(tmp_path / "cache") == []


def test_a_cache_that_refuses_the_rename_is_one_line_and_stays_empty(bucket, npz_bytes, tmp_path, monkeypatch, photos):
    """The download is complete and checked, but the cache cannot take it (a full disk, a read-only cache):
    one line naming the cache and the fix, and no temporary file left in it."""
    import errno
    import os

    bucket.serve(npz_bytes)
    cache = tmp_path / "cache"
    for key, value in env_for(bucket.url, cache).items():
        monkeypatch.setenv(key, value)
    real_replace = os.replace

    def full_cache(src, dst):
        if Path(dst).parent == cache:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", full_cache)
    code, out, err = bit("predict", photos["chelsea.png"], "--model", NAME, "--format", "json")
    assert (code, out) == (1, "")
    assert err == (
        f"Error: {NAME}: cannot write to the model cache {cache} (No space left on device); free space or set "
        "BITCLI_CACHE\n"
    )
    assert listing(cache) == []
