"""The one error type for user mistakes: the CLI prints its message on one line and exits non-zero."""


class BitError(Exception):
    """A problem the user can fix (bad file, missing model, wrong flag value); the message says how."""


class UsageError(BitError):
    """A flag value that cannot work (or not on this machine): exit code 2, like any other bad flag."""


def one_line(exc: BaseException, *, limit: int = 300) -> str:
    """An exception's message on one line (at most `limit` characters), or its type's name if it has none."""
    return " ".join(str(exc).split())[:limit] or type(exc).__name__
