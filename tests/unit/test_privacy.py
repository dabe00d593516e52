"""LiRA (unlearning.privacy): the maths on synthetic Gaussian confidences, where the right
answer is known, and one behaviour test on digits where the attack must beat chance."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from unlearning import privacy as P


def _phi_norm_cdf(v: float) -> float:
    return 0.5 * (1 + math.erf(v / math.sqrt(2)))


def _synthetic(n: int, n_shadows: int, shift: float, spread: float = 2.0, seed: int = 0):
    """Per-example offsets mu_i ~ N(0, spread^2); a shadow (or the target) that trained on
    example i sees phi ~ N(mu_i + shift, 1), one that did not sees N(mu_i, 1).

    Returns the shadows, the target's phi (N, 1) and its member mask (first half)."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(0, spread, n)
    masks = P.inclusion_masks(n, n_shadows, seed)
    phi = mu[None] + shift * masks + rng.normal(0, 1, (n_shadows, n))
    members = np.arange(n) < n // 2
    target = mu + shift * members + rng.normal(0, 1, n)
    return P.ShadowSet(masks, phi[:, :, None]), target[:, None], members


@pytest.mark.parametrize("offline", [False, True])
def test_known_separation_gives_the_expected_auc(offline: bool) -> None:
    shadows, phi, members = _synthetic(4000, 16, shift=1.0)
    s = P.lira_scores(P.fit_lira(shadows), phi, offline=offline)
    # equal unit variances: the optimal test's AUC is Phi(shift / sqrt(2)) = 0.760; the means
    # are estimated from 8 shadows each, which costs a little
    assert P.attack_auc(s[members], s[~members]) == pytest.approx(_phi_norm_cdf(1 / math.sqrt(2)),
                                                                  abs=0.03)
    # one global threshold on phi ignores the per-example offsets: Phi(1 / sqrt(2 * 5)) = 0.624
    raw = phi[:, 0]
    assert P.attack_auc(raw[members], raw[~members]) < P.attack_auc(s[members], s[~members]) - 0.08


@pytest.mark.parametrize("offline", [False, True])
def test_identical_distributions_are_at_chance(offline: bool) -> None:
    shadows, phi, members = _synthetic(4000, 16, shift=0.0)
    s = P.lira_scores(P.fit_lira(shadows), phi, offline=offline)
    assert P.attack_auc(s[members], s[~members]) == pytest.approx(0.5, abs=0.03)
    assert P.tpr_at_fpr(s[members], s[~members], 0.05) == pytest.approx(0.05, abs=0.03)


def test_fit_recovers_means_and_variance() -> None:
    shadows, _, _ = _synthetic(500, 64, shift=2.0)
    fit = P.fit_lira(shadows)  # auto: 32 per side is enough for per-example variances
    out = ~shadows.masks
    assert np.allclose(fit.mu_out[:, 0], (shadows.phi[:, :, 0] * out).sum(0) / out.sum(0))
    assert np.abs(fit.mu_in - fit.mu_out - 2.0).mean() < 0.3
    assert np.median(fit.sd_in) == pytest.approx(1.0, abs=0.1)
    pooled = P.fit_lira(shadows, variance="global")
    assert np.ptp(pooled.sd_out) == 0 and pooled.sd_out[0, 0] == pytest.approx(1.0, abs=0.05)


def test_even_batches_keeps_the_steps_and_leaves_no_small_batch() -> None:
    from unlearning.train import TrainConfig

    for n in (642, 674, 128, 129, 5):
        cfg = P.even_batches(TrainConfig(batch_size=128), n)
        steps = -(-n // cfg.batch_size)
        assert steps == -(-n // 128)
        assert n - (steps - 1) * cfg.batch_size >= cfg.batch_size - steps  # last batch


def test_inclusion_masks_balance_every_example() -> None:
    m = P.inclusion_masks(101, 8, seed=3)
    assert m.shape == (8, 101) and (m.sum(0) == 4).all()
    assert 0.3 < m.sum(1).min() / 101 and m.sum(1).max() / 101 < 0.7  # shadows ~ halves
    assert (m == P.inclusion_masks(101, 8, seed=3)).all()
    for bad in (2, 7):
        with pytest.raises(ValueError, match="even number >= 4"):
            P.inclusion_masks(10, bad, seed=0)


def test_logit_confidence_is_the_log_odds_of_the_true_class() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 5))
    x, y = torch.rand(20, 1, 4, 4), torch.randint(0, 5, (20,))
    p = torch.softmax(model(x), 1).gather(1, y[:, None]).squeeze(1).double()
    phi = P.logit_confidence(model, x, y, queries=((0, 0), (1, 0)))
    assert phi.shape == (20, 2)
    assert np.allclose(phi[:, 0], torch.log(p / (1 - p)).detach().numpy(), atol=1e-5)


def test_diverged_model_gives_finite_confidences() -> None:
    class Inf(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.full((len(x), 3), float("inf"))

    phi = P.logit_confidence(Inf(), torch.rand(4, 1, 2, 2), torch.zeros(4, dtype=torch.long))
    assert np.isfinite(phi).all()


def test_helpers_and_refusals() -> None:
    assert P.attack_auc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert P.two_sided(0.2) == pytest.approx(0.8) and P.two_sided(0.7) == 0.7
    assert P.tpr_at_fpr(np.array([2.0, 3.0]), np.array([0.0, 1.0]), 0.01) == 1.0
    shadows, phi, _ = _synthetic(10, 4, shift=1.0)
    with pytest.raises(ValueError, match="shape"):
        P.lira_scores(P.fit_lira(shadows), phi[:5])
    assert P.lira_scores(P.fit_lira(shadows), phi[:5], idx=np.arange(5)).shape == (5,)
    with pytest.raises(ValueError, match="variance"):
        P.fit_lira(shadows, variance="nope")


@pytest.mark.slow
def test_lira_beats_chance_and_the_loss_attack_on_a_memorising_digits_model() -> None:
    """Half of digits, 40 epochs, 4 shadows (~40 s on one thread): this can fail."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from privacy_study import StudyConfig, _members

    from unlearning.datasets import load_dataset
    from unlearning.models import build_model, spec_for
    from unlearning.train import train_classifier

    torch.set_num_threads(1)
    ds, cfg = load_dataset("digits"), StudyConfig(n_shadows=4)
    spec, tcfg = spec_for(cfg.arch, ds), cfg.train_config()
    x, y = ds.train_x, ds.train_y
    members = _members(len(x), cfg.member_fraction, cfg.split_seed)

    def make(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return build_model(spec)

    keep = torch.from_numpy(members)
    target = train_classifier(make(0), x[keep], y[keep], P.even_batches(tcfg, int(keep.sum())))
    fit = P.fit_lira(P.train_shadows(lambda i: make(100 + i), x, y, 4, tcfg, seed=1))
    phi = P.logit_confidence(target, x, y)
    s = P.lira_scores(fit, phi)
    lira = P.attack_auc(s[members], s[~members])
    loss = P.attack_auc(phi[members, 0], phi[~members, 0])
    assert lira > 0.55, f"LiRA AUC {lira:.3f} on the memorising model"
    assert lira > loss + 0.03, f"LiRA {lira:.3f} vs loss threshold {loss:.3f}"
    # negative control: the same scores against a membership the target never had
    fake = np.random.default_rng(0).permutation(members)
    assert abs(P.attack_auc(s[fake], s[~fake]) - 0.5) < 0.05


def test_membership_metrics_survive_a_diverged_model() -> None:
    """Gradient ascent can leave NaN weights; the benchmark and the release evaluation still
    measure it (the finite-weights gate rejects it), instead of crashing in the SVC."""
    from unlearning.metrics import loss_mia_auc, membership_auc, mia_efficacy

    class Diverged(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.full((len(x), 3), float("nan"))

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(40, 1, 4, 4, generator=g), torch.randint(0, 3, (40,), generator=g)
    model = Diverged()
    assert 0.0 <= mia_efficacy(model, (x[:20], y[:20]), (x[20:], y[20:]), (x[:5], y[:5])) <= 100.0
    assert 0.0 <= loss_mia_auc(model, (x[:20], y[:20]), (x[20:], y[20:])) <= 1.0
    auc, z = membership_auc(model, (x[:10], y[:10]), (x[20:], y[20:]))
    assert auc == 0.5 and z == 0.0  # every row ties: nothing tells them apart
