"""Request bodies (bitcli.server.bodies): a body refused past the cap lets go of what it had read at once."""

from __future__ import annotations

import asyncio
import tracemalloc
from collections.abc import AsyncIterator, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from bitcli.server.bodies import RequestError, read_body


def _run_alone(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """asyncio.run on a thread of its own: a session's Playwright browser (the page tests) keeps an event loop
    running in the main thread, where asyncio.run refuses to start."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


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
            _run_alone(read_body(_chunks(60, 100_000), None, 5_000_000))
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (refused.value.status, refused.value.message) == (
        413,
        "the request body passed the 5 MB limit (--max-body-mb)",
    )
    assert refused.value.__traceback__ is not None and held < 1_000_000, held
