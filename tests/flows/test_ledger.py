"""The request ledger: states, claims, lineage, promotions."""

from __future__ import annotations

import sqlite3

import pytest

from tasks.ledger import Ledger
from tasks.lineage import LineageError, guard, previous_champion, reconcile


def rows(*ids: int, prefix: str = "r") -> list[dict]:
    return [{"request_id": f"{prefix}{i}", "instance_id": i, "objective": "misclassify",
             "new_label": None} for i in ids]


def test_batches_claims_and_states(tmp_path):
    with Ledger(tmp_path / "ledger.db") as ledger:
        assert ledger.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        ledger.add_batch("b1", 1, "pending", "m1.csv", rows(1, 2))
        ledger.add_batch("b2", 2, "rejected", "m2.csv", rows(3), reason="validation: x")
        ledger.add_batch("b3", 3, "pending", "m3.csv", rows(4, prefix="s"))
        assert ledger.next_seq() == 4
        assert ledger.claimed_instances() == {1, 2, 4}  # rejected batches claim nothing
        assert ledger.claimed_instances(exclude_batch="b1") == {4}
        assert ledger.claimed_request_ids() == {"r1", "r2", "s4"}
        ledger.set_state("b1", "done", version=2, promotion=(2, 1, "promote"))
        ledger.set_state("b1", "rejected")  # only a pending batch changes state
        assert ledger.batch("b1").state == "done" and ledger.batch("b1").version == 2
        assert [b.batch_id for b in ledger.batches("pending")] == ["b3"]
        assert [(p["version"], p["previous"], p["note"]) for p in ledger.promotions()] == \
            [(2, 1, "b1")]
        assert [r["state"] for r in ledger.requests()] == ["done", "done", "rejected", "pending"]


def test_failed_transaction_changes_nothing(tmp_path):
    with Ledger(tmp_path / "ledger.db") as ledger:
        ledger.add_batch("b1", 1, "pending", "m.csv", rows(1))
        with pytest.raises(sqlite3.IntegrityError):
            ledger.add_batch("b2", 1, "pending", "m.csv", rows(2))  # duplicate seq
        assert [b.batch_id for b in ledger.batches()] == ["b1"]
        assert ledger.claimed_instances() == {1}


def test_covered_batches_follow_the_lineage(tmp_path):
    with Ledger(tmp_path / "ledger.db") as ledger:
        ledger.add_release(1, None, [], True)
        ledger.add_release(2, 1, ["b1"], True)
        ledger.add_release(3, 2, ["b2"], False)
        ledger.add_release(4, 1, ["b1", "b2"], True)  # a replay onto version 1
        assert ledger.covered_batches(1) == []
        assert ledger.covered_batches(3) == ["b1", "b2"]
        assert ledger.covered_batches(4) == ["b1", "b2"]
        assert ledger.release(3)["passed"] is False


def test_reconcile_finishes_what_a_crash_left_and_refuses_a_bad_champion(tmp_path):
    with Ledger(tmp_path / "ledger.db") as ledger:
        ledger.add_release(1, None, [], True)
        ledger.record_promotion(1, None, "pretrain")
        ledger.add_batch("b1", 1, "pending", "m.csv", rows(1))
        ledger.add_release(2, 1, ["b1"], True)  # registered and promoted, then the run died
        assert reconcile(ledger, 2) == ["b1"]
        assert ledger.batch("b1").state == "done" and ledger.batch("b1").version == 2
        assert ledger.promotions()[-1]["action"] == "reconciled"
        assert reconcile(ledger, 2) == []  # idempotent

        assert guard(ledger, 1) == (None, ["b1"])
        ledger.add_release(3, 2, ["b9"], False)
        assert "failed its gates" in guard(ledger, 3)[0]
        with pytest.raises(LineageError, match="predates committed deletion batch"):
            reconcile(ledger, 1)  # someone moved the alias back by hand
        with pytest.raises(LineageError, match="did not record"):
            reconcile(ledger, 7)
        assert previous_champion(ledger, 2) == 1
