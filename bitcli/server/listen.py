"""Running the API on uvicorn: the listening socket (bound before the model loads, so that a taken port fails
at once), the server's limits, and the way it stops.

SIGTERM (and Ctrl-C) stop it gracefully: uvicorn stops accepting connections, closes idle keep-alive ones, lets
every request in flight finish (within the request timeout plus a few seconds), then the app's lifespan ends,
which drains the model thread (bitcli.server.app.Service.lifespan). The command then returns 0 for SIGTERM (a
service manager's ordinary stop) and 130 for Ctrl-C, as every bit command does when interrupted; uvicorn's own
habit of re-raising the signal after its shutdown (which would end the process by the signal) is left out.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import math
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from types import FrameType

import uvicorn
from starlette.types import ASGIApp

from bitcli.errors import BitError
from bitcli.server.protocol import with_header_timeout
from bitcli.tool_options import ServeOptions

SHUTDOWN_GRACE_S = 5.0  # beyond the request timeout, for the answers in flight to be written


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port), not yet listening; port 0 takes a free one."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise BitError(f"--host {host}: cannot resolve it ({exc}); use an address such as 127.0.0.1") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise BitError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port (0: a free one)"
        ) from None
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def is_loopback(address: str) -> bool:
    """Whether only this machine can reach `address` (127.0.0.0/8, ::1)."""
    return ipaddress.ip_address(address).is_loopback


class _Server(uvicorn.Server):
    """uvicorn's server, telling `on_ready` once it accepts connections and remembering the signal that stopped it."""

    def __init__(self, config: uvicorn.Config, on_ready: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_ready = on_ready
        self.stopped_by: int | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self.on_ready()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's, without re-raising the signal once the graceful shutdown is done."""
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.stopped_by is None:
            self.stopped_by = sig
        super().handle_exit(sig, frame)


def make_server(app: ASGIApp, opts: ServeOptions, on_ready: Callable[[], None]) -> _Server:
    """uvicorn's server for `app` with `opts`' connection limit, header deadline and shutdown grace; `on_ready()` once it
    accepts connections. Its `serve(sockets=[sock])` coroutine runs it; setting `should_exit` stops it."""
    config = uvicorn.Config(
        app,
        http=with_header_timeout(opts.header_timeout_s),  # uvicorn's h11, with a deadline for request headers
        loop="asyncio",
        lifespan="on",
        log_level="warning",
        access_log=False,
        limit_concurrency=opts.max_connections,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=math.ceil(opts.timeout_s + SHUTDOWN_GRACE_S),
    )
    return _Server(config, on_ready)


def serve(app: ASGIApp, sock: socket.socket, opts: ServeOptions, on_ready: Callable[[], None]) -> int:
    """Serve `app` on the bound socket until SIGTERM or Ctrl-C: 0 after SIGTERM, 130 after Ctrl-C."""
    server = make_server(app, opts, on_ready)
    with sock:
        asyncio.run(server.serve(sockets=[sock]))
    return 130 if server.stopped_by == signal.SIGINT else 0
