"""The request ledger: deletion batches, their requests, releases and promotions (SQLite, WAL).

A batch is ``pending`` (accepted, not applied yet), ``done`` (its deletion is in the champion
lineage; ``version`` names the release that applied it) or ``rejected`` (with a reason and a
report). Every state change is one transaction, so a failure leaves a batch pending or
rejected, never half-done. MLflow keeps no alias history, so promotions are recorded here
(rollback reads them), together with each release's parent and the batches it applied.
"""

from __future__ import annotations

import json
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
    created REAL NOT NULL
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


EXPECTED_COLUMNS = {
    "batches": {"batch_id", "seq", "state", "source", "rows", "submitted", "updated", "version",
                "reason", "report"},
    "requests": {"batch_id", "row", "request_id", "instance_id", "objective", "new_label"},
    "releases": {"version", "parent", "batches", "passed", "created"},
    "promotions": {"seq", "version", "previous", "action", "note", "at"},
}


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
    """A thin wrapper over one SQLite file; open per command, close when done."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
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
            # instance keys came later: a ledger from before gets the column (NULL: by id)
            if "instance_key" not in {r[1] for r in self.db.execute("PRAGMA table_info(requests)")}:
                self.db.execute("ALTER TABLE requests ADD COLUMN instance_key TEXT")
        except sqlite3.Error as e:
            self.db.close()
            raise LedgerError(f"the ledger {self.path} is damaged or not a ledger ({e}); "
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
                    passed: bool) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO releases VALUES (?, ?, ?, ?, ?)",
                       (version, parent, json.dumps(batches), int(passed), time.time()))

    def release(self, version: int) -> dict[str, Any] | None:
        row = self.db.execute("SELECT * FROM releases WHERE version=?", (version,)).fetchone()
        if row is None:
            return None
        return {**dict(row), "batches": json.loads(row["batches"]), "passed": bool(row["passed"])}

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
    def _promote(db: sqlite3.Connection, version: int, previous: int | None, action: str,
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


def _batch(row: sqlite3.Row) -> Batch:
    d = dict(row)
    d["report"] = json.loads(d["report"]) if d["report"] else None
    return Batch(**d)
