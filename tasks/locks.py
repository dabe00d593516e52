"""Advisory file locks: one pipeline run, one submit, one ``dvc add`` at a time per state folder.

``flock``: the kernel drops a lock when its holder's process dies (even by SIGKILL), so a crash
never leaves a stale lock; the file only keeps the last holder's pid, for messages.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def file_lock(path: Path, wait: bool = True) -> Iterator[bool]:
    """An advisory lock on ``path``; yields False if ``wait`` is off and someone holds it.

    ``flock``: the kernel drops it when the holder's process dies (even by SIGKILL), so a
    crash never leaves a stale lock; the file only keeps the last holder's pid, for messages.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            f.truncate(0)
            f.write(f"{os.getpid()}\n")
            f.flush()
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def lock_holder(path: Path) -> int | None:
    """The pid recorded in a lock file (its current or last holder), if any."""
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
