"""Peer methods (retrain, finetune, salun, boundary-shrink, scrub, ssd, jit) on digits: each
runs under the registry's contract (bounded loop, the parent untouched, the retain-sample
rules, an honest ``reached``), and the fine-tuning peers reach the objective at k=8."""

from __future__ import annotations

import pytest
import torch

from unlearning.benchmark import forget_set_for, retrain_without
from unlearning.datasets import sample_retain_ids
from unlearning.methods import RetainSample, get_method, make_config, unlearn
from unlearning.methods.retrain import retrain_reference
from unlearning.models import build_model, spec_for, weights_sha256
from unlearning.train import TrainConfig

PEERS = ["retrain", "finetune", "salun", "boundary-shrink", "scrub", "ssd", "jit"]
NEEDS_RETAIN = ["retrain", "finetune", "scrub", "ssd"]
FORGET_ONLY = ["boundary-shrink", "jit"]


@pytest.fixture(scope="module")
def retain(digits_model) -> RetainSample:
    """The benchmark's 1% retain sample (13 rows of digits), disjoint from the forget set."""
    _, ds = digits_model
    ids = forget_set_for(ds, "misclassify", 8, seed=0).ids
    r = sample_retain_ids(ds.num_train, list(ids), 0.01, seed=0)
    return RetainSample(ds.train_x[r], ds.train_y[r])


def _retain_for(method: str, retain: RetainSample) -> RetainSample | None:
    return retain if get_method(method).accepts_retain else None


def test_the_retain_sample_contract_is_declared():
    for m in PEERS:
        info = get_method(m)
        assert info.needs_retain == (m in NEEDS_RETAIN), m
        assert info.accepts_retain == (m not in FORGET_ONLY), m
        assert make_config(m, {"max_steps": 2}).max_steps == 2


@pytest.mark.parametrize("objective", ["misclassify", "relabel"])
@pytest.mark.parametrize("method", PEERS)
def test_bounded_parent_untouched_and_reached_is_honest(digits_model, retain, method, objective):
    model, ds = digits_model
    before = weights_sha256(model)
    forget = forget_set_for(ds, objective, 8, seed=0)
    res = unlearn(method, model, forget, {"max_steps": 2}, retain=_retain_for(method, retain),
                  seed=0)
    assert res.steps <= 2
    assert weights_sha256(model) == before
    assert res.reached == bool(forget.satisfied_by(res.model).all())
    assert res.satisfied == int(forget.satisfied_by(res.model).sum())


@pytest.mark.parametrize("method", NEEDS_RETAIN)
def test_methods_that_need_a_retain_sample_refuse_to_run_without_one(digits_model, method):
    model, ds = digits_model
    with pytest.raises(ValueError, match=f"method '{method}' needs a retain sample"):
        unlearn(method, model, forget_set_for(ds, "misclassify", 4, seed=0), {"max_steps": 1})


@pytest.mark.parametrize("method", FORGET_ONLY)
def test_forget_set_only_methods_refuse_a_retain_sample(digits_model, retain, method):
    model, ds = digits_model
    with pytest.raises(ValueError, match="does not use a retain sample"):
        unlearn(method, model, forget_set_for(ds, "misclassify", 4, seed=0), {"max_steps": 1},
                retain=retain)


@pytest.mark.parametrize("method,objective,with_retain", [
    ("salun", "misclassify", False), ("salun", "relabel", False), ("salun", "misclassify", True),
    ("boundary-shrink", "misclassify", False), ("boundary-shrink", "relabel", False),
    ("scrub", "misclassify", True), ("scrub", "relabel", True), ("finetune", "relabel", True),
])
def test_fine_tuning_peers_reach_the_objective_at_k8(digits_model, retain, method, objective,
                                                     with_retain):
    model, ds = digits_model
    forget = forget_set_for(ds, objective, 8, seed=1)
    res = unlearn(method, model, forget, retain=retain if with_retain else None, seed=1)
    assert res.reached and res.satisfied == 8, (method, objective, res.steps)
    assert res.steps < make_config(method).max_steps


def test_ssd_is_one_shot_and_reports_the_objective_as_it_is(digits_model, retain):
    model, ds = digits_model
    forget = forget_set_for(ds, "misclassify", 8, seed=0)
    res = unlearn("ssd", model, forget, retain=retain, seed=0)
    assert res.steps == 1 and res.info["dampened_weights"] > 0
    assert res.reached == bool(forget.satisfied_by(res.model).all())
    # escalation (max_steps > 1) loosens the selection each pass and stops once reached
    more = unlearn("ssd", model, forget, {"max_steps": 4}, retain=retain, seed=0)
    assert 1 <= more.steps <= 4 and more.info["alpha"] <= res.info["alpha"]


def test_salun_moves_only_the_salient_weights(digits_model):
    model, ds = digits_model
    forget = forget_set_for(ds, "misclassify", 8, seed=0)
    res = unlearn("salun", model, forget, {"mask_fraction": 0.1, "max_steps": 20}, seed=0)
    moved = sum(int((a != b).sum()) for a, b in zip(model.parameters(), res.model.parameters()))
    total = sum(p.numel() for p in model.parameters())
    assert 0 < moved <= round(0.1 * total)
    assert res.info["salient_weights"] == round(0.1 * total)


def test_peers_are_deterministic_for_a_seed(digits_model, retain):
    model, ds = digits_model
    forget = forget_set_for(ds, "relabel", 8, seed=2)
    for method in ("salun", "scrub", "jit"):
        runs = [unlearn(method, model, forget, {"max_steps": 5},
                        retain=_retain_for(method, retain), seed=3) for _ in range(2)]
        assert weights_sha256(runs[0].model) == weights_sha256(runs[1].model), method


def test_retrain_reference_is_the_benchmarks_retrain_and_relabels(digits_model):
    _, ds = digits_model
    spec = spec_for("small-cnn", ds)
    cfg = TrainConfig(epochs=2, seed=0)
    forget = forget_set_for(ds, "misclassify", 8, seed=0)
    torch.manual_seed(cfg.seed)
    bench_model, _ = retrain_without(ds, lambda: build_model(spec), list(forget.ids), cfg)
    ours, seconds = retrain_reference(lambda: build_model(spec), ds.train_x, ds.train_y,
                                      forget, cfg)
    assert seconds > 0 and weights_sha256(ours) == weights_sha256(bench_model)
    relabel = forget_set_for(ds, "relabel", 8, seed=0)
    moved, _ = retrain_reference(lambda: build_model(spec), ds.train_x, ds.train_y, relabel, cfg)
    assert weights_sha256(moved) != weights_sha256(ours)  # the relabelled rows were trained on


def test_retrain_method_reinitialises_and_never_stops_early(digits_model):
    model, ds = digits_model
    forget = forget_set_for(ds, "misclassify", 8, seed=0)
    keep = torch.ones(ds.num_train, dtype=torch.bool)
    keep[torch.as_tensor(forget.ids)] = False
    full = RetainSample(ds.train_x[keep], ds.train_y[keep])
    res = unlearn("retrain", model, forget, {"epochs": 2}, retain=full, seed=0)
    per_epoch = -(-int(keep.sum()) // 128)
    assert res.steps == 2 * per_epoch  # the whole schedule, whatever the objective says
    assert res.info["trained_on"] == int(keep.sum())
    capped = unlearn("retrain", model, forget, {"epochs": 2, "max_steps": 5}, retain=full, seed=0)
    assert capped.steps == 5
    first_conv = next(p for p in model.parameters() if p.dim() == 4)
    assert not torch.allclose(next(p for p in res.model.parameters() if p.dim() == 4), first_conv)
