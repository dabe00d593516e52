"""Advisory file locks: one pipeline run, one submit, one ``dvc add`` at a time per state folder.

``flock``: the kernel drops a lock when its holder's process dies (even by SIGKILL), so a crash
never leaves a stale lock; the file only keeps the last holder's pid, for messages.
"""

from __future__ import annotations

import contextlib
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


def lock_is_held(path: Path) -> bool:
    """True while some process holds a ``flock`` on ``path`` (shared or exclusive): probed with
    an exclusive lock taken and dropped at once."""
    try:
        f = open(path)  # noqa: SIM115  (closed below, whichever way the probe goes)
    except FileNotFoundError:
        return False
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def lock_holder(path: Path) -> int | None:
    """The pid recorded in a lock file (its current or last holder), if any."""
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


@contextmanager
def pipeline_lock(paths, wait: bool = False) -> Iterator[bool]:
    """One pipeline command at a time per state: the ``flock`` on ``artifacts/pipeline.lock``,
    and, with the ledger on PostgreSQL (``UNLEARN_LEDGER_URL``), a session advisory lock in
    that database too, which holds across hosts that share no filesystem. PostgreSQL drops
    it when the holder's connection ends (its process died, or its host went away). Yields
    False if ``wait`` is off and someone holds either."""
    from .ledger import RUN_LOCK_KEY

    with _shared_lock(paths.lock, RUN_LOCK_KEY, "pipeline-lock", wait) as got:
        yield got


@contextmanager
def submit_lock(paths) -> Iterator[None]:
    """One submit at a time per state (batch numbers are handed out under it): the ``flock``
    on ``artifacts/submit.lock`` and, with the ledger on PostgreSQL, an advisory lock there
    (waited for, like the file lock)."""
    from .ledger import SUBMIT_LOCK_KEY

    with _shared_lock(paths.artifacts / "submit.lock", SUBMIT_LOCK_KEY, "submit-lock", True):
        yield


@contextmanager
def _shared_lock(path: Path, key: int, purpose: str, wait: bool) -> Iterator[bool]:
    from .ledger import LedgerError, ledger_url, pg_connect, redact

    url = ledger_url()
    with file_lock(path, wait=wait) as got:
        if not got or url is None:
            yield got
            return
        try:
            conn = pg_connect(url, purpose=purpose)
        except Exception as e:  # noqa: BLE001  (psycopg's connection errors)
            raise LedgerError(f"cannot take the {purpose.replace('-', ' ')} in {redact(url)}: "
                              f"{str(e).strip().splitlines()[0] if str(e) else e}") from None
        try:
            fn = "pg_advisory_lock" if wait else "pg_try_advisory_lock"
            got = conn.execute(f"SELECT {fn}(%s)", (key,)).fetchone()[0] is not False
            yield got
        finally:
            conn.close()  # ends the session: the lock goes with it


def pipeline_lock_holder(paths) -> str:
    """Who holds the pipeline lock, for messages: ``process PID holds artifacts/...`` or, on
    PostgreSQL, the holder's host and pid as its connection names them."""
    from .ledger import RUN_LOCK_KEY, ledger_url, pg_connect

    url = ledger_url()
    row = None
    if url is not None:
        # a message only: without an answer, the lock file's pid
        with contextlib.suppress(Exception), pg_connect(url) as conn:
            row = conn.execute(
                "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a "
                "USING (pid) WHERE l.locktype='advisory' AND l.granted AND "
                "(l.classid::bigint << 32) | l.objid::bigint = %s",
                (RUN_LOCK_KEY,)).fetchone()
    if row is not None:  # application_name: "unlearn pipeline-lock HOST:PID"
        host, _, pid_text = row[0].split()[-1].rpartition(":")
        return f"process {pid_text} on {host} holds the pipeline lock in the ledger database"
    pid = lock_holder(paths.lock)
    return f"{f'process {pid}' if pid else 'another process'} holds {paths.lock}"
