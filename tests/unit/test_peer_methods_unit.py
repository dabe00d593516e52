"""Helpers of the peer methods (salun, boundary-shrink, scrub, ssd, jit, retrain) on a tiny
seeded model: invariants, not numbers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from unlearning.methods import ForgetSet
from unlearning.methods.boundary_shrink import nearest_wrong_labels
from unlearning.methods.jit import lipschitz_loss
from unlearning.methods.loop import Context
from unlearning.methods.peer_utils import (
    count_step,
    num_classes_of,
    reinitialise,
    shuffled_batches,
    wrong_labels,
)
from unlearning.methods.retrain import training_data_without
from unlearning.methods.salun import MaskedSGD, saliency_mask
from unlearning.methods.scrub import tempered_kl
from unlearning.methods.ssd import dampening_factors, diagonal_fisher


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))


def tiny_forget(n: int = 6, relabel: bool = False) -> ForgetSet:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 1, 4, 4, generator=g)
    y = torch.arange(n) % 3
    if relabel:
        return ForgetSet.build(x, y, "relabel", ((y + 1) % 3).tolist(), num_classes=3,
                               ids=list(range(n)))
    return ForgetSet.build(x, y, "misclassify", ids=list(range(n)))


def test_shuffled_batches_cover_every_index_once_per_pass():
    it = shuffled_batches(10, 4, torch.Generator().manual_seed(0))
    first = [next(it) for _ in range(3)]
    assert [len(b) for b in first] == [4, 4, 2]
    assert sorted(torch.cat(first).tolist()) == list(range(10))
    with pytest.raises(ValueError):
        next(shuffled_batches(0, 4, torch.Generator()))


def test_wrong_labels_satisfy_the_objective_row_by_row():
    mixed = ForgetSet.build(torch.rand(40, 1, 4, 4), torch.arange(40) % 3,
                            ["relabel"] * 20 + ["misclassify"] * 20,
                            [((i % 3) + 1) % 3 for i in range(20)] + [None] * 20, num_classes=3)
    t = wrong_labels(mixed, 3, torch.Generator().manual_seed(0))
    assert torch.equal(t[:20], mixed.relabel_to[:20])
    assert (t[20:] != mixed.avoid[20:]).all()


def test_count_step_counts_and_checks_the_objective():
    model, forget = tiny_model(), tiny_forget()
    ctx = Context(model, forget, max_steps=2, generator=torch.Generator(), progress=None)
    assert count_step(ctx) == ctx.reached  # not done yet unless the objective holds
    assert ctx.steps == 1 and ctx.reached == bool(forget.satisfied_by(model).all())
    assert count_step(ctx) and ctx.steps == 2  # max_steps reached: the loop must end


def test_reinitialise_resets_every_layer_and_num_classes_keeps_the_mode():
    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    torch.manual_seed(5)
    assert reinitialise(model) == 2
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    model.train()
    assert num_classes_of(model, torch.rand(2, 1, 4, 4)) == 3 and model.training


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 1.0])
def test_saliency_mask_keeps_exactly_the_top_fraction(fraction):
    model, forget = tiny_model(), tiny_forget()
    masks = saliency_mask(model, forget, fraction)
    total = sum(p.numel() for p in model.parameters())
    assert set(masks) == {n for n, _ in model.named_parameters()}
    assert int(sum(m.sum().item() for m in masks.values())) == round(fraction * total)
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError):
        saliency_mask(model, forget, 1.5)


def test_masked_sgd_never_moves_weights_outside_the_mask():
    model, forget = tiny_model(), tiny_forget()
    masks = saliency_mask(model, forget, 0.3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = MaskedSGD(model, masks, lr=0.1, momentum=0.9, weight_decay=0.0)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(forget.x), (forget.y + 1) % 3).backward()
        opt.step()
    for n, p in model.named_parameters():
        frozen = masks[n] == 0
        assert torch.equal(p[frozen], before[n][frozen])
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_nearest_wrong_labels_never_return_the_label_to_avoid():
    model, forget = tiny_model(), tiny_forget(30)
    model.train()
    for eps in (0.0, 0.1, 1.0):
        t = nearest_wrong_labels(model, forget.x, forget.avoid, eps)
        assert (t != forget.avoid).all() and t.max() < 3
    assert model.training and all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError):
        nearest_wrong_labels(model, forget.x, forget.avoid, -1.0)


def test_tempered_kl_is_zero_on_the_teacher_and_positive_elsewhere():
    z = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(tempered_kl(z, z, 4.0), torch.zeros(5), atol=1e-6)
    assert (tempered_kl(z + torch.tensor([3.0, 0.0, 0.0]), z, 4.0) > 0).all()


def test_diagonal_fisher_is_nonnegative_and_leaves_the_model_alone():
    model, forget = tiny_model(), tiny_forget()
    model.train()
    fisher = diagonal_fisher(model, forget.x, forget.y)
    assert set(fisher) == {n for n, _ in model.named_parameters()}
    assert all((f >= 0).all() and f.shape == p.shape
               for (_, p), f in zip(model.named_parameters(), fisher.values()))
    assert model.training and all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError):
        diagonal_fisher(model, forget.x[:0], forget.y[:0])


def test_dampening_factors_follow_the_ssd_rule():
    forget_imp = {"w": torch.tensor([10.0, 10.0, 1.0, 0.0])}
    retain_imp = {"w": torch.tensor([0.5, 4.0, 1.0, 0.0])}
    f = dampening_factors(forget_imp, retain_imp, alpha=2.0, lam=1.0)["w"]
    # selected where 10 > 1 (yes: beta 0.05), 10 > 8 (yes: beta 0.4), 1 > 2 (no), 0 > 0 (no)
    assert torch.allclose(f, torch.tensor([0.05, 0.4, 1.0, 1.0]))
    assert (dampening_factors(forget_imp, retain_imp, 2.0, 100.0)["w"] == 1.0).all()


def test_lipschitz_loss_is_zero_for_a_constant_model_and_positive_otherwise():
    x = torch.rand(4, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    const = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    nn.init.zeros_(const[1].weight)
    g = torch.Generator().manual_seed(0)
    assert lipschitz_loss(const, x, 0.1, 5, g).item() == 0.0
    loss = lipschitz_loss(tiny_model(), x, 0.1, 5, g)
    assert loss.item() > 0 and loss.requires_grad
    with pytest.raises(ValueError):
        lipschitz_loss(const, x, 0.0, 5, g)


def test_training_data_without_drops_misclassify_rows_and_relabels_relabel_rows():
    train_x, train_y = torch.rand(10, 1, 4, 4), torch.arange(10) % 3
    gone = ForgetSet.build(train_x[[2, 5]], train_y[[2, 5]], "misclassify", ids=[2, 5])
    x, y = training_data_without(train_x, train_y, gone)
    assert len(x) == 8 and torch.equal(x, train_x[[0, 1, 3, 4, 6, 7, 8, 9]])
    moved = ForgetSet.build(train_x[[2, 5]], train_y[[2, 5]], ["relabel", "misclassify"],
                            [0, None], num_classes=3, ids=[2, 5])
    x, y = training_data_without(train_x, train_y, moved)
    assert len(x) == 9 and int(y[2]) == 0 and torch.equal(x[2], train_x[2])
    assert torch.equal(train_y, torch.arange(10) % 3)  # the input is not modified
    with pytest.raises(ValueError, match="indices"):
        training_data_without(train_x, train_y, ForgetSet.build(train_x[:2], train_y[:2],
                                                                "misclassify"))
