"""The request ledger: deletion batches, their requests, releases and promotions.

SQLite (WAL) in ``artifacts/ledger.db`` by default; PostgreSQL when ``UNLEARN_LEDGER_URL``
names a database (``postgresql://USER:PASSWORD@HOST:PORT/DB``), so that pipeline runs on
several hosts share one ledger. Both run the same statements (``_PgDb`` translates SQLite's
placeholders and upsert) with the same guarantees: every write is one transaction, and
writers are serialised (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: a transaction-level
advisory lock taken first), so a read-then-write such as the next batch number or an
attempt joining a report sees no other writer in between. Errors are ``sqlite3``'s exception
classes with either backend (the callers catch one family).

A batch is ``pending`` (accepted, not applied yet), ``done`` (its deletion is in the champion
lineage; ``version`` names the release that applied it) or ``rejected`` (with a reason and a
report). Every state change is one transaction, so a failure leaves a batch pending or
rejected, never half-done. MLflow keeps no alias history, so promotions are recorded here
(rollback reads them), together with each release's parent and the batches it applied.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .faults import fault

SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    batch_id   TEXT PRIMARY KEY,
    seq        INTEGER NOT NULL UNIQUE,
    state      TEXT NOT NULL CHECK (state IN ('pending', 'done', 'rejected')),
    source     TEXT NOT NULL,
    rows       INTEGER NOT NULL,
    submitted  REAL NOT NULL,
    updated    REAL NOT NULL,
    version    INTEGER,
    reason     TEXT,
    report     TEXT
);
CREATE TABLE IF NOT EXISTS requests (
    batch_id    TEXT NOT NULL REFERENCES batches(batch_id),
    row         INTEGER NOT NULL,
    request_id  TEXT,
    instance_id INTEGER,
    objective   TEXT,
    new_label   INTEGER,
    instance_key TEXT,
    PRIMARY KEY (batch_id, row)
);
CREATE TABLE IF NOT EXISTS releases (
    version INTEGER PRIMARY KEY,
    parent  INTEGER,
    batches TEXT NOT NULL,
    passed  INTEGER NOT NULL,
    created REAL NOT NULL,
    built_with TEXT
);
CREATE TABLE IF NOT EXISTS promotions (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    version  INTEGER NOT NULL,
    previous INTEGER,
    action   TEXT NOT NULL,
    note     TEXT,
    at       REAL NOT NULL
);
"""

# the same tables in PostgreSQL's types (REAL is a 4-byte float there)
PG_SCHEMA = (SCHEMA.replace("REAL", "DOUBLE PRECISION")
             .replace("seq      INTEGER PRIMARY KEY AUTOINCREMENT", "seq      BIGSERIAL PRIMARY KEY"))
LEDGER_URL_ENV = "UNLEARN_LEDGER_URL"
# advisory lock keys: "unlearn" + 1 (ledger writes), + 2 (pipeline runs), + 3 (submits)
WRITE_LOCK_KEY = 0x756E6C6561726E01
RUN_LOCK_KEY = 0x756E6C6561726E02
SUBMIT_LOCK_KEY = 0x756E6C6561726E03


def ledger_url() -> str | None:
    """The PostgreSQL ledger's URL (``UNLEARN_LEDGER_URL``), or None: the SQLite file."""
    url = os.environ.get(LEDGER_URL_ENV, "").strip()
    if not url:
        return None
    if not url.startswith(("postgresql://", "postgres://")):
        raise LedgerError(f"{LEDGER_URL_ENV} must be a postgresql:// URL (got "
                          f"{redact(url)!r}); unset it for the SQLite ledger in artifacts/")
    return url


def redact(url: str) -> str:
    """A database URL without its password, for messages."""
    return re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", url)


def pg_connect(url: str, purpose: str = "ledger"):
    """A psycopg connection (autocommit) that names its holder in ``pg_stat_activity``."""
    import psycopg

    return psycopg.connect(url, autocommit=True, connect_timeout=10,
                           application_name=f"unlearn {purpose} "
                                            f"{socket.gethostname()}:{os.getpid()}"[:63])


def ledger_present(path: str | Path) -> bool:
    """Whether there is a ledger to open without creating one: the SQLite file exists and is
    not empty, or the PostgreSQL database holds its tables (an unreachable database counts as
    present: opening it then fails with the reason)."""
    url = ledger_url()
    if url is None:
        p = Path(path)
        return p.exists() and p.stat().st_size > 0
    try:
        with pg_connect(url) as conn:
            return conn.execute("SELECT to_regclass('batches') IS NOT NULL").fetchone()[0]
    except Exception:  # noqa: BLE001  (unreachable: Ledger() names the reason)
        return True


def ledger_name(path: str | Path) -> str:
    """The ledger as messages name it: the SQLite file, or the database URL sans password."""
    url = ledger_url()
    return redact(url) if url else str(path)


class _Row(tuple):
    """A result row read by position or by column name, like ``sqlite3.Row``."""

    names: tuple[str, ...] = ()

    def __getitem__(self, key):  # type: ignore[override]
        if isinstance(key, str):
            return tuple.__getitem__(self, self.names.index(key))
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self.names)


def _row_factory(cursor):
    names = tuple(c.name for c in cursor.description or ())
    cls = type("Row", (_Row,), {"names": names})
    return lambda values: cls(values)


_PLACEHOLDER = re.compile(r"\bIS NOT \?|\bIS \?|\?")


def _pg_sql(sql: str) -> str:
    """SQLite's statement for PostgreSQL: ``?`` -> ``%s``, ``IS [NOT] ?`` -> ``IS [NOT]
    DISTINCT FROM``, the releases upsert."""
    if sql.startswith("INSERT OR REPLACE INTO releases"):
        sql = (sql.replace("INSERT OR REPLACE", "INSERT")
               + " ON CONFLICT (version) DO UPDATE SET parent=EXCLUDED.parent, "
                 "batches=EXCLUDED.batches, passed=EXCLUDED.passed, created=EXCLUDED.created, "
                 "built_with=EXCLUDED.built_with")
    sql = sql.replace(" WHERE 0", " WHERE false")
    return _PLACEHOLDER.sub(lambda m: {"IS NOT ?": "IS DISTINCT FROM %s",
                                       "IS ?": "IS NOT DISTINCT FROM %s"}.get(m.group(0), "%s"),
                            sql)


class _PgDb:
    """The part of ``sqlite3.Connection`` the ledger uses, over psycopg; psycopg's errors
    become ``sqlite3``'s (a lost connection: OperationalError)."""

    def __init__(self, url: str):
        import psycopg

        self.psycopg = psycopg
        self.conn = pg_connect(url)
        self.conn.row_factory = _row_factory

    def _error(self, e: Exception) -> sqlite3.Error:
        errors = self.psycopg.errors
        if isinstance(e, (self.psycopg.OperationalError, self.psycopg.InterfaceError,
                          errors.LockNotAvailable, errors.QueryCanceled)):
            return sqlite3.OperationalError(str(e).strip().splitlines()[0])
        if isinstance(e, self.psycopg.IntegrityError):
            return sqlite3.IntegrityError(str(e).strip().splitlines()[0])
        return sqlite3.DatabaseError(str(e).strip().splitlines()[0])

    def execute(self, sql: str, args: tuple | list = ()):
        if sql == "BEGIN IMMEDIATE":  # one writer at a time, as SQLite
            self.execute("BEGIN")
            return self.execute("SELECT pg_advisory_xact_lock(?)", (WRITE_LOCK_KEY,))
        try:
            return self.conn.execute(_pg_sql(sql), tuple(args) or None)
        except self.psycopg.Error as e:
            raise self._error(e) from None

    def executemany(self, sql: str, rows) -> None:
        try:
            with self.conn.cursor() as cur:
                cur.executemany(_pg_sql(sql), list(rows))
        except self.psycopg.Error as e:
            raise self._error(e) from None

    def executescript(self, script: str) -> None:
        self.execute("BEGIN")
        try:
            self.execute("SELECT pg_advisory_xact_lock(?)", (WRITE_LOCK_KEY,))
            for statement in filter(str.strip, script.split(";")):
                self.execute(statement)
            self.execute("COMMIT")
        except BaseException:
            if not self.conn.closed:
                self.conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self.conn.close()


EXPECTED_COLUMNS = {
    "batches": {"batch_id", "seq", "state", "source", "rows", "submitted", "updated", "version",
                "reason", "report"},
    "requests": {"batch_id", "row", "request_id", "instance_id", "objective", "new_label"},
    "releases": {"version", "parent", "batches", "passed", "created"},
    "promotions": {"seq", "version", "previous", "action", "note", "at"},
}


# (table, column) added after the first ledgers were written; opening one adds them
LATER_COLUMNS = (("requests", "instance_key"), ("releases", "built_with"))


@dataclass(frozen=True)
class Batch:
    batch_id: str
    seq: int
    state: str
    source: str
    rows: int
    submitted: float
    updated: float
    version: int | None
    reason: str | None
    report: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "report"}


class LedgerError(RuntimeError):
    """The ledger file is not a ledger (not SQLite, damaged, unreadable): nothing was changed."""


class Ledger:
    """A thin wrapper over one SQLite file (or the PostgreSQL database ``UNLEARN_LEDGER_URL``
    names, in place of ``path``); open per command, close when done."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        url = ledger_url()
        if url is not None:
            self._open_pg(url)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        except sqlite3.Error as e:
            raise LedgerError(f"cannot open the ledger {self.path}: {e}") from None
        try:
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self.db.executescript(SCHEMA)
            for table, columns in EXPECTED_COLUMNS.items():
                found = {r[1] for r in self.db.execute(f"PRAGMA table_info({table})")}
                if not columns <= found:
                    raise sqlite3.DatabaseError(f"table {table} lacks "
                                                f"{', '.join(sorted(columns - found))}")
            # columns added later: a ledger from before gets them (NULL: by id; the primary
            # method, as releases were built before the escalation policy)
            for table, column in LATER_COLUMNS:
                if column not in {r[1] for r in self.db.execute(f"PRAGMA table_info({table})")}:
                    self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} TEXT")
        except sqlite3.Error as e:
            self.db.close()
            raise LedgerError(f"the ledger {self.path} is damaged or not a ledger ({e}); "
                              "rebuild it from the registry and data/ with `unlearn repair` "
                              "(or restore it from a backup)") from None

    def _open_pg(self, url: str) -> None:
        self.where = redact(url)
        try:
            self.db = _PgDb(url)  # type: ignore[assignment]
        except Exception as e:  # noqa: BLE001  (psycopg's connection errors)
            raise LedgerError(f"cannot open the ledger {self.where}: "
                              f"{str(e).strip().splitlines()[0] if str(e) else e}") from None
        try:
            if self.db.execute("SELECT to_regclass('promotions')").fetchone()[0] is None:
                self.db.executescript(PG_SCHEMA)
            for table, column in LATER_COLUMNS:
                self.db.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} TEXT")
            for table, columns in EXPECTED_COLUMNS.items():
                found = {r[0] for r in self.db.execute(
                    "SELECT column_name FROM information_schema.columns WHERE table_name=? "
                    "AND table_schema=current_schema()", (table,))}
                if not columns <= found:
                    raise sqlite3.DatabaseError(f"table {table} lacks "
                                                f"{', '.join(sorted(columns - found))}")
        except sqlite3.Error as e:
            self.db.close()
            raise LedgerError(f"the ledger {self.where} is damaged or not a ledger ({e}); "
                              "rebuild it from the registry and data/ with `unlearn repair` "
                              "(or restore it from a backup)") from None

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Ledger:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any error. A ledger that cannot be
        written (read-only file or mount, full disk, locked past the timeout) raises
        LedgerError: one line, nothing changed."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            raise self._unwritable(e) from None
        try:
            yield self.db
        except sqlite3.OperationalError as e:
            self._rollback()
            raise self._unwritable(e) from None
        except BaseException:
            self._rollback()
            raise
        try:
            self.db.execute("COMMIT")
        except sqlite3.OperationalError as e:
            self._rollback()
            raise self._unwritable(e) from None

    def _rollback(self) -> None:
        try:
            self.db.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # no transaction left to roll back (SQLite ended it with the error)

    def _unwritable(self, e: sqlite3.Error) -> LedgerError:
        if isinstance(self.db, _PgDb):
            return LedgerError(f"the ledger {self.where} cannot be written ({e}); nothing was "
                               "changed: check that the database is reachable, and retry")
        return LedgerError(f"the ledger {self.path} cannot be written ({e}); nothing was "
                           "changed: make it writable (or free the disk) and retry")

    # -- batches ---------------------------------------------------------------------------

    def next_seq(self) -> int:
        row = self.db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM batches").fetchone()
        return int(row[0])

    def add_batch(self, batch_id: str, seq: int, state: str, source: str,
                  rows: list[dict[str, Any]], reason: str | None = None,
                  report: dict[str, Any] | None = None) -> None:
        """Record a submitted batch and its requests in one transaction. A rejected batch's
        text values are cut to MAX_STORED_CHARS: what was refused may be huge, and the
        listings read every row (accepted values are bounded by validation)."""
        now = time.time()
        if state == "rejected":
            rows = [{k: _bounded(v) for k, v in r.items()} for r in rows]
            source = _bounded(source) or ""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO batches VALUES (?, ?, ?, ?, ?, ?, ?, NULL, ?, ?)",
                (batch_id, seq, state, source, len(rows), now, now, reason,
                 json.dumps(report) if report is not None else None),
            )
            db.executemany(
                "INSERT INTO requests (batch_id, row, request_id, instance_id, objective, "
                "new_label, instance_key) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(batch_id, i + 1, r.get("request_id"), r.get("instance_id"),
                  r.get("objective"), r.get("new_label"), r.get("instance_key"))
                 for i, r in enumerate(rows)],
            )

    def set_state(self, batch_id: str, state: str, version: int | None = None,
                  reason: str | None = None, report: dict[str, Any] | None = None,
                  promotion: tuple[int, int | None, str] | None = None) -> None:
        """Finish a batch (and record the promotion that went with it) atomically."""
        with self.transaction() as db:
            db.execute(
                "UPDATE batches SET state=?, version=?, reason=?, report=?, updated=? "
                "WHERE batch_id=? AND state='pending'",
                (state, version, reason, json.dumps(report) if report is not None else None,
                 time.time(), batch_id),
            )
            if promotion is not None:
                self._promote(db, *promotion, note=batch_id)
            fault("in:record_batch")

    def accept_attempt(self, batch_ids: list[str], attempt: dict[str, Any]) -> None:
        """The first write of a release: before anything is registered for ``batch_ids``, the
        attempt (what, onto which version) joins each batch's report, in one transaction. A
        ledger that cannot be written raises LedgerError here, so no model version exists
        that the ledger does not know. With no batches (a new base model) it only proves
        that the ledger takes writes."""
        now = time.time()
        with self.transaction() as db:
            db.execute("UPDATE batches SET updated=updated WHERE 0")  # a write, even with none
            for batch_id in batch_ids:
                row = db.execute("SELECT report FROM batches WHERE batch_id=?",
                                 (batch_id,)).fetchone()
                if row is None:
                    continue
                report = json.loads(row[0]) if row[0] else {}
                attempts = list(report.get("attempts") or [])[-9:]  # the last ten are kept
                report["attempts"] = [*attempts, {**attempt, "at": now}]
                db.execute("UPDATE batches SET report=? WHERE batch_id=?",
                           (json.dumps(report), batch_id))

    def batch(self, batch_id: str) -> Batch | None:
        row = self.db.execute("SELECT * FROM batches WHERE batch_id=?", (batch_id,)).fetchone()
        return _batch(row) if row else None

    def batches(self, state: str | None = None) -> list[Batch]:
        sql, args = "SELECT * FROM batches", tuple[str, ...]()
        if state:
            sql, args = sql + " WHERE state=?", (state,)
        return [_batch(r) for r in self.db.execute(sql + " ORDER BY seq", args)]

    def requests(self, batch_id: str | None = None) -> list[dict[str, Any]]:
        sql = ("SELECT r.*, b.state, b.version, b.reason FROM requests r "
               "JOIN batches b USING (batch_id)")
        args: tuple = ()
        if batch_id:
            sql, args = sql + " WHERE r.batch_id=?", (batch_id,)
        return [dict(r) for r in self.db.execute(sql + " ORDER BY b.seq, r.row", args)]

    def same_batch(self, rows: list[dict[str, Any]]) -> Batch | None:
        """A pending or done batch holding exactly ``rows`` (a resubmitted manifest), or None."""
        if not rows:
            return None
        want = [(r.get("request_id"), r.get("instance_id"), r.get("objective"),
                 r.get("new_label")) for r in rows]
        candidates = self.db.execute(
            "SELECT DISTINCT r.batch_id FROM requests r JOIN batches b USING (batch_id) "
            "WHERE b.state IN ('pending', 'done') AND b.rows=? AND r.row=1 AND r.request_id IS ?",
            (len(rows), want[0][0])).fetchall()
        for (batch_id,) in candidates:
            have = [(r["request_id"], r["instance_id"], r["objective"], r["new_label"])
                    for r in self.db.execute("SELECT * FROM requests WHERE batch_id=? "
                                             "ORDER BY row", (batch_id,))]
            if have == want:
                return self.batch(batch_id)
        return None

    def claimed_instances(self, exclude_batch: str | None = None) -> set[int]:
        """Instance ids deleted (done) or awaiting deletion (pending) in other batches."""
        rows = self.db.execute(
            "SELECT r.instance_id FROM requests r JOIN batches b USING (batch_id) "
            "WHERE b.state IN ('pending', 'done') AND b.batch_id IS NOT ?", (exclude_batch,))
        return {int(r[0]) for r in rows if r[0] is not None}

    def claimed_request_ids(self, exclude_batch: str | None = None) -> set[str]:
        rows = self.db.execute(
            "SELECT r.request_id FROM requests r JOIN batches b USING (batch_id) "
            "WHERE b.state IN ('pending', 'done') AND b.batch_id IS NOT ?", (exclude_batch,))
        return {str(r[0]) for r in rows if r[0] is not None}

    # -- releases and promotions ------------------------------------------------------------

    def add_release(self, version: int, parent: int | None, batches: list[str],
                    passed: bool, built_with: dict[str, Any] | None = None) -> None:
        """``built_with``: the method and params that built it ({method, params}; None for a
        base model), so ``dvc repro`` rebuilds an escalated release the way it was built."""
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO releases (version, parent, batches, passed, "
                       "created, built_with) VALUES (?, ?, ?, ?, ?, ?)",
                       (version, parent, json.dumps(batches), int(passed), time.time(),
                        json.dumps(built_with, sort_keys=True) if built_with else None))

    def release(self, version: int) -> dict[str, Any] | None:
        row = self.db.execute("SELECT * FROM releases WHERE version=?", (version,)).fetchone()
        if row is None:
            return None
        return {**dict(row), "batches": json.loads(row["batches"]), "passed": bool(row["passed"]),
                "built_with": json.loads(row["built_with"]) if row["built_with"] else None}

    def releases(self) -> list[dict[str, Any]]:
        """Every recorded release, oldest first (what ``data/releases.json`` mirrors)."""
        rows = self.db.execute("SELECT version FROM releases ORDER BY version").fetchall()
        return [r for r in (self.release(int(row[0])) for row in rows) if r is not None]

    def covered_batches(self, version: int) -> list[str]:
        """Batches applied in the lineage of ``version`` (its own and all its ancestors')."""
        out: list[str] = []
        seen: set[int] = set()
        current: int | None = version
        while current is not None and current not in seen:
            seen.add(current)
            rel = self.release(current)
            if rel is None:
                break
            out = rel["batches"] + out
            current = rel["parent"]
        return out

    def record_promotion(self, version: int, previous: int | None, action: str,
                         note: str | None = None) -> None:
        with self.transaction() as db:
            self._promote(db, version, previous, action, note)

    @staticmethod
    def _promote(db: Any, version: int, previous: int | None, action: str,
                 note: str | None = None) -> None:
        db.execute("INSERT INTO promotions (version, previous, action, note, at) "
                   "VALUES (?, ?, ?, ?, ?)", (version, previous, action, note, time.time()))

    def promotions(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.db.execute("SELECT * FROM promotions ORDER BY seq")]


MAX_STORED_CHARS = 256  # a refused value is stored cut to this (accepted ids hold at most 128)


def _bounded(value: Any) -> Any:
    """A refused text value as stored: cut to MAX_STORED_CHARS, lone surrogates (which UTF-8
    cannot hold) escaped."""
    if not isinstance(value, str):
        return value
    if len(value) > MAX_STORED_CHARS:
        value = value[: MAX_STORED_CHARS - 1] + "…"
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


def _batch(row: Any) -> Batch:
    d = dict(row)
    d["report"] = json.loads(d["report"]) if d["report"] else None
    return Batch(**d)
