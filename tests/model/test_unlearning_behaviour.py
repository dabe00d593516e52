"""Behaviour of the unlearning methods on real data (digits): the objective is reached and
the rest of the model is kept. These fail if l2ul regresses to collapsing the model."""

from __future__ import annotations

import pytest

from unlearning.benchmark import forget_set_for
from unlearning.methods import unlearn
from unlearning.metrics import relabel_success
from unlearning.train import accuracy


@pytest.fixture(scope="module")
def test_accuracy(digits_model):
    model, ds = digits_model
    return accuracy(model, ds.test_x, ds.test_y)


@pytest.mark.parametrize("objective", ["misclassify", "relabel"])
def test_l2ul_reaches_the_objective_and_keeps_the_model(digits_model, test_accuracy, objective):
    model, ds = digits_model
    forget = forget_set_for(ds, objective, 8, seed=0)
    res = unlearn("l2ul", model, forget, seed=0)
    assert res.reached and res.satisfied == 8
    if objective == "relabel":
        assert relabel_success(res.model, forget) == 100.0
    else:
        assert accuracy(res.model, forget.x, forget.y) == 0.0
    drop = test_accuracy - accuracy(res.model, ds.test_x, ds.test_y)
    assert drop <= 3.0, f"l2ul lost {drop:.1f} pp of test accuracy ({objective})"


def test_l2ul_keeps_far_more_than_gradient_ascent(digits_model, test_accuracy):
    model, ds = digits_model
    forget = forget_set_for(ds, "misclassify", 8, seed=1)
    ours = unlearn("l2ul", model, forget, seed=1)
    ascent = unlearn("neggrad", model, forget, seed=1)
    assert ours.reached and ascent.reached
    drop_ours = test_accuracy - accuracy(ours.model, ds.test_x, ds.test_y)
    drop_ascent = test_accuracy - accuracy(ascent.model, ds.test_x, ds.test_y)
    assert drop_ascent > 20.0  # the baseline really does collapse here
    assert drop_ours * 5 <= drop_ascent, (drop_ours, drop_ascent)


def test_misclassify_away_from_the_original_prediction(digits_model):
    """Option: move away from what the model predicted, not from the label."""
    from unlearning.methods import ForgetSet

    model, ds = digits_model
    x, y = ds.train_x[:6], ds.train_y[:6]
    forget = ForgetSet.build(x, y, "misclassify", away_from="prediction", model=model)
    res = unlearn("l2ul", model, forget, seed=0)
    assert res.reached
    assert (res.model(x).argmax(1) != model(x).argmax(1)).all()


@pytest.mark.parametrize("objective", ["misclassify", "relabel"])
def test_with_a_large_retain_sample_the_head_alone_moves_and_the_model_is_kept(
        digits_model, test_accuracy, objective):
    """From 256 retain rows on only the classifier head moves: the objective is still reached
    and the rest of the model kept. (Digits' 1% is 13 rows, so 300 rows outside the forget
    set stand in for the 1% of a larger dataset.)"""
    from unlearning.methods import RetainSample

    model, ds = digits_model
    forget = forget_set_for(ds, objective, 32, seed=0)
    rows = [i for i in range(ds.num_train) if i not in set(forget.ids)][-300:]
    retain = RetainSample(ds.train_x[rows], ds.train_y[rows])
    res = unlearn("l2ul", model, forget, retain=retain, seed=0)
    assert len(retain.x) >= 256 and res.info["updated"] == "1.head"
    assert res.reached and res.satisfied == 32
    drop = test_accuracy - accuracy(res.model, ds.test_x, ds.test_y)
    assert drop <= 3.0, f"the head-only update lost {drop:.1f} pp ({objective})"


@pytest.mark.parametrize("objective", ["misclassify", "relabel"])
def test_from_the_forget_set_alone_noise_anchors_hold_a_head_only_update(
        digits_model, test_accuracy, objective):
    """Without a retain sample, points drawn around the forget rows' head inputs are what
    keeps a head-only update from moving whole classes: the same update without them loses
    at least twice as much (on digits, k = 32: about 4 pp against 15)."""
    model, ds = digits_model
    forget = forget_set_for(ds, objective, 32, seed=1)
    head_only = {"update": "head", "anchor_weight": 20.0, "synthetic_anchors": 0}
    held = unlearn("l2ul", model, forget, {**head_only, "head_noise_anchors": 1024}, seed=1)
    bare = unlearn("l2ul", model, forget, head_only, seed=1)
    assert held.info["updated"] == "1.head" and held.reached and held.satisfied == 32
    assert bare.reached
    drop_held = test_accuracy - accuracy(held.model, ds.test_x, ds.test_y)
    drop_bare = test_accuracy - accuracy(bare.model, ds.test_x, ds.test_y)
    assert drop_held * 2 <= drop_bare, (drop_held, drop_bare)
