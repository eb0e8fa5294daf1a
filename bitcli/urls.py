"""Images named by URL: `bit predict https://host/cat.jpg`, a URL on a `-` stdin line or in a label file's path
column. Only http:// and https:// are fetched (a `file://`, `ftp://` or other scheme is refused with one line),
with the standard library (urllib: the environment's proxy settings apply), under limits: a size cap (the body
is read in chunks and abandoned the moment it passes the cap, whatever Content-Length said), a connect timeout,
a read timeout per network read, a deadline for the whole download (connects, headers and body: a watchdog
shuts the connection down when it passes), and at most 5 redirects (counted here, each one checked to stay
http or https). The bytes are decoded by preprocess.load_image, so a URL's image
meets every rule a file's does (decompression bombs, modes, EXIF). Every failure is one BitError line naming
the URL and the fix, which the pipeline turns into that input's error row, like a missing file's.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import io
import re
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from PIL import Image

import bitcli
from bitcli.errors import BitError, one_line
from bitcli.preprocess import image_size, load_image
from bitcli.ui import MB, display, mb_to_bytes, megabytes

SCHEMES = ("http", "https")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")  # what makes an argument a URL rather than a path
_REDIRECTS = (301, 302, 303, 307, 308)
_CHUNK = 1 << 16


@dataclass(frozen=True)
class Limits:
    """What one download may take."""

    max_bytes: int = 50 * MB  # --max-download-mb
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 30.0  # the longest wait for any one read (headers, then each chunk of the body)
    total_timeout_s: float = 300.0  # the whole download (connects, headers, body), so that a server dripping
    # bytes (its headers too) cannot hold a thread
    max_redirects: int = 5


DEFAULT = Limits()


def downloads(max_mb: float) -> Limits:
    """The limits of a command run with --max-download-mb `max_mb`."""
    return Limits(max_bytes=mb_to_bytes(max_mb))


def is_url(text: str) -> bool:
    """Whether an argument (or a label file's path cell) names a URL (`scheme://...`) rather than a file."""
    return bool(_SCHEME.match(text))


def refusal(url: str) -> str | None:
    """Why the URL is not fetched (a scheme other than http and https), or None; the caller names the URL."""
    scheme = urlsplit(url).scheme.lower()
    if scheme in SCHEMES:
        return None
    return f"only http:// and https:// URLs are fetched, not {scheme}://; download the file and pass its path"


def open_image(url: str, limits: Limits = DEFAULT, name: str | None = None) -> Image.Image:
    """The URL's image, decoded by preprocess.load_image; errors name it `name` (default: the URL)."""
    name = name or display(url)
    return load_image(io.BytesIO(fetch(url, limits, name)), name=name)


def url_image_size(url: str, limits: Limits = DEFAULT, name: str | None = None) -> tuple[int, int]:
    """(width, height) of the URL's image, from its header (the whole body is fetched first)."""
    name = name or display(url)
    return image_size(io.BytesIO(fetch(url, limits, name)), name=name)


def fetch(url: str, limits: Limits = DEFAULT, name: str | None = None) -> bytes:
    """The body of `url` after at most limits.max_redirects redirects; BitError (one line starting with `name`,
    default the URL) for a refused scheme, an HTTP error status, too many redirects, a body over the cap, a
    timeout or a network error."""
    name = name or display(url)
    reason = refusal(url)
    if reason is not None:
        raise BitError(f"{name}: {reason}")
    deadline = _Deadline(limits.total_timeout_s)
    try:
        return _follow(url, limits, name, deadline)
    finally:
        deadline.cancel()


def _follow(url: str, limits: Limits, name: str, deadline: _Deadline) -> bytes:
    """fetch's work, every connection watched by `deadline`."""
    handlers = (_Http(limits.read_timeout_s, deadline), _Https(limits.read_timeout_s, deadline))
    opener = urllib.request.build_opener(_NoRedirects(), *handlers)
    current = url
    for _ in range(limits.max_redirects + 1):
        request = urllib.request.Request(current, headers={"User-Agent": f"bitcli/{bitcli.__version__}"})
        try:
            if deadline.passed():
                raise TimeoutError()
            response = opener.open(request, timeout=min(limits.connect_timeout_s, deadline.left()))
        except urllib.error.HTTPError as exc:
            exc.close()
            location = exc.headers.get("Location") if exc.code in _REDIRECTS else None
            if location is None:
                raise BitError(f"{name}: the server answered HTTP {exc.code} ({exc.reason}); check the URL") from None
            current = _next_hop(name, current, location)
            continue
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise _network_error(name, exc, limits, deadline) from None
        with response:
            return _read(response, name, limits, deadline)
    raise BitError(f"{name}: more than {limits.max_redirects} redirects; pass the URL they end at")


def _next_hop(name: str, current: str, location: str) -> str:
    """Where a redirect points (relative locations resolved), refused when it leaves http and https."""
    target = urljoin(current, location)
    scheme = urlsplit(target).scheme.lower()
    if scheme not in SCHEMES:
        raise BitError(f"{name}: redirected to the scheme {scheme}://; only http and https redirects are followed")
    return target


def _read(response, name: str, limits: Limits, deadline: _Deadline) -> bytes:
    """The body in chunks, abandoned as soon as it passes the cap or the deadline."""
    cap = megabytes(limits.max_bytes)  # in the unit of --max-download-mb
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > limits.max_bytes:
        raise BitError(f"{name}: the image is {megabytes(int(declared))}, over the {cap} download limit; "
                       "raise --max-download-mb or download it first")  # fmt: skip
    body = bytearray()
    try:
        while chunk := response.read1(_CHUNK):  # what has arrived: the deadline is checked as bytes trickle in
            body += chunk
            if len(body) > limits.max_bytes:
                raise BitError(
                    f"{name}: the download passed the {cap} limit; raise --max-download-mb or download it first"
                )
            if deadline.passed():
                raise _late(name, limits)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise _network_error(name, exc, limits, deadline) from None
    if deadline.passed():  # the watchdog shut the connection: what was read is cut short
        raise _late(name, limits)
    return bytes(body)


def _late(name: str, limits: Limits) -> BitError:
    return BitError(f"{name}: the download took over {limits.total_timeout_s:g} s; download the file and pass its path")


def _network_error(name: str, exc: BaseException, limits: Limits, deadline: _Deadline) -> BitError:
    if deadline.passed():  # (the watchdog's shutdown, or a connect cut to the time left, ended it)
        return _late(name, limits)
    reason = exc.reason if isinstance(exc, urllib.error.URLError) and isinstance(exc.reason, BaseException) else exc
    if isinstance(reason, (TimeoutError, socket.timeout)):
        what = f"no answer within {limits.connect_timeout_s:g} s to connect or {limits.read_timeout_s:g} s to read"
    elif isinstance(reason, socket.gaierror):
        what = "cannot resolve the host name"
    elif isinstance(reason, ConnectionRefusedError):
        what = "connection refused"
    elif isinstance(reason, ssl.SSLError):
        what = f"TLS error: {one_line(reason)}"
    else:
        what = one_line(reason)
    return BitError(f"{name}: cannot download ({what}); check the URL and the network, or download the file first")


class _Deadline:
    """The whole download's deadline, kept by a watchdog timer that shuts down the socket of every connection
    it watches when the time is up: that ends whatever read is waiting. A per-read timeout cannot: a server
    sending its status line and headers a byte at a time answers every read in time (the body loop checks
    the clock itself, but http.client reads the headers before it returns)."""

    def __init__(self, seconds: float) -> None:
        self._end = time.monotonic() + seconds
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._expired = False
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def left(self) -> float:
        return max(self._end - time.monotonic(), 0.0)

    def passed(self) -> bool:
        return self._expired or time.monotonic() >= self._end

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            if not self._expired:
                self._sockets.append(sock)
                return
        _shut(sock)

    def cancel(self) -> None:
        self._timer.cancel()

    def _expire(self) -> None:
        with self._lock:
            self._expired = True
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            _shut(sock)


def _shut(sock: socket.socket) -> None:
    """Both directions of `sock` shut down (the plain socket's: a TLS socket's own shutdown would drop its TLS
    state under the thread reading it); its owner still closes it."""
    with contextlib.suppress(OSError):  # already closed
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Every redirect comes back as an HTTPError: fetch follows them itself, counting and checking each."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


class _Watched(http.client.HTTPConnection):
    """A connection whose socket waits `read_timeout` for each read once connected (urllib has one timeout for
    both; the connect timeout is the request's), and is watched by the download's deadline. Put before
    HTTPSConnection in the bases, its `connect` runs HTTPSConnection's (TLS included), then sets both."""

    read_timeout: float
    deadline: _Deadline

    def connect(self) -> None:
        super().connect()
        self.sock.settimeout(self.read_timeout)
        self.deadline.watch(self.sock)


class _HTTPConnection(_Watched, http.client.HTTPConnection):
    def __init__(self, host: str, timeout: float, *, read_timeout: float, deadline: _Deadline) -> None:
        super().__init__(host, timeout=timeout)
        self.read_timeout, self.deadline = read_timeout, deadline


class _HTTPSConnection(_Watched, http.client.HTTPSConnection):
    def __init__(self, host: str, timeout: float, *, read_timeout: float, deadline: _Deadline) -> None:
        super().__init__(host, timeout=timeout, context=ssl.create_default_context())
        self.read_timeout, self.deadline = read_timeout, deadline


class _Http(urllib.request.HTTPHandler):
    def __init__(self, read_timeout: float, deadline: _Deadline) -> None:
        super().__init__()
        self.read_timeout, self.deadline = read_timeout, deadline

    def http_open(self, req):
        return self.do_open(
            functools.partial(_HTTPConnection, read_timeout=self.read_timeout, deadline=self.deadline), req
        )


class _Https(urllib.request.HTTPSHandler):
    def __init__(self, read_timeout: float, deadline: _Deadline) -> None:
        super().__init__()
        self.read_timeout, self.deadline = read_timeout, deadline

    def https_open(self, req):
        return self.do_open(
            functools.partial(_HTTPSConnection, read_timeout=self.read_timeout, deadline=self.deadline), req
        )
