"""The as-if-unseen objective: ceilings from held-out data, row satisfaction, who supports it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from unlearning.benchmark import forget_set_for
from unlearning.methods import ForgetSet, unlearn
from unlearning.metrics import membership_auc
from unlearning.objectives import confidence_logit, heldout_ceiling, unseen_levels
from unlearning.train import accuracy, predict_logits


def test_confidence_logit_is_the_log_odds_of_the_true_class():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    y = torch.tensor([0, 2])
    p = torch.softmax(logits, 1)[torch.arange(2), y]
    assert torch.allclose(confidence_logit(logits, y), torch.log(p / (1 - p)), atol=1e-6)


def test_ceiling_is_the_median_confidence_of_the_nearest_heldout_images(digits_model):
    model, ds = digits_model
    x, y = ds.train_x[:5], ds.train_y[:5]
    ceil = heldout_ceiling(model, x, y, (ds.test_x, ds.test_y), neighbours=10)
    phi = confidence_logit(predict_logits(model, ds.test_x), ds.test_y)
    for i in range(5):
        same = (ds.test_y == y[i]).nonzero().squeeze(1)
        d = (ds.test_x[same].flatten(1) - x[i].flatten()).pow(2).sum(1)
        near = same[d.argsort()[:10]]
        assert torch.isclose(ceil[i], phi[near].quantile(0.5))
    assert torch.isfinite(ceil).all()


def test_build_needs_the_model_and_heldout_data(digits_model):
    model, ds = digits_model
    x, y = ds.train_x[:4], ds.train_y[:4]
    with pytest.raises(ValueError, match="held-out"):
        ForgetSet.build(x, y, "as-if-unseen")
    with pytest.raises(ValueError, match="unseen_quantile"):
        ForgetSet.build(x, y, "as-if-unseen", model=model, heldout=(ds.test_x, ds.test_y),
                        unseen_quantile=0.0)


def test_a_batch_holds_when_its_mean_held_out_rank_is_near_its_mean_level(digits_model):
    from unlearning.objectives import class_ranks, unseen_holds

    model, ds = digits_model
    unseen = forget_set_for(ds, "as-if-unseen", 8, seed=0, model=model)
    ref_x, ref_y = unseen.reference
    rank = class_ranks(confidence_logit(predict_logits(model, unseen.x), unseen.y), unseen.y,
                       confidence_logit(predict_logits(model, ref_x), ref_y), ref_y)
    held = unseen_holds(rank, unseen.level)
    assert held == bool(rank.mean() <= unseen.level.mean() + (1 / (12 * 8)) ** 0.5)
    assert unseen.satisfied_by(model).tolist() == [held] * 8
    mis = forget_set_for(ds, "misclassify", 4, seed=1)
    both = ForgetSet.concat([mis, unseen])
    assert both.ceiling is not None and torch.isinf(both.ceiling[:4]).all()
    assert torch.equal(both.subset(torch.arange(4, 12)).ceiling, unseen.ceiling)
    assert torch.equal(both.satisfied_by(model)[4:], unseen.satisfied_by(model))


def test_batches_are_judged_apart_so_an_old_one_cannot_cover_a_new_one(digits_model):
    model, ds = digits_model
    x, y = ds.train_x[:8], ds.train_y[:8]
    heldout = (ds.test_x, ds.test_y)
    old = ForgetSet.build(x[:4], y[:4], "as-if-unseen", model=model, heldout=heldout)
    new = ForgetSet.build(x[4:], y[4:], "as-if-unseen", model=model, heldout=heldout)
    # the old batch may sit at the top of its classes, the new one must sit at the bottom
    old = dataclasses.replace(old, level=torch.full((4,), 0.99))
    new = dataclasses.replace(new, level=torch.full((4,), 0.01))
    both = ForgetSet.concat([old, new])
    assert both.batch.tolist() == [0] * 4 + [1] * 4
    assert both.satisfied_by(model).tolist() == [True] * 4 + [False] * 4
    again = ForgetSet.concat([both, new])  # nested concatenation keeps them apart too
    assert again.batch.tolist() == [0] * 4 + [1] * 4 + [2] * 4


def test_methods_without_the_objective_refuse_it(digits_model):
    model, ds = digits_model
    forget = forget_set_for(ds, "as-if-unseen", 4, seed=0, model=model)
    with pytest.raises(ValueError, match="as-if-unseen"):
        unlearn("neggrad", model, forget)


def test_l2ul_brings_confidence_down_to_a_strict_ceiling_and_keeps_the_model(digits_model):
    """A low quantile forces real work: the rows must end on average at most as confident
    as the third least confident of their ten nearest held-out digits."""
    model, ds = digits_model
    ids = list(range(6))
    forget = ForgetSet.build(ds.train_x[ids], ds.train_y[ids], "as-if-unseen", model=model,
                             heldout=(ds.test_x, ds.test_y), unseen_quantile=0.3, ids=ids)
    assert not bool(forget.satisfied_by(model).all())
    res = unlearn("l2ul", model, forget, seed=0)
    assert res.reached
    drop = accuracy(model, ds.test_x, ds.test_y) - accuracy(res.model, ds.test_x, ds.test_y)
    assert drop <= 3.0, drop


@pytest.fixture(scope="module")
def memorising_digits(digits_model):
    """A model that fits 300 digits exactly (40 epochs): membership is detectable."""
    from unlearning.models import build_model, spec_for
    from unlearning.train import TrainConfig, train_classifier

    _, ds = digits_model
    torch.manual_seed(0)
    model = build_model(spec_for("small-cnn", ds))
    train_classifier(model, ds.train_x[:300], ds.train_y[:300], TrainConfig(epochs=40, seed=0))
    return model.eval(), ds


def test_membership_auc_tells_members_from_unseen_rows(memorising_digits):
    model, ds = memorising_digits
    heldout = (ds.test_x, ds.test_y)
    auc, z = membership_auc(model, (ds.train_x[:32], ds.train_y[:32]), heldout)
    assert auc > 0.65 and z > 3.0  # the gate would refuse these rows as they are
    auc, z = membership_auc(model, (ds.train_x[300:364], ds.train_y[300:364]), heldout)
    assert abs(auc - 0.5) < 0.1 and abs(z) < 3.0  # never trained on: chance


def test_as_if_unseen_passes_the_membership_gate_where_misclassify_fails(memorising_digits):
    model, ds = memorising_digits
    heldout = (ds.test_x, ds.test_y)
    x, y = ds.train_x[:32], ds.train_y[:32]
    unseen = ForgetSet.build(x, y, "as-if-unseen", model=model, heldout=heldout)
    res = unlearn("l2ul", model, unseen, seed=0)
    assert res.reached
    _, z_unseen = membership_auc(res.model, (x, y), heldout)
    assert abs(z_unseen) <= 3.0
    res = unlearn("l2ul", model, ForgetSet.build(x, y, "misclassify"), seed=0)
    _, z_wrong = membership_auc(res.model, (x, y), heldout)
    assert z_wrong < -3.0  # deliberately wrong rows give the deletion away


def test_levels_follow_typicality_and_average_one_half(digits_model):
    model, ds = digits_model
    x, y = ds.train_x[:40], ds.train_y[:40]
    levels = unseen_levels(model, x, y, (ds.test_x, ds.test_y))
    typical = heldout_ceiling(model, x, y, (ds.test_x, ds.test_y))
    assert ((levels > 0) & (levels < 1)).all()
    assert abs(levels.mean().item() - 0.5) < 0.01  # a batch is a draw like held-out data
    for c in y.unique():
        rows = (y == c).nonzero().squeeze(1)
        order = typical[rows].argsort()
        assert (levels[rows][order].diff() >= -1e-6).all()  # more typical, higher level


def test_ceilings_are_held_out_quantiles_fixed_at_deletion_time(digits_model):
    model, ds = digits_model
    heldout = (ds.test_x, ds.test_y)
    x, y = ds.train_x[:6], ds.train_y[:6]
    fs = ForgetSet.build(x, y, ["as-if-unseen"] * 3 + ["misclassify"] * 3, model=model,
                         heldout=heldout)
    assert fs.ceiling[3:].isinf().all() and fs.ceiling[:3].isfinite().all()
    phi = confidence_logit(predict_logits(model, ds.test_x), ds.test_y)
    levels = unseen_levels(model, x[:3], y[:3], heldout)
    for i in range(3):
        assert torch.isclose(fs.ceiling[i], phi[ds.test_y == y[i]].quantile(levels[i]))
    other = ForgetSet.build(ds.train_x[6:8], ds.train_y[6:8], "relabel",
                            [int(ds.train_y[6] + 1) % 10, int(ds.train_y[7] + 1) % 10])
    both = ForgetSet.concat([fs, other])
    assert torch.equal(both.ceiling[:6], fs.ceiling) and both.ceiling[6:].isinf().all()


def test_report_rows_show_the_confidence_each_unseen_row_may_keep(digits_model):
    from tasks.report import forget_rows

    model, ds = digits_model
    fs = ForgetSet.build(ds.train_x[:4], ds.train_y[:4], ["as-if-unseen"] * 2 + ["misclassify"] * 2,
                         model=model, heldout=(ds.test_x, ds.test_y))
    requests = [{"request_id": f"r{i}", "instance_id": i, "objective": o, "new_label": None}
                for i, o in enumerate(["as-if-unseen"] * 2 + ["misclassify"] * 2)]
    rows = forget_rows(model, model, fs, requests)
    held = bool(fs.satisfied_by(model)[0])
    for row, phi in zip(rows[:2], fs.ceiling[:2]):
        assert row["ceiling_conf"] == pytest.approx(float(torch.sigmoid(phi)))
        assert row["objective_met"] is held  # the batch's rows hold together
    assert [r["ceiling_conf"] for r in rows[2:]] == [None, None]
