"""Request bodies (bitcli.server.bodies): a body refused past the cap lets go of what it had read at once."""

from __future__ import annotations

import asyncio
import tracemalloc
from collections.abc import AsyncIterator

import pytest

from bitcli.server.bodies import RequestError, read_body


async def _chunks(n: int, size: int) -> AsyncIterator[bytes]:
    for _ in range(n):
        yield b"x" * size


def test_a_body_refused_past_the_cap_is_freed_while_its_error_lives():
    """The 413's traceback holds read_body's frame (an asyncio task keeps the exception until it is collected):
    the 5 MB read so far must not be held with it (it was: the server's RSS grew under clients streaming bodies
    past the cap, ~20 MB per body at a 50 MB cap, until the cycle collector ran)."""
    tracemalloc.start()
    try:
        with pytest.raises(RequestError) as refused:
            asyncio.run(read_body(_chunks(60, 100_000), None, 5_000_000))
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (refused.value.status, refused.value.message) == (
        413,
        "the request body passed the 5 MB limit (--max-body-mb)",
    )
    assert refused.value.__traceback__ is not None and held < 1_000_000, held
