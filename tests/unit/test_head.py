"""The classifier head (``unlearning.head``) and l2ul's head-only update."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from unlearning.benchmark import forget_set_for
from unlearning.head import NoHeadError, classifier_head, head_inputs
from unlearning.methods import ForgetSet, RetainSample, make_config, unlearn
from unlearning.models import ModelSpec, build_model


class _Doubled(nn.Module):
    """Something after the last linear layer: the logits are not a head's output."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x):
        return 2 * self.net(x)


@pytest.mark.parametrize(("arch", "name"), [("small-cnn", "1.head"), ("resnet18", "1.fc")])
def test_the_head_is_the_largest_linear_block_that_gives_the_output(arch, name):
    torch.manual_seed(0)
    model = build_model(ModelSpec(arch, 1, 10, 8)).eval()
    x = torch.rand(5, 1, 8, 8)
    found, head = classifier_head(model, x)
    assert found == name
    with torch.no_grad():
        assert torch.allclose(head(head_inputs(model, head, x, chunk=2)), model(x), atol=1e-6)


@pytest.mark.parametrize("model", [_Doubled(), nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten())])
def test_a_model_without_a_head_is_refused_in_one_line(model):
    with pytest.raises(NoHeadError, match="no block of linear layers produces"):
        classifier_head(model, torch.rand(3, 1, 8, 8))


def test_a_head_only_update_moves_the_head_and_nothing_else(digits_model):
    model, ds = digits_model
    forget = forget_set_for(ds, "misclassify", 8, seed=0)
    retain = RetainSample(ds.train_x[-64:], ds.train_y[-64:])
    res = unlearn("l2ul", model, forget, {"max_steps": 3, "retain_update": "head"}, retain=retain,
                  seed=0)
    assert res.info["updated"] == "1.head" and res.info["head_updates"] == 3 * 5
    assert res.info["head_rows_per_update"] == 8 + 8 * (4 + 8) + 64  # forget, anchors, retain
    before, after = dict(model.named_parameters()), dict(res.model.named_parameters())
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert moved and all(n.startswith("1.head.") for n in moved)
    # the whole network moves when asked, and forget-set-only runs move it by default
    whole = unlearn("l2ul", model, forget, {"max_steps": 3, "retain_update": "all"},
                    retain=retain, seed=0)
    assert "updated" not in whole.info
    assert not torch.equal(dict(whole.model.named_parameters())["1.features.0.0.weight"],
                           before["1.features.0.0.weight"])
    assert "updated" not in unlearn("l2ul", model, forget, {"max_steps": 2}, seed=0).info


def test_by_default_the_head_alone_moves_from_256_retain_rows_on(digits_model):
    """A retain sample too small to hold the head in place updates the whole network."""
    model, ds = digits_model
    forget = forget_set_for(ds, "misclassify", 8, seed=0)
    for rows, updated in ((255, None), (256, "1.head")):
        retain = RetainSample(ds.train_x[-rows:], ds.train_y[-rows:])
        res = unlearn("l2ul", model, forget, {"max_steps": 2}, retain=retain, seed=0)
        assert res.info.get("updated") == updated, rows


def test_a_model_without_a_head_moves_whole_unless_the_head_is_asked_for(digits_model):
    _, ds = digits_model
    torch.manual_seed(0)
    model = _Doubled().eval()
    forget = ForgetSet.build(ds.train_x[:4], ds.train_y[:4], "misclassify",
                             away_from="prediction", model=model)  # not met before any step
    retain = RetainSample(ds.train_x[-300:], ds.train_y[-300:])
    res = unlearn("l2ul", model, forget, {"max_steps": 2}, retain=retain, seed=0)
    assert "updated" not in res.info and "no block of linear layers" in res.info[
        "head_update_skipped"]
    with pytest.raises(NoHeadError):
        unlearn("l2ul", model, forget, {"max_steps": 2, "retain_update": "head"}, retain=retain)


@pytest.mark.parametrize(("key", "value"), [("update", "tail"), ("retain_update", "conv"),
                                            ("head_updates", 0), ("head_decay", 0.0),
                                            ("head_decay", 1.5), ("head_noise_scale", 0.0),
                                            ("head_noise_anchors", -1),
                                            ("head_noise_spread", 0.5)])
def test_l2ul_refuses_head_settings_it_cannot_use(key, value):
    with pytest.raises(ValueError, match=key):
        make_config("l2ul", {key: value})


@pytest.mark.parametrize("non_negative", [True, False])
def test_noise_anchors_lie_around_the_forget_inputs_and_keep_the_unchanged_heads_labels(
        non_negative):
    """Every draw is new, around each forget row in turn at a radius between half and twice
    the scale (in each coordinate's spread), non-negative only where the forget inputs are,
    and labelled by the head as it was when the anchors were made."""
    from unlearning.methods.l2ul import HeadNoise

    torch.manual_seed(0)
    head = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    f_forget = torch.rand(5, 4, 2, 2) - (0.0 if non_negative else 0.5)
    near = HeadNoise(head, f_forget, 500, 0.7, 2.0, torch.Generator().manual_seed(0))
    unchanged = [p.detach().clone() for p in head.parameters()]
    with torch.no_grad():
        for p in head.parameters():
            p.add_(1.0)  # the live head moves: the anchors' labels must not
    f, teacher = near.draw()
    f_again, _ = near.draw()
    assert f.shape == (500, 4, 2, 2) and not torch.equal(f, f_again)
    assert bool((f >= 0).all()) is non_negative
    original = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        for p, q in zip(original.parameters(), unchanged):
            p.copy_(q)
        assert torch.allclose(teacher, torch.softmax(original(f), 1))
    if not non_negative:  # radius, per point: RMS of the standardised offset in [0.35, 1.4]
        z = (f - f_forget.repeat(100, 1, 1, 1)) / f_forget.std(0, keepdim=True)
        rms = z.flatten(1).pow(2).mean(1).sqrt()
        assert 0.1 < rms.min() and rms.max() < 2.5 and 0.5 < rms.median() < 1.0


def test_noise_anchors_are_drawn_only_when_the_head_alone_moves(digits_model):
    model, ds = digits_model
    forget = forget_set_for(ds, "misclassify", 8, seed=0)
    res = unlearn("l2ul", model, forget, {"max_steps": 2, "update": "head",
                                          "head_noise_anchors": 96}, seed=0)
    assert res.info["head_rows_per_update"] == 8 + 8 * (4 + 8) + 256 + 96
    again = unlearn("l2ul", model, forget, {"max_steps": 2, "update": "head",
                                            "head_noise_anchors": 96}, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(res.model.state_dict().values(),
                                                 again.model.state_dict().values()))
    whole = unlearn("l2ul", model, forget, {"max_steps": 2, "head_noise_anchors": 96}, seed=0)
    assert "updated" not in whole.info
