"""Release gates: a pure function from a candidate's metrics and the limits to a report."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .params import GatesParams


@dataclass(frozen=True)
class GateCheck:
    name: str
    passed: bool
    value: float | None
    limit: float | None
    detail: str


@dataclass(frozen=True)
class GateReport:
    passed: bool
    checks: list[GateCheck] = field(default_factory=list)

    @property
    def failures(self) -> list[str]:
        return [c.name for c in self.checks if not c.passed]

    def summary(self) -> str:
        if self.passed:
            return "all gates passed"
        return "; ".join(c.detail for c in self.checks if not c.passed)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "failures": self.failures,
                "checks": [asdict(c) for c in self.checks]}


def check_gates(metrics: dict[str, Any], gates: GatesParams) -> GateReport:
    """Check a candidate against the gates of ``params.yaml``.

    Args:
        metrics: ``evaluate_unlearning`` output (percent): objective_rate, test_drop,
            earlier_objective_rate (None when nothing was deleted before), weights_finite,
            unseen_membership_z / _auc (None or absent without as-if-unseen rows).
        gates: the limits.

    Returns:
        A report with one check per gate; ``passed`` only if every check passed.
    """
    checks = []

    def at_least(name: str, value: float | None, limit: float, what: str) -> None:
        ok = value is not None and value >= limit
        checks.append(GateCheck(name, ok, value, limit,
                                f"{what} {_fmt(value)} < required {limit:g}" if not ok else
                                f"{what} {_fmt(value)} >= {limit:g}"))

    at_least("objective_reached", metrics.get("objective_rate"), gates.min_objective_rate,
             "objective rate on this batch")
    drop = metrics.get("test_drop")
    ok = drop is not None and drop <= gates.max_test_drop
    checks.append(GateCheck("test_drop", ok, drop, gates.max_test_drop,
                            f"held-out accuracy drop {_fmt(drop)} "
                            f"{'<=' if ok else '> allowed'} {gates.max_test_drop:g} points"))
    earlier = metrics.get("earlier_objective_rate")
    if earlier is None:  # nothing deleted before this batch
        checks.append(GateCheck("earlier_deletions_hold", True, None,
                                gates.min_earlier_objective_rate, "no earlier deletions"))
    else:
        at_least("earlier_deletions_hold", earlier, gates.min_earlier_objective_rate,
                 "objective rate on earlier deletions")
    cumulative = metrics.get("cumulative_drop")
    if cumulative is not None or "base_test_acc" in metrics:  # None: no base known (a rebuild)
        ok = cumulative is not None and cumulative <= gates.max_cumulative_drop
        checks.append(GateCheck(
            "cumulative_drop", ok, cumulative, gates.max_cumulative_drop,
            f"held-out accuracy drop since the base model (version "
            f"{metrics.get('base_version', '?')}) {_fmt(cumulative)} "
            f"{'<=' if ok else '> allowed'} {gates.max_cumulative_drop:g} points"))
    z = metrics.get("unseen_membership_z")
    if z is not None:  # only batches with as-if-unseen rows carry it
        ok = abs(z) <= gates.max_membership_z
        auc = metrics.get("unseen_membership_auc")
        side = "members" if z > 0 else "deliberately damaged"
        checks.append(GateCheck(
            "unseen_membership", ok, z, gates.max_membership_z,
            f"as-if-unseen rows: membership AUC {_fmt(auc)}, {abs(z):.1f} standard errors "
            f"from chance " + (f"<= {gates.max_membership_z:g}" if ok else
                               f"> allowed {gates.max_membership_z:g} (they look like {side})")))
    finite = bool(metrics.get("weights_finite"))
    if gates.require_finite_weights:
        checks.append(GateCheck("weights_finite", finite, float(finite), 1.0,
                                "weights are finite" if finite else "weights contain NaN/inf"))
    return GateReport(all(c.passed for c in checks), checks)


def check_base_gates(metrics: dict[str, Any], gates: GatesParams) -> GateReport:
    """The gates of a base model (pretrained or adopted: the last exact model, which every
    release's cumulative drop is measured against): finite weights (``weights_finite``) and
    held-out accuracy (``test_acc``, percent) of at least ``gates.min_base_accuracy``."""
    checks = []
    if gates.require_finite_weights:
        finite = bool(metrics.get("weights_finite"))
        checks.append(GateCheck("weights_finite", finite, float(finite), 1.0,
                                "weights are finite" if finite else "weights contain NaN/inf"))
    acc = metrics.get("test_acc")
    ok = acc is not None and acc >= gates.min_base_accuracy
    checks.append(GateCheck("base_accuracy", ok, acc, gates.min_base_accuracy,
                            f"held-out accuracy {_fmt(acc)}% "
                            + (f">= {gates.min_base_accuracy:g}" if ok else
                               f"< required {gates.min_base_accuracy:g} "
                               "(gates.min_base_accuracy)")))
    return GateReport(all(c.passed for c in checks), checks)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"
