"""Helpers of the `bit serve` tests: the API on a real uvicorn in a thread of the test process (127.0.0.1, a
free port), a plain http.client client, multipart bodies, and an engine whose forward pass waits for a gate."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from bitcli.server import listen
from bitcli.server.app import build_app
from bitcli.tool_options import ServeOptions


@contextlib.contextmanager
def serving(engine: Any, **limits: Any) -> Iterator[str]:
    """`bit serve`'s app over `engine` with `limits` (ServeOptions fields), on uvicorn in a thread: its base URL.
    Stopped (gracefully, as SIGTERM does) when the block ends."""
    opts = ServeOptions(model="test", **limits)
    sock = listen.bind("127.0.0.1", 0)
    url = listen.url_of(sock)
    ready = threading.Event()
    server = listen.make_server(build_app(engine, opts), opts, ready.set)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    try:
        assert ready.wait(20), "the server did not start"
        yield url
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        assert not thread.is_alive(), "the server did not stop"


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


def connect(url: str, timeout: float = 20) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    assert parts.hostname == "127.0.0.1"  # loopback only
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)


def call(url: str, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> Reply:
    conn = connect(url)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        conn.close()


def post(url: str, path: str, body: bytes, content_type: str = "application/octet-stream") -> Reply:
    return call(url, "POST", path, body, {"Content-Type": content_type})


def multipart(parts: list[tuple[str, str | None, bytes]]) -> tuple[bytes, str]:
    """(body, Content-Type) of a multipart/form-data body of (field name, file name or None, bytes) parts."""
    boundary = "bitcli-test-boundary-7MA4YWxkTrZu0gW"
    out = bytearray()
    for field, filename, data in parts:
        disposition = f'form-data; name="{field}"' + (f'; filename="{filename}"' if filename is not None else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode()
        out += b"Content-Type: application/octet-stream\r\n\r\n" + data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"


def wait_until(condition: Callable[[], bool], timeout: float = 20) -> None:
    """Poll `condition` (the server's state, seen through /healthz) until it holds."""
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out waiting"
        time.sleep(0.01)


class Gated:
    """An engine whose forward passes wait until `gate` is set (the model thread is held busy on purpose), and
    that counts the images of each forward pass."""

    def __init__(self, engine: Any, fail: bool = False) -> None:
        self.engine, self.fail = engine, fail
        self.source, self.device, self.preprocess, self.labels = (
            engine.source,
            engine.device,
            engine.preprocess,
            engine.labels,
        )
        self.temperature, self.thresholds = engine.temperature, engine.thresholds  # (the Engine protocol's)
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()  # set when a forward pass starts (and waits for the gate)
        self.passes: list[int] = []

    @property
    def num_classes(self) -> int:
        return self.engine.num_classes

    def logits(self, batch):
        self.entered.set()
        assert self.gate.wait(30)
        self.passes.append(len(batch))
        if self.fail:
            raise RuntimeError("CUDA out of memory (simulated)")
        return self.engine.logits(batch)

    def features(self, batch):
        self.entered.set()
        assert self.gate.wait(30)
        self.passes.append(len(batch))
        return self.engine.features(batch)
