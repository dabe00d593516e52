"""LiRA: a per-example membership-inference attack that can tell a leaky model apart.

Carlini et al., *Membership Inference Attacks From First Principles* (IEEE S&P 2022). Train
N shadow models with the project's own recipe (:func:`unlearning.train.train_classifier`) on
random halves of a candidate pool, so each example is IN for exactly half of them and OUT for
the other half. For every example and shadow, record the logit-scaled confidence of the true
class, phi = log(p / (1 - p)) (computed as z_y - logsumexp_{j != y} z_j, which is the
same number without the rounding of p near 1). Fit one Gaussian to the IN values and one to
the OUT values per example (with a *fixed*, i.e. global, variance when shadows are few,
as the paper advises), and score a target model's phi by the likelihood ratio

    online:  log N(phi; mu_in, s_in^2) - log N(phi; mu_out, s_out^2)
    offline: -log Pr[Z > phi],  Z ~ N(mu_out, s_out^2)   (OUT shadows only)

Higher = more likely a member. The SalUn SVC on the raw confidence (``metrics.mia_efficacy``)
uses one threshold for every example; LiRA asks "is *this* example more confident than it
would be had it not been trained on?", which is what makes it work where the SVC is at chance.
The study that uses it is ``benchmarks/privacy_study.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .train import Progress, TrainConfig, predict_logits, train_classifier

Shift = tuple[int, int]  # (dy, dx) pixels; the identity query is (0, 0)


def logit_confidence(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                     queries: Sequence[Shift] = ((0, 0),)) -> np.ndarray:
    """phi = log(p_y / (1 - p_y)) per example and query.

    Args:
        x: (N, C, H, W) in [0, 1]; y: (N,) labels.
        queries: image shifts to query (``torch.roll``, as training augmentation does).

    Returns:
        (N, Q) float64, finite.
    """
    cols = []
    for dy, dx in queries:
        xq = torch.roll(x, shifts=(dy, dx), dims=(2, 3)) if (dy or dx) else x
        z = predict_logits(model, xq).double()  # (N, K)
        z_y = z.gather(1, y[:, None]).squeeze(1)
        others = z.scatter(1, y[:, None], float("-inf"))  # drop the true class
        phi = z_y - torch.logsumexp(others, 1)
        # a diverged model (inf logits) gives inf - inf: call that p = 1/2, and keep the
        # rest finite so AUCs are defined (float64 p saturates near |phi| = 37 anyway)
        cols.append(torch.nan_to_num(phi, nan=0.0).clamp(-100.0, 100.0).numpy())
    return np.stack(cols, 1)


def inclusion_masks(n_examples: int, n_shadows: int, seed: int) -> np.ndarray:
    """(S, N) bool: each example is IN for exactly S // 2 shadows (S even, >= 4: the
    Gaussians need two values per side)."""
    if n_shadows < 4 or n_shadows % 2:
        raise ValueError(f"n_shadows must be an even number >= 4, got {n_shadows}")
    rng = np.random.default_rng(seed)
    half = np.arange(n_shadows)[:, None] < n_shadows // 2  # (S, 1): first half IN
    order = np.argsort(rng.random((n_shadows, n_examples)), axis=0)  # a permutation per column
    return np.take_along_axis(np.broadcast_to(half, (n_shadows, n_examples)), order, 0)


def even_batches(config: TrainConfig, n: int) -> TrainConfig:
    """``config`` with the batch size that splits ``n`` rows into batches of equal size (to
    within one row per batch), keeping the number of steps per epoch.

    Why: ``train_classifier`` keeps a last partial batch, and BatchNorm on a batch of a few
    rows spoils the running statistics. Measured on digits (small CNN, 40 epochs): 642 rows
    in batches of 128 (the last one of 2) reach 97.5% train / 93.6% test accuracy, in six
    batches of 107 100% / 98.4%. Shadows, target and retrain differ in size by a few rows,
    so without this the attack would compare models of different quality.
    """
    steps = -(-n // config.batch_size)
    return dataclasses.replace(config, batch_size=-(-n // steps))


@dataclass(frozen=True)
class ShadowSet:
    """What the shadows saw and said: ``masks`` (S, N) bool, ``phi`` (S, N, Q)."""

    masks: np.ndarray
    phi: np.ndarray


def train_shadows(
    make_model: Callable[[int], nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    n_shadows: int,
    config: TrainConfig,
    seed: int = 0,
    queries: Sequence[Shift] = ((0, 0),),
    progress: Progress | None = None,
) -> ShadowSet:
    """Train ``n_shadows`` models (``make_model(i)`` gives shadow i's fresh weights) on random
    halves of the pool ``(x, y)`` with ``config`` (seed + 1 + i, :func:`even_batches`) and
    record phi of every pool example on each. Train the target with ``even_batches`` too."""
    masks = inclusion_masks(len(x), n_shadows, seed)
    phis = []
    for i, mask in enumerate(masks):
        keep = torch.from_numpy(mask)
        cfg = even_batches(dataclasses.replace(config, seed=config.seed + 1 + i), int(mask.sum()))
        model = train_classifier(make_model(i), x[keep], y[keep], cfg)
        phis.append(logit_confidence(model, x, y, queries))
        if progress:
            progress(i + 1, n_shadows, f"shadow {i + 1}/{n_shadows}")
    return ShadowSet(masks, np.stack(phis))


@dataclass(frozen=True)
class LiraFit:
    """Per-example Gaussians, each (N, Q): IN and OUT means and standard deviations."""

    mu_in: np.ndarray
    mu_out: np.ndarray
    sd_in: np.ndarray
    sd_out: np.ndarray


def fit_lira(shadows: ShadowSet, variance: str = "auto", min_per_example: int = 32) -> LiraFit:
    """Fit the IN/OUT Gaussians; ``variance`` is ``global`` (one s per side and query, pooled
    over examples), ``per-example``, or ``auto`` (per-example once every example has at least
    ``min_per_example`` shadows on each side, as the paper recommends)."""
    if variance not in ("auto", "global", "per-example"):
        raise ValueError(f"variance must be auto, global or per-example, got {variance!r}")
    m = shadows.masks[:, :, None].astype(np.float64)  # (S, N, 1)
    phi = shadows.phi
    n_in, n_out = m.sum(0), (1 - m).sum(0)  # (N, 1)
    if (n_in < 2).any() or (n_out < 2).any():  # one value per side has no spread to fit
        raise ValueError("every example needs at least two IN and two OUT shadows")
    mu_in = (phi * m).sum(0) / n_in
    mu_out = (phi * (1 - m)).sum(0) / n_out
    r_in, r_out = (phi - mu_in) * m, (phi - mu_out) * (1 - m)  # residuals, zero elsewhere
    per_example = variance == "per-example" or (
        variance == "auto" and min(n_in.min(), n_out.min()) >= min_per_example)
    if per_example:
        sd_in = np.sqrt((r_in**2).sum(0) / np.maximum(n_in - 1, 1))
        sd_out = np.sqrt((r_out**2).sum(0) / np.maximum(n_out - 1, 1))
    else:  # pooled: degrees of freedom = observations - one mean per example
        dof_in, dof_out = max(m.sum() - len(n_in), 1), max((1 - m).sum() - len(n_out), 1)
        sd_in = np.broadcast_to(np.sqrt((r_in**2).sum((0, 1)) / dof_in), mu_in.shape)
        sd_out = np.broadcast_to(np.sqrt((r_out**2).sum((0, 1)) / dof_out), mu_out.shape)
    floor = 1e-3  # a constant phi (e.g. a saturated example) must not divide by zero
    return LiraFit(mu_in, mu_out, np.maximum(sd_in, floor), np.maximum(sd_out, floor))


def _log_normal(v: np.ndarray, mu: np.ndarray, sd: np.ndarray) -> np.ndarray:
    return -0.5 * ((v - mu) / sd) ** 2 - np.log(sd) - 0.5 * np.log(2 * np.pi)


def lira_scores(fit: LiraFit, phi: np.ndarray, idx: np.ndarray | None = None,
                offline: bool = False) -> np.ndarray:
    """Membership score per example (higher = member), summed over queries.

    Args:
        phi: (n, Q) target-model confidences (:func:`logit_confidence`).
        idx: (n,) the pool rows of those examples; default: all rows, in order.
        offline: use only the OUT Gaussians (one-sided test).
    """
    sel = slice(None) if idx is None else np.asarray(idx)
    mu_in, mu_out = fit.mu_in[sel], fit.mu_out[sel]
    sd_in, sd_out = fit.sd_in[sel], fit.sd_out[sel]
    if phi.shape != mu_out.shape:
        raise ValueError(f"phi has shape {phi.shape}, the fit rows {mu_out.shape}")
    if offline:
        from scipy.stats import norm

        return -norm.logsf((phi - mu_out) / sd_out).sum(1)
    return (_log_normal(phi, mu_in, sd_in) - _log_normal(phi, mu_out, sd_out)).sum(1)


def attack_auc(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> float:
    """ROC AUC of "score above threshold = member": 0.5 is chance, below 0.5 means the
    members score *lower* (still a distinguishable set, see :func:`two_sided`)."""
    from sklearn.metrics import roc_auc_score

    labels = np.r_[np.ones(len(member_scores)), np.zeros(len(nonmember_scores))]
    return float(roc_auc_score(labels, np.r_[member_scores, nonmember_scores]))


def two_sided(auc: float) -> float:
    """max(AUC, 1 - AUC): how well an attacker who may flip the threshold separates them."""
    return max(auc, 1.0 - auc)


def tpr_at_fpr(member_scores: np.ndarray, nonmember_scores: np.ndarray, fpr: float) -> float:
    """Largest true-positive rate at a false-positive rate of at most ``fpr``."""
    from sklearn.metrics import roc_curve

    labels = np.r_[np.ones(len(member_scores)), np.zeros(len(nonmember_scores))]
    f, t, _ = roc_curve(labels, np.r_[member_scores, nonmember_scores])
    return float(t[f <= fpr + 1e-12].max())
