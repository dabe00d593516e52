"""Deletion requests as obligations: a request is ``done`` only when a champion satisfies it.

Status of a request, from its batch in the ledger:

* ``done``: its batch was released and promoted (``done (exact)`` when by exact retraining);
* ``open``: accepted and not yet honoured: pending, or every release attempt failed its
  gates (the batch is ``rejected`` with a ``gates: ...`` reason). An open request has an age,
  the time since it was submitted; ``unlearn retry BATCH`` re-queues it;
* ``invalid``: the batch was rejected at validation (bad input, the rule named in its
  reason): nothing to honour until a corrected manifest is submitted;
* ``resubmitted (BATCH)``: its batch's release failed, and the instance was submitted again
  in BATCH, which carries the obligation now.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from .ledger import Batch, Ledger

DAY = 86400.0


def status_of(batch: Batch) -> str:
    if batch.state == "done":
        return "done (exact)" if (batch.report or {}).get("exact") else "done"
    if batch.state == "pending":
        return "open"
    return "open" if (batch.reason or "").startswith("gates:") else "invalid"


def attempts_of(batch: Batch) -> list[dict[str, Any]]:
    """Every release attempt of the batch (version, method, passed, failing gates with their
    values), as the pipeline recorded them."""
    return list((batch.report or {}).get("escalation") or [])


def listing(ledger: Ledger, now: float | None = None,
            overdue_days: float | None = None) -> dict[str, Any]:
    """``{"batches", "requests", "open"}``: every batch and request with its status, and the
    open obligations (at least ``overdue_days`` old, when given), oldest first."""
    now = time.time() if now is None else now
    batches = {b.batch_id: b for b in ledger.batches()}
    out_batches = [{**b.to_dict(), "status": status_of(b), "attempts": attempts_of(b)}
                   for b in batches.values()]
    # a failed batch whose instances were all submitted again: that batch carries them now
    claimed: dict[int, str] = {}
    for r in ledger.requests():
        if batches[r["batch_id"]].state in ("pending", "done") and r["instance_id"] is not None:
            claimed[int(r["instance_id"])] = r["batch_id"]
    requests = []
    for r in ledger.requests():
        b = batches[r["batch_id"]]
        status = status_of(b)
        if status == "open" and b.state == "rejected" and r["instance_id"] in claimed:
            status = f"resubmitted ({claimed[r['instance_id']]})"
        age = (now - b.submitted) / DAY
        requests.append({**r, "status": status, "_age": age,
                         "submitted": datetime.fromtimestamp(b.submitted, UTC).isoformat(
                             timespec="seconds"),
                         "age_days": round(age, 6) if status == "open" else None,
                         "open_because": (None if status != "open" else
                                          "pending" if b.state == "pending" else
                                          "every release attempt failed its gates")})
    open_ = [r for r in requests if r["status"] == "open"
             and (overdue_days is None or r["_age"] >= overdue_days)]
    open_.sort(key=lambda r: -r["_age"])
    for r in requests:
        del r["_age"]
    return {"batches": out_batches, "requests": requests, "open": open_}
