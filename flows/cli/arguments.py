"""Command-line parsing shared by the commands: a parser that fails on one line, and the
argument types that check input from outside before anything runs."""

from __future__ import annotations

import argparse

from .errors import EXIT_USAGE

MAX_VERSION = 2**31 - 1  # MLflow stores versions as 32-bit integers


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line on one line (no usage block) and exits 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")

def _whole(text: str, expected: str) -> int:
    """An integer from 1 to MAX_VERSION, or an argparse error saying what was ``expected``."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_VERSION:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text[:40]!r}")
    return value


def version_number(text: str) -> int:
    """A model version on the command line: an integer >= 1."""
    return _whole(text, "a version number (1, 2, ...)")


def positive_count(text: str) -> int:
    """A count on the command line: an integer >= 1."""
    return _whole(text, "a whole number from 1")


MAX_WATCH_SECONDS = 86_400


def watch_seconds(text: str) -> float:
    """``run --watch``'s interval: seconds between looks for new batches, 1 to a day."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 1 <= value <= MAX_WATCH_SECONDS:  # (a NaN fails both comparisons)
        raise argparse.ArgumentTypeError(f"expected seconds from 1 to {MAX_WATCH_SECONDS}, "
                                         f"got {text[:40]!r}")
    return value
