"""The run's validation reuses the submit's answer only on the same digest: every input of
the suites changes it, and claims on other instances do not."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tasks.params import load_params
from tasks.submit import revalidation_digest
from tasks.validation import ValidationContext

ROWS = [{"request_id": "r1", "instance_id": 5, "instance_key": None,
         "objective": "misclassify", "new_label": None},
        {"request_id": "r2", "instance_id": 9, "instance_key": None,
         "objective": "relabel", "new_label": 3}]


@pytest.fixture(scope="module")
def cfg():
    return load_params(Path(__file__).resolve().parents[2] / "params.yaml")


@pytest.fixture(scope="module")
def ctx(cfg) -> ValidationContext:
    from tasks.release import dataset_of

    digits = dataset_of(cfg)
    return ValidationContext(
        num_train=digits.num_train, num_classes=digits.num_classes,
        train_labels=digits.train_y.tolist(), image_shape=(1, 8, 8), max_batch_size=256,
        claimed_instances=frozenset({7, 70, 700}), claimed_request_ids=frozenset({"old-1"}))


def test_the_same_inputs_give_the_same_digest(cfg, ctx):
    shuffled = dataclasses.replace(ctx, claimed_instances=frozenset([700, 7, 70]))
    assert revalidation_digest(ROWS, ctx, cfg) == revalidation_digest(
        [dict(r) for r in ROWS], shuffled, cfg)


@pytest.mark.parametrize("change", [
    {"max_batch_size": 1},
    {"image_shape": (3, 8, 8)},
    {"claimed_instances": frozenset({7, 70, 700, 9})},  # one of the batch's instances
    {"claimed_request_ids": frozenset({"old-1", "r1"})},  # one of its request ids
    {"supported_objectives": ("misclassify",)},
    {"train_keys": {"a.png": 5}},
    {"num_classes": 11},
])
def test_every_input_of_the_suites_changes_the_digest(cfg, ctx, change):
    assert revalidation_digest(ROWS, dataclasses.replace(ctx, **change), cfg) != \
        revalidation_digest(ROWS, ctx, cfg)


def test_claims_on_other_instances_leave_the_digest_unchanged(cfg, ctx):
    """A batch submitted later claims other instances: the earlier batch's rules answer the
    same (none of its ids or request ids is claimed), so its run reuses the submit's."""
    later = dataclasses.replace(ctx, claimed_instances=ctx.claimed_instances | {11, 12},
                                claimed_request_ids=ctx.claimed_request_ids | {"later-1"})
    assert revalidation_digest(ROWS, later, cfg) == revalidation_digest(ROWS, ctx, cfg)


@pytest.mark.parametrize("row", [
    {"new_label": 4},  # another label for the relabel row
    {"instance_id": 10},  # another instance, other images
    {"request_id": "r3"},
    {"objective": "misclassify", "new_label": None},
])
def test_every_cell_of_the_rows_changes_the_digest(cfg, ctx, row):
    changed = [ROWS[0], {**ROWS[1], **row}]
    assert revalidation_digest(changed, ctx, cfg) != revalidation_digest(ROWS, ctx, cfg)
