"""errors.one_line: the one way an exception's message is put on one line (it was written out again in the
checkpoint, Hub, Arrow and parquet readers)."""

from __future__ import annotations

from bitcli.errors import one_line


def test_one_line_collapses_whitespace_and_keeps_a_limit() -> None:
    exc = ValueError("line one\n\tline  two\r\n" + "x" * 400)
    assert one_line(exc) == ("line one line two " + "x" * 400)[:300]
    assert one_line(exc, limit=200) == ("line one line two " + "x" * 400)[:200]
    assert one_line(OSError()) == "OSError"  # no message: the type says what happened
