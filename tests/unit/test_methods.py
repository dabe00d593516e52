"""The method registry, configs, forget sets, bounded loops and determinism."""

from __future__ import annotations

import pytest
import torch

from unlearning.benchmark import forget_set_for, retrain_grad_examples, variants_for
from unlearning.methods import (
    ForgetSet,
    RetainSample,
    list_methods,
    make_config,
    prepare,
    setup_settings,
    unlearn,
)
from unlearning.methods.l2ul import margin_loss, model_anchors, shifted_copies, stalled
from unlearning.models import weights_sha256
from unlearning.train import TrainConfig


def test_registry_lists_the_methods_and_refuses_unknown_names():
    assert {"neggrad", "random-label", "l2ul-reference", "l2ul"} <= set(list_methods())
    with pytest.raises(KeyError, match="unknown method"):
        make_config("delete-everything")
    with pytest.raises(KeyError):
        variants_for(["nope"])


def test_configs_refuse_unknown_keys_and_wrong_types():
    assert make_config("l2ul", {"lr": 1}).lr == 1.0  # int accepted for a float
    with pytest.raises(ValueError, match="unknown parameter"):
        make_config("l2ul", {"learning_rate": 0.1})
    with pytest.raises(ValueError, match="must be int"):
        make_config("neggrad", {"max_steps": "10"})
    with pytest.raises(ValueError, match="must be bool"):
        make_config("l2ul", {"freeze_bn": 1})


def test_forget_set_rules():
    x, y = torch.rand(3, 1, 8, 8), torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match="empty"):
        ForgetSet.build(x[:0], y[:0], "misclassify")
    with pytest.raises(ValueError, match="equals the current label"):
        ForgetSet.build(x, y, "relabel", [1, 0, 0], num_classes=10)
    with pytest.raises(ValueError, match="only allowed for relabel"):
        ForgetSet.build(x, y, "misclassify", [4, None, None])
    with pytest.raises(ValueError, match="in range"):
        ForgetSet.build(x, y, "relabel", [4, 5, 10], num_classes=10)
    fs = ForgetSet.build(x, y, ["relabel", "misclassify", "misclassify"], [4, None, None],
                         num_classes=10)
    logits = torch.zeros(3, 10)
    logits[0, 4] = logits[1, 2] = logits[2, 0] = 1.0
    assert fs.satisfied(logits).tolist() == [True, False, True]


@pytest.mark.parametrize("method", ["neggrad", "random-label", "l2ul-reference", "l2ul"])
def test_every_loop_is_bounded_and_the_parent_is_untouched(digits_model, method):
    model, ds = digits_model
    before = weights_sha256(model)
    forget = forget_set_for(ds, "misclassify", 8, seed=0)
    params = {"max_steps": 3}
    if method == "l2ul-reference":
        params.update(pgd_steps=2, adv_per_instance=2)
    res = unlearn(method, model, forget, params, seed=0)
    assert res.steps <= 3
    assert weights_sha256(model) == before


def test_unlearning_is_deterministic_for_a_seed(digits_model):
    model, ds = digits_model
    forget = forget_set_for(ds, "relabel", 8, seed=1)
    params = {"max_steps": 20, "synthesis_steps": 5}
    a = unlearn("l2ul", model, forget, params, seed=7)
    b = unlearn("l2ul", model, forget, params, seed=7)
    assert weights_sha256(a.model) == weights_sha256(b.model)


def test_the_cost_is_counted_in_example_gradients(digits_model):
    """Every example a method backpropagates counts once, the set-up's too; forward-only
    passes (objective checks, teacher labels) are counted apart."""
    model, ds = digits_model
    forget = forget_set_for(ds, "misclassify", 8, seed=0)
    neg = unlearn("neggrad", model, forget, {"max_steps": 5}, seed=0)
    assert neg.grad_examples == neg.steps * len(forget)
    assert neg.forward_examples >= neg.steps * len(forget)  # the objective after each step
    params = {"max_steps": 6, "synthesis_steps": 5}
    fresh = unlearn("l2ul", model, forget, params, seed=0)
    kept = unlearn("l2ul", model, forget, params, seed=0,
                   prepared=prepare("l2ul", model, forget, params, seed=0))
    assert kept.grad_examples == kept.steps * (len(forget) + make_config("l2ul").anchor_batch)
    # the set-up (importance, adversarial examples, BN inversion of 256 anchors) on top
    assert fresh.grad_examples - kept.grad_examples >= 256 * 5
    assert retrain_grad_examples(1000, TrainConfig(epochs=3)) == 3000


def test_with_a_retain_sample_real_rows_replace_the_synthetic_anchors(digits_model):
    """No BatchNorm inversion in the set-up, and each step sees retain_anchor_batch anchors
    and as many retain rows; the set-up prepared for a retain run is the one it would make."""
    model, ds = digits_model
    forget = forget_set_for(ds, "misclassify", 8, seed=0)
    retain = RetainSample(ds.train_x[-100:], ds.train_y[-100:])
    params = {"max_steps": 6, "synthesis_steps": 5, "retain_anchor_batch": 24,
              "retain_update": "all"}
    with_retain = unlearn("l2ul", model, forget, params, retain=retain, seed=0)
    without = unlearn("l2ul", model, forget, params, seed=0)
    assert with_retain.info["synthetic_anchors"] == 0 and without.info["synthetic_anchors"] == 256
    setup = prepare("l2ul", model, forget, params, seed=0, with_retain=True)
    kept = unlearn("l2ul", model, forget, params, retain=retain, seed=0, prepared=setup)
    assert kept.grad_examples == kept.steps * (len(forget) + 24 + 24)
    assert weights_sha256(kept.model) == weights_sha256(with_retain.model)
    # the set-up (importance, adversarial examples) has no inversion of 256 images x 5 steps
    assert with_retain.grad_examples - kept.grad_examples < 256 * 5


def test_the_active_forget_average_keeps_the_pull_on_the_rows_left():
    forget = ForgetSet.build(torch.zeros(4, 1, 2, 2), torch.tensor([0, 0, 0, 0]), "misclassify",
                             num_classes=3)
    logits = torch.tensor([[0.0, 5.0, 0.0]] * 3 + [[1.0, 0.0, 0.0]])  # 3 rows done, 1 left
    assert margin_loss(logits, forget, 0.2).item() == pytest.approx(1.2 / 4)
    assert margin_loss(logits, forget, 0.2, active_only=True).item() == pytest.approx(1.2)
    done = torch.tensor([[0.0, 5.0, 0.0]] * 4)
    assert margin_loss(done, forget, 0.2, active_only=True).item() == 0.0
    with pytest.raises(ValueError, match="forget_average"):
        make_config("l2ul", {"forget_average": "some"})


@pytest.mark.parametrize("freeze_bn", [True, False])
def test_a_kept_set_up_gives_the_same_weights(digits_model, tmp_path, freeze_bn):
    """``prepare`` then ``unlearn(prepared=...)`` through a file equals one ``unlearn``; a
    larger step budget shares the set-up (escalation attempts reuse it)."""
    model, ds = digits_model
    forget = forget_set_for(ds, "misclassify", 8, seed=2)
    params = {"max_steps": 20, "synthesis_steps": 5, "freeze_bn": freeze_bn}
    assert setup_settings("l2ul", params) == setup_settings("l2ul", {**params, "max_steps": 90})
    setup = prepare("l2ul", model, forget, params, seed=5)
    torch.save(setup, tmp_path / "setup.pt")
    kept = torch.load(tmp_path / "setup.pt", weights_only=True)
    for budget in (20, 40):
        fresh = unlearn("l2ul", model, forget, {**params, "max_steps": budget}, seed=5)
        reused = unlearn("l2ul", model, forget, {**params, "max_steps": budget}, seed=5,
                         prepared=kept)
        assert weights_sha256(reused.model) == weights_sha256(fresh.model)
        assert reused.steps == fresh.steps and reused.info == fresh.info
    assert prepare("neggrad", model, forget, {"max_steps": 5}) is None  # no set-up
    with pytest.raises(ValueError, match="prepared for 'l2ul'"):
        unlearn("l2ul-reference", model, forget, {"max_steps": 1}, prepared=kept)


def test_retain_sample_only_for_methods_that_use_one(digits_model):
    model, ds = digits_model
    forget = forget_set_for(ds, "misclassify", 4, seed=0)
    retain = RetainSample(ds.train_x[-10:], ds.train_y[-10:])
    with pytest.raises(ValueError, match="does not use a retain sample"):
        unlearn("neggrad", model, forget, {"max_steps": 1}, retain=retain)
    assert unlearn("l2ul", model, forget, {"max_steps": 1}, retain=retain).steps <= 1


def test_l2ul_warmup_shrinks_the_first_step_and_refuses_negative_lengths(digits_model):
    """One step with a 20-step warm-up moves the weights about 1/20 as far as one without."""
    model, ds = digits_model
    forget = forget_set_for(ds, "misclassify", 8, seed=0)
    base = torch.cat([p.detach().flatten() for p in model.parameters()])

    def moved(warmup: int) -> float:
        res = unlearn("l2ul", model, forget, {"max_steps": 1, "synthesis_steps": 5,
                                              "warmup_steps": warmup}, seed=0)
        return float((torch.cat([p.detach().flatten() for p in res.model.parameters()]) - base).norm())

    assert moved(20) < 0.2 * moved(0)
    with pytest.raises(ValueError, match="invalid l2ul config"):
        unlearn("l2ul", model, forget, {"warmup_steps": -1}, seed=0)


def test_neighbour_anchors_are_small_nonzero_translations_of_each_forget_image():
    x = torch.rand(3, 1, 8, 8)
    near = shifted_copies(x, copies=8, max_shift=2, g=torch.Generator().manual_seed(0))
    assert near.shape == (24, 1, 8, 8)
    offsets = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if (dy, dx) != (0, 0)]
    for c in range(8):
        for i in range(3):
            assert any(torch.equal(near[c * 3 + i], torch.roll(x[i], o, dims=(1, 2))) for o in offsets)
    assert len(shifted_copies(x, copies=0, max_shift=2, g=torch.Generator())) == 0


def test_l2ul_anchors_eight_shifted_copies_of_every_forget_image_by_default(digits_model):
    model, ds = digits_model
    forget = forget_set_for(ds, "misclassify", 4, seed=0)
    res = unlearn("l2ul", model, forget, {"max_steps": 1, "synthesis_steps": 1}, seed=0)
    assert res.info["neighbour_anchors"] == 8 * 4


def test_noise_started_anchors_depend_on_the_model_alone(digits_model):
    """synthetic_init="noise": the same inverted anchors for any forget set (they could be made
    once per model version); the default starts them from the forget set."""
    model, ds = digits_model
    made = model_anchors(model, ds.train_x[:1], count=16, steps=2)
    rows = lambda t: {tuple(r.flatten().tolist()) for r in t}
    params = {"synthesis_steps": 2, "synthetic_anchors": 16}
    for seed in (0, 1):
        forget = forget_set_for(ds, "misclassify", 4, seed=seed)
        noise = prepare("l2ul", model, forget, {**params, "synthetic_init": "noise"}, seed=0)
        default = prepare("l2ul", model, forget, params, seed=0)
        assert rows(made) <= rows(noise["state"]["x_anchor"])
        assert not rows(made) & rows(default["state"]["x_anchor"])
    with pytest.raises(ValueError, match="synthetic_init"):
        unlearn("l2ul", model, forget, {"synthetic_init": "zeros"}, seed=0)


@pytest.mark.parametrize("bad", [{"neighbour_weight": -1.0}, {"neighbour_weight": float("nan")},
                                 {"neighbour_shifts": -1}, {"max_shift": -1}])
def test_l2ul_refuses_negative_neighbour_settings(digits_model, bad):
    """A negative weight would push the neighbours away from their predictions; a negative
    count or shift used to be read silently as 'off'."""
    model, ds = digits_model
    forget = forget_set_for(ds, "misclassify", 4, seed=0)
    with pytest.raises(ValueError, match="invalid l2ul config"):
        unlearn("l2ul", model, forget, bad, seed=0)


def test_anchors_relax_only_when_the_forget_loss_stalls():
    assert stalled([5.0, 4.0], patience=0, progress=0.05)  # 0: relax every step
    assert stalled([5.0, 4.0], patience=3, progress=0.05)  # too few steps to judge: relax
    assert not stalled([5.0, 4.0, 3.0, 2.0], patience=3, progress=0.05)  # falling fast: hold
    assert stalled([5.0, 4.9, 4.9, 4.9], patience=3, progress=0.05)  # fell by 2%: relax
    assert stalled([0.0, 0.0, 0.0, 0.0], patience=3, progress=0.05)  # stuck at 0: relax
    assert stalled([-5.0, -5.1, -5.1, -5.1], patience=3, progress=0.05)  # -CE: sign-safe
    assert not stalled([-5.0, -6.0, -7.0, -8.0], patience=3, progress=0.05)


def test_anchors_relax_on_every_step_once_the_budget_share_is_spent(digits_model):
    """relax_always_after=0 spends no budget on waiting: the same run as relaxing every step."""
    model, ds = digits_model
    forget = forget_set_for(ds, "misclassify", 8, seed=0)
    base = {"max_steps": 30, "synthesis_steps": 5}
    every_step = unlearn("l2ul", model, forget, {**base, "relax_patience": 0}, seed=0)
    from_start = unlearn("l2ul", model, forget, {**base, "relax_always_after": 0.0}, seed=0)
    on_stalls = unlearn("l2ul", model, forget, {**base, "relax_always_after": 1.0}, seed=0)
    assert weights_sha256(from_start.model) == weights_sha256(every_step.model)
    assert weights_sha256(on_stalls.model) != weights_sha256(every_step.model)


def test_with_a_retain_sample_its_own_relaxation_share_replaces_the_forget_only_one(digits_model):
    """With a retain sample, retain_relax_always_after decides (default 0: every step) and
    relax_always_after is ignored; without one, the retain share changes nothing."""
    model, ds = digits_model
    forget = forget_set_for(ds, "misclassify", 8, seed=0)
    retain = RetainSample(ds.train_x[-64:], ds.train_y[-64:])
    base = {"max_steps": 30, "synthesis_steps": 5, "retain_update": "all"}

    def run(params, retain_sample):
        return weights_sha256(unlearn("l2ul", model, forget, {**base, **params},
                                      retain=retain_sample, seed=0).model)

    default = run({}, retain)
    assert default == run({"relax_patience": 0}, retain)  # every step from the start
    assert default == run({"relax_always_after": 1.0}, retain)  # the forget-only share is ignored
    assert default != run({"retain_relax_always_after": 1.0}, retain)  # on stalls only
    assert run({}, None) == run({"retain_relax_always_after": 1.0}, None)


@pytest.mark.parametrize("bad", [{"relax_patience": -1}, {"relax_progress": 1.0},
                                 {"relax_progress": -0.1}, {"relax_always_after": 1.5},
                                 {"relax_always_after": -0.1}, {"retain_relax_always_after": 1.5},
                                 {"retain_relax_always_after": -0.1}])
def test_l2ul_refuses_invalid_relaxation(digits_model, bad):
    model, ds = digits_model
    forget = forget_set_for(ds, "misclassify", 4, seed=0)
    with pytest.raises(ValueError, match="invalid l2ul config"):
        unlearn("l2ul", model, forget, bad, seed=0)


@pytest.mark.parametrize("lr", [0.0, -1e-3, float("nan")])
def test_l2ul_refuses_a_learning_rate_that_is_not_positive(digits_model, lr):
    """lr 0 would spend the whole step budget without moving; caught before any anchor is built."""
    model, ds = digits_model
    forget = forget_set_for(ds, "misclassify", 4, seed=0)
    with pytest.raises(ValueError, match="invalid l2ul config"):
        unlearn("l2ul", model, forget, {"lr": lr}, seed=0)
