"""Which deletions a release holds, and the guards built on that (pure ledger reads).

A release's lineage is its chain of parents in the ledger; the batches it holds are the
batches applied along that chain. A version may serve as champion only if it passed its
gates and holds every committed (``done``) batch: otherwise deleted data would come back.
"""

from __future__ import annotations

from .ledger import Ledger


class LineageError(RuntimeError):
    """The registry's champion is not a release this ledger can vouch for."""


def guard(ledger: Ledger, version: int) -> tuple[str | None, list[str]]:
    """Why ``version`` cannot serve (None if it can), and the committed batches it lacks."""
    rel = ledger.release(version)
    if rel is None:
        return f"version {version} is not a release of this pipeline", []
    if not rel["passed"]:
        return f"version {version} failed its gates (kept for audit only)", []
    covered = set(ledger.covered_batches(version))
    return None, [b.batch_id for b in ledger.batches("done") if b.batch_id not in covered]


def missing_reason(ledger: Ledger, version: int, missing: list[str], remedy: str) -> str:
    """The refusal: which committed batches ``version`` lacks, and what to do instead."""
    n = sum(b.rows for b in ledger.batches("done") if b.batch_id in missing)
    return (f"version {version} predates committed deletion batch(es) {', '.join(missing)} "
            f"({n} instance(s)); serving it would bring deleted data back. {remedy}")


def previous_champion(ledger: Ledger, champion: int) -> int | None:
    """The version that was champion before ``champion`` took over (promotion history)."""
    for row in reversed(ledger.promotions()):
        if row["version"] == champion and row["previous"] not in (None, champion):
            return int(row["previous"])
    return None


def reconcile(ledger: Ledger, champion: int) -> list[str]:
    """Bring the ledger in line with the registry's champion before a run.

    Batches the champion already holds but the ledger still calls pending (a run that died
    between moving the alias and writing the ledger) are marked done; a champion the ledger
    never recorded, or one that lacks a committed deletion, is refused. Returns the batches
    it finished.
    """
    if ledger.release(champion) is None:
        raise LineageError(f"the champion alias points to version {champion}, which this "
                           "pipeline did not record; point it at a recorded version with "
                           "`unlearn promote`")
    finished = []
    version: int | None = champion
    while version is not None:
        rel = ledger.release(version)
        if rel is None:
            break
        for batch_id in rel["batches"]:
            batch = ledger.batch(batch_id)
            if batch is not None and batch.state == "pending":
                ledger.set_state(batch_id, "done", version=version, reason="reconciled")
                finished.append(batch_id)
        version = rel["parent"]
    why, missing = guard(ledger, champion)
    if why is None and missing:
        why = missing_reason(ledger, champion, missing, "Promote a version that holds them, or "
                             "`unlearn rollback --to VERSION --reapply`")
    if why:
        raise LineageError(f"the champion cannot take new batches: {why}")
    history = ledger.promotions()
    if not history or history[-1]["version"] != champion:
        note = (f"finished {', '.join(finished)} after an interrupted run" if finished
                else "champion alias moved outside the pipeline")
        ledger.record_promotion(champion, history[-1]["version"] if history else None,
                                "reconciled", note=note)
    return finished
