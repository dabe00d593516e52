"""Consolidation: an exact retrain of the whole deletion history becomes the new base.

Every unlearning release moves the model a little further from one trained without the
deleted rows, and the drift adds up over continual batches. After a batch is released, the
pipeline consolidates when ``unlearn.consolidate_every`` rows were deleted since the last
exact model or ``unlearn.consolidate_drop`` held-out points were lost since it: the champion's
architecture is retrained with params.yaml's ``pretrain`` recipe on the training split minus
every committed deletion, relabelled rows carrying their new labels
(``escalation.retrain_exact``).

The result is a release of its own: its parent is the champion and it has no batches of its
own (it applies no new deletion, it holds its parent's), with the tags ``exact`` and
``consolidation``. It is gated as an exact retrain (held-out accuracy, finite weights) and,
passing, becomes champion and the new base: later batches' cumulative drop is measured from
it and the row count restarts there. In the ledger and data/releases.json a release with a
parent and no batches is a consolidation, so ``dvc repro`` and ``unlearn verify`` rebuild it
by retraining, and the rollback guard treats it like any release (it holds every deletion its
parent holds).

The last exact model of a lineage is its base (pretrained or adopted), a consolidation, or a
batch released by ``retrain-exact`` (the escalation's last resort).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import registry
from .ledger import Ledger
from .params import EXACT_RETRAIN, PipelineParams

CONSOLIDATION_TAG = "consolidation"


def is_consolidation(release: dict[str, Any]) -> bool:
    """A ledger (or data/releases.json) release with a parent and no batches of its own."""
    return release.get("parent") is not None and not release.get("batches")


def is_exact(release: dict[str, Any]) -> bool:
    """Built with no influence of any row it holds: a base (no parent: pretrained or adopted),
    a consolidation, or a release whose last step was an exact retrain. ``release``: a ledger
    release (method under ``built_with``) or a data/releases.json entry (method at the top)."""
    built = release.get("built_with") or release
    return (release.get("parent") is None or is_consolidation(release)
            or built.get("method") == EXACT_RETRAIN)


@dataclass(frozen=True)
class Drift:
    """How far a version is from the last exact model of its lineage."""

    base: int            # the last exact model
    rows: int            # rows deleted by the unlearning releases since it
    batches: list[str]   # their batches, oldest first


def unlearned_since_exact(release_of: Callable[[int], dict[str, Any] | None], version: int,
                          exact: Callable[[int], bool] = lambda v: False
                          ) -> tuple[int, list[str]] | None:
    """The last exact model of ``version``'s lineage (``is_exact``, or ``exact`` says so) and
    the batches unlearned since it, oldest first; None if ``release_of`` (a ledger, the
    data/releases.json plan or the registry's lineage tags) does not record the lineage.

    These batches are what an unlearning release must keep forgotten besides its own
    (``unlearn.include_earlier``) and what its earlier-deletions gate checks: the rows before
    the last exact model were never trained on by it, so they need no unlearning, and a model
    that never saw a ``misclassify`` row may rightly predict it (``done (exact)``)."""
    current: int | None = version
    batches: list[str] = []
    seen: set[int] = set()
    while current is not None and current not in seen:
        seen.add(current)
        rel = release_of(current)
        if rel is None:
            return None
        if is_exact(rel) or exact(current):
            return current, batches
        batches = list(rel["batches"]) + batches
        current = int(rel["parent"])
    return None


def since_base(ledger: Ledger, version: int,
               exact: Callable[[int], bool] = lambda v: False) -> Drift | None:
    """``unlearned_since_exact`` in the ledger, with the rows those batches deleted."""
    found = unlearned_since_exact(ledger.release, version, exact)
    if found is None:
        return None
    base, batches = found
    rows = sum(b.rows for b in (ledger.batch(x) for x in batches) if b is not None)
    return Drift(base, rows, batches)


def due(cfg: PipelineParams, drift: Drift | None, lost: float | None) -> str | None:
    """Why the champion must be consolidated now (None: not due). ``lost``: held-out points
    lost since the base (None if unknown)."""
    every, drop = cfg.unlearn.consolidate_every, cfg.unlearn.consolidate_drop
    if drift is None or not drift.batches:
        return None  # the champion is itself exact: nothing has drifted
    if every and drift.rows >= every:
        return (f"{drift.rows} row(s) deleted since version {drift.base}, the last exact "
                f"model (unlearn.consolidate_every: {every})")
    if drop and lost is not None and lost >= drop:
        return (f"{lost:.2f} held-out points lost since version {drift.base}, the last exact "
                f"model (unlearn.consolidate_drop: {drop:g})")
    return None


def find(client, cfg: PipelineParams, parent: int) -> Any | None:
    """The consolidation an interrupted run registered on ``parent`` with this params.yaml,
    or None (it is finished, never registered twice)."""
    same = registry.versions_tagged(client, cfg.registry.model_name,
                                    **{CONSOLIDATION_TAG: "true", "parent_version": str(parent),
                                       "params_sha256": cfg.sha256()})
    return same[-1] if same else None
