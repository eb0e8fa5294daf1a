"""The connection protocol of `bit serve`: uvicorn's h11 protocol with a deadline for each request's line and
headers (--header-timeout-s).

uvicorn has no such timeout (its `timeout_keep_alive` runs only between requests, and any byte received cancels
it; h11 waits for headers forever; a request timeout is an open uvicorn issue, Kludex/uvicorn#157), so a client
that opens a connection and sends nothing, or half a request line, holds one of --max-connections until it
leaves: a few such sockets lock every other client out with 503. uvicorn's supported way to change how a
connection is handled is its `http` setting, which takes a protocol class; this one is uvicorn's own with a
timer: armed when the connection opens and again after each answer (the next request's turn), disarmed as soon
as the request line and headers are in (the request body has its own deadline, --timeout-s, in the app). When it
fires, a connection that sent part of a request gets a 408 with `Connection: close`; a silent one is closed.
"""

from __future__ import annotations

import asyncio
import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class HeaderDeadline(H11Protocol):
    """uvicorn's h11 protocol; a subclass made by `with_header_timeout` sets the deadline."""

    header_timeout_s: float = 10.0
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the request line and headers are in
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # (a pipelined next request may be read here already)
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._expired)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _expired(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.conn.trailing_data[0] and self.conn.our_state is h11.IDLE:  # part of a request came: say why
            message = (
                f"the request line and headers did not arrive within {self.header_timeout_s:g} s (--header-timeout-s)"
            )
            body = json.dumps({"error": message}).encode("utf-8")
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                       (b"connection", b"close")]  # fmt: skip
            for event in (h11.Response(status_code=408, headers=headers), h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event) or b"")
        self.transport.close()


def with_header_timeout(seconds: float) -> type[HeaderDeadline]:
    """The protocol class for uvicorn's `http` setting, with a `seconds` deadline for request lines and headers."""
    return type("HeaderDeadline", (HeaderDeadline,), {"header_timeout_s": seconds})
