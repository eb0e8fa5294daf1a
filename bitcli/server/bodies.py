"""What a client sends `bit serve`: a request body read under a size cap, and cut into its images (one raw
image, or the parts of a multipart/form-data body, in order), and the refusals as HTTP errors with one line.

The cap is enforced while the body is read: a Content-Length over it is refused before a byte is read, and
a body without one (chunked) is abandoned the moment it passes the cap; nothing unbounded is buffered.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from bitcli.ui import megabytes

if TYPE_CHECKING:  # the parser's callback table (python_multipart declares it for type checkers only)
    from python_multipart.multipart import MultipartCallbacks


class RequestError(Exception):
    """An answer other than rows: an HTTP status with a JSON {"error": message} body (and extra headers)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


@dataclass(frozen=True)
class Part:
    """One image of a request: its name (the row's `path`: the part's file name, else its field name, else
    `part N`; a raw body's is the `name` query parameter, default `image`) and its bytes."""

    name: str
    data: bytes


async def read_body(chunks: AsyncIterator[bytes], declared: str | None, max_bytes: int) -> bytes:
    """The whole body from `chunks`, refused (413) as soon as it is known to pass max_bytes: from its declared
    Content-Length, or while it arrives."""
    limit = f"the {megabytes(max_bytes)} limit (--max-body-mb)"
    if declared is not None and declared.strip().isdigit() and int(declared) > max_bytes:
        raise RequestError(413, f"the request body is {megabytes(int(declared))}, over {limit}")
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > max_bytes:
            # The exception's traceback keeps this frame, and through it `body`, alive in a reference cycle
            # until the cycle collector happens to run: up to the cap per refused body (the server's RSS grew by
            # ~20 MB per body streamed past a 50 MB cap). Let go of it first.
            del body
            raise RequestError(413, f"the request body passed {limit}")
    return bytes(body)


def split_images(body: bytes, content_type: str, raw_name: str, max_parts: int) -> list[Part]:
    """The images of a request, in order: the parts of a multipart/form-data body (413 past max_parts, said
    as soon as the part after the last allowed one ends), else the body itself."""
    if not content_type.lower().startswith("multipart/"):
        if not body:
            raise RequestError(400, "the request body is empty; send an image (or several as multipart/form-data)")
        return [Part(raw_name, body)]
    return _multipart(body, content_type, max_parts)


@dataclass
class _Building:
    headers: dict[str, str] = field(default_factory=dict)
    data: bytearray = field(default_factory=bytearray)


def _multipart(body: bytes, content_type: str, max_parts: int) -> list[Part]:
    from python_multipart.exceptions import MultipartParseError
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise RequestError(400, "the multipart body has no boundary in its Content-Type")
    parts: list[Part] = []
    current = _Building()
    header = [bytearray(), bytearray()]  # the header line being read: field, value
    ended: list[None] = []

    def on_part_begin() -> None:
        nonlocal current
        current = _Building()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header[0] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header[1] += data[start:end]

    def on_header_end() -> None:
        current.headers[header[0].decode("latin-1").lower()] = header[1].decode("latin-1")
        header[0], header[1] = bytearray(), bytearray()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        current.data += data[start:end]

    def on_part_end() -> None:
        if len(parts) == max_parts:
            raise RequestError(413, f"more than {max_parts} images in one request (--queue)")
        parts.append(Part(_part_name(current.headers, len(parts) + 1), bytes(current.data)))

    callbacks: MultipartCallbacks = {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_part_data": on_part_data, "on_part_end": on_part_end,
        "on_end": lambda: ended.append(None),
    }  # fmt: skip
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise RequestError(400, f"the multipart body is malformed ({exc})") from None
    if not ended:
        raise RequestError(400, "the multipart body ends before its closing boundary")
    if not parts:
        raise RequestError(400, "the multipart body holds no parts; send one image per part")
    return parts


def _part_name(headers: dict[str, str], number: int) -> str:
    """The part's file name, else its field name, else `part N` (file names as the browser sent them: UTF-8)."""
    from python_multipart.multipart import parse_options_header

    _, params = parse_options_header(headers.get("content-disposition", ""))
    for key in (b"filename", b"name"):
        value = params.get(key)
        if value:
            return value.decode("utf-8", "replace")
    return f"part {number}"
