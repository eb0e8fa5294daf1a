"""The one error type for user mistakes: the CLI prints its message on one line and exits non-zero."""


class BitError(Exception):
    """A problem the user can fix (bad file, missing model, wrong flag value); the message says how."""


class UsageError(BitError):
    """A flag value that cannot work (or not on this machine): exit code 2, like any other bad flag."""
