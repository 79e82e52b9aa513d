"""One exception type for every user-facing failure.

The CLI turns an :class:`RcsrError` into a single ``error: ...`` line on stderr and exit code 2;
anything else is a bug and keeps its traceback.
"""


class RcsrError(Exception):
    """Bad input or an unrecoverable condition the user can act on (message = one line)."""
