"""Exit codes and the two errors every command may raise: each is printed on one line,
``unlearn COMMAND: error: REASON`` (exit 2) or ``unlearn COMMAND: failed: REASON`` (exit 1)."""

from __future__ import annotations

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad arguments or input from outside: printed on one line, exit code 2."""

class Failure(Exception):
    """A validation or gate failure: printed on one line, exit code 1."""
