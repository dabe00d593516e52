"""What ``unlearn run --watch`` shares with a one-shot ``unlearn run`` on the same state folder,
so that the one-shot command hands its batches to the watcher instead of loading the stack:

- ``artifacts/watcher.lock``: every watcher holds a shared ``flock`` on it for its life (the
  kernel drops it when the process dies, even by SIGKILL); a one-shot run that cannot take it
  exclusively knows a watcher is there.
- ``artifacts/watcher.wake``: a one-shot run creates it; a waiting watcher looks for it a few
  times a second and, once it has removed it, looks for pending batches at once instead of
  after its ``--watch`` interval.
- ``artifacts/watcher-passes.jsonl``: one JSON line per pass, the result ``run --json``
  prints, appended under ``watcher-passes.lock``; the one-shot run reads the lines written
  after it started. The file is replaced by its newest lines when it grows past
  ``PASSES_MAX_BYTES``; a reader that finds another file there reads it from the start.

Nothing here imports torch or the orchestration stack: the one-shot run that hands its
batches over answers in the time of the watcher's pass.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .locks import file_lock, lock_is_held

WAKE_POLL_S = 0.05  # how often a waiting watcher looks for the wake file (a stat)
PASSES_MAX_BYTES = 4 << 20  # the pass log is cut to its newest quarter past this size


def _lock_file(paths) -> Path:
    return paths.artifacts / "watcher.lock"


def wake_file(paths) -> Path:
    return paths.artifacts / "watcher.wake"


def passes_file(paths) -> Path:
    return paths.artifacts / "watcher-passes.jsonl"


@contextmanager
def watching(paths) -> Iterator[None]:
    """Held by a watcher for its life: a shared lock, so that several watchers (one per host
    on a shared state folder) can hold it at once."""
    path = _lock_file(paths)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def watcher_running(paths) -> bool:
    """True while some process on this host (or one sharing this folder with working locks)
    holds ``watching``."""
    return lock_is_held(_lock_file(paths))


def wake(paths) -> None:
    """Ask a waiting watcher to look for pending batches now."""
    wake_file(paths).touch()


def woken(paths) -> bool:
    """True, once, after ``wake``: the first watcher to see the file removes it."""
    try:
        wake_file(paths).unlink()
    except FileNotFoundError:
        return False
    return True


def record_pass(paths, result: dict[str, Any]) -> None:
    """Append one pass's result (and cut the log to its newest lines when it is too long)."""
    path = passes_file(paths)
    line = json.dumps({**result, "pid": os.getpid()}, default=str) + "\n"
    with file_lock(paths.artifacts / "watcher-passes.lock"):
        with open(path, "a") as f:
            f.write(line)
        if path.stat().st_size > PASSES_MAX_BYTES:
            kept = path.read_bytes()[-PASSES_MAX_BYTES // 4:]
            kept = kept[kept.find(b"\n") + 1:]  # from the first whole line on
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(kept)
            os.replace(tmp, path)


class PassLog:
    """The pass lines appended after this reader was made."""

    def __init__(self, paths) -> None:
        self.path = passes_file(paths)
        self.file, self.offset = self._where()
        self._partial = b""

    def _where(self) -> tuple[int | None, int]:
        """(the file's inode, its size); (None, 0) while there is none."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None, 0
        return st.st_ino, st.st_size

    def new_passes(self) -> list[dict[str, Any]]:
        """The whole lines written since the last call (all of them again, after a cut)."""
        file, size = self._where()
        if file != self.file or size < self.offset:  # cut: a new file, read from its start
            self.file, self.offset, self._partial = file, 0, b""
        with contextlib.suppress(FileNotFoundError), open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
            self.offset += len(data)
            *lines, self._partial = (self._partial + data).split(b"\n")
            out = []
            for line in lines:
                with contextlib.suppress(ValueError):  # a line cut by a crash mid-write
                    passed = json.loads(line)
                    if isinstance(passed, dict):  # (a cut line may still parse)
                        out.append(passed)
            return out
        return []
