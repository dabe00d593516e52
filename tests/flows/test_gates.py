"""Gates are a pure function from metrics and limits to a report."""

from __future__ import annotations

import pytest

from tasks.gates import check_gates
from tasks.params import GatesParams

GOOD = {"objective_rate": 100.0, "test_drop": 0.5, "earlier_objective_rate": 100.0,
        "weights_finite": 1.0}


@pytest.mark.parametrize("change, failed", [
    ({}, []),
    ({"earlier_objective_rate": None}, []),
    ({"objective_rate": 87.5}, ["objective_reached"]),
    ({"test_drop": 3.5}, ["test_drop"]),
    ({"test_drop": -1.0}, []),
    ({"earlier_objective_rate": 90.0}, ["earlier_deletions_hold"]),
    ({"weights_finite": 0.0}, ["weights_finite"]),
    ({"objective_rate": None, "test_drop": None}, ["objective_reached", "test_drop"]),
    ({"objective_rate": 0.0, "weights_finite": 0.0}, ["objective_reached", "weights_finite"]),
    ({"unseen_membership_z": None}, []),
    ({"unseen_membership_z": 2.9, "unseen_membership_auc": 0.6}, []),
    ({"unseen_membership_z": -3.0, "unseen_membership_auc": 0.4}, []),
    ({"unseen_membership_z": 5.2, "unseen_membership_auc": 0.76}, ["unseen_membership"]),
    ({"unseen_membership_z": -8.0, "unseen_membership_auc": 0.1}, ["unseen_membership"]),
])
def test_gate_table(change, failed):
    report = check_gates({**GOOD, **change}, GatesParams(max_test_drop=3.0))
    assert report.failures == failed
    assert report.passed is (not failed)
    assert set(report.to_dict()) == {"passed", "failures", "checks"}
    if failed:
        assert report.summary() != "all gates passed"


def test_finite_gate_can_be_switched_off():
    report = check_gates({**GOOD, "weights_finite": 0.0},
                         GatesParams(require_finite_weights=False))
    assert report.passed and "weights_finite" not in [c.name for c in report.checks]


def test_membership_gate_says_which_way_the_rows_give_themselves_away():
    members = check_gates({**GOOD, "unseen_membership_z": 5.2, "unseen_membership_auc": 0.76},
                          GatesParams())
    assert "look like members" in members.summary() and "0.76" in members.summary()
    damaged = check_gates({**GOOD, "unseen_membership_z": -8.0, "unseen_membership_auc": 0.1},
                          GatesParams(max_membership_z=10.0))
    assert damaged.passed
