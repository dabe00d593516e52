"""Targeted L2 PGD, target sampling, MAS importance and the anchor penalty."""

from __future__ import annotations

import torch

from unlearning.attacks import adversarial_set, l2_pgd_targeted, random_other_labels
from unlearning.importance import (
    anchor_penalty,
    inverted_importance,
    mas_importance,
    normalise_per_tensor,
)


def test_random_other_labels_are_uniform_over_the_other_classes():
    g = torch.Generator().manual_seed(0)
    y = torch.full((20000,), 5)
    t = random_other_labels(y, 10, g)
    assert not (t == 5).any()
    counts = torch.bincount(t, minlength=10).float()
    others = counts[torch.arange(10) != 5]
    assert (others / len(y) - 1 / 9).abs().max() < 0.01  # no class favoured (ref. bug: C//2)


def test_pgd_stays_in_the_ball_and_the_unit_box_and_mostly_hits(digits_model):
    model, ds = digits_model
    g = torch.Generator().manual_seed(0)
    x, y = ds.train_x[:64], ds.train_y[:64]
    target = random_other_labels(y, 10, g)
    eps = 2.0
    adv = l2_pgd_targeted(model, x, target, eps=eps, step_size=0.5, steps=20, g=g)
    assert (adv - x).flatten(1).norm(dim=1).max() <= eps + 1e-4
    assert adv.min() >= 0.0 and adv.max() <= 1.0
    hit = (model(adv).argmax(1) == target).float().mean()
    assert hit > 0.8, f"targeted PGD hit only {hit:.0%}"
    assert not model.training  # mode restored
    assert all(p.requires_grad for p in model.parameters())


def test_adversarial_set_shape_and_targets(digits_model):
    model, ds = digits_model
    g = torch.Generator().manual_seed(1)
    x, y = ds.train_x[:5], ds.train_y[:5]
    xa, ta, src = adversarial_set(model, x, y, 10, per_instance=3, eps=1.0, step_size=0.25,
                                  steps=4, g=g)
    assert xa.shape == (15, 1, 8, 8) and ta.shape == (15,)
    assert torch.equal(src, torch.arange(5).repeat(3))
    assert not (ta == y[src]).any()


def test_mas_importance_keys_and_ranges(digits_model):
    model, ds = digits_model
    imp = mas_importance(model, ds.train_x[:40], batch_size=16)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(imp) == names
    assert all((v >= 0).all() and torch.isfinite(v).all() for v in imp.values())
    inv = inverted_importance(imp)
    assert all(v.min() >= 0 and v.max() <= 1 for v in inv.values())


def test_importance_zeroes_gradients_between_batches(digits_model):
    """Per-batch |grad| averaged: two identical batches give the one-batch value (the
    reference code accumulated, giving |g| + |2g| over two batches)."""
    model, ds = digits_model
    x = ds.train_x[:8]
    one = mas_importance(model, x, batch_size=8, train_mode=False)
    two = mas_importance(model, torch.cat([x, x]), batch_size=8, train_mode=False)
    for n in one:
        assert torch.allclose(one[n], two[n], atol=1e-6)


def test_normalisation_of_a_constant_tensor_has_no_division_by_zero():
    out = normalise_per_tensor({"w": torch.zeros(3, 3), "b": torch.tensor([1.0, 3.0])})
    assert torch.equal(out["w"], torch.zeros(3, 3))
    assert torch.equal(out["b"], torch.tensor([0.0, 1.0]))


def test_penalty_is_zero_at_the_anchor_and_grows_away(digits_model):
    model, _ = digits_model
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    weights = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    assert anchor_penalty(model, anchor, weights).item() == 0.0
    moved = {n: a + 0.1 for n, a in anchor.items()}
    assert anchor_penalty(model, moved, weights).item() > 0.0
