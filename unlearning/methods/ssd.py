"""``ssd``: Selective Synaptic Dampening, a one-shot, retraining-free edit of the weights.

Reference: Jack Foster, Stefan Schoepf, Alexandra Brintrup, "Fast Machine Unlearning Without
Retraining Through Selective Synaptic Dampening", AAAI 2024, arXiv:2308.07707 (code:
if-loops/selective-synaptic-dampening). With []_D the diagonal Fisher information (mean
squared gradient of the CE loss) on the training data and []_f on the forget set, every
weight with []_f > alpha * []_D is multiplied by beta = min(lambda * []_D / []_f, 1); the paper's
defaults are alpha=10, lambda=1. Here []_D is estimated on the retain sample
(``needs_retain=True``), per sample (``batch_size=1``: a true diagonal Fisher, which makes the
forget and retain estimates comparable whatever their sizes).

Adaptation to our objectives: the forget Fisher is taken on the label each row must lose
(``avoid``: the original label or prediction), for relabel rows too. SSD cannot aim at a
label, so a relabel objective is only met by chance, and a misclassify objective only if the
dampening is strong enough: after dampening the objective is checked and ``reached=False`` is
reported honestly when it does not hold. Context loop: one dampening pass is one step
(:func:`count_step`, no optimiser); the default ``max_steps=1`` is the paper's one-shot SSD.
With ``max_steps > 1``, pass r re-applies SSD to the original weights with the looser
selection alpha * alpha_decay^r, until the objective holds (an escalation, not in the paper).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..devices import forward
from ..forget_set import ForgetSet, RetainSample
from .loop import Context
from .peer_utils import count_step
from .registry import register


def diagonal_fisher(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                    batch_size: int = 1) -> dict[str, torch.Tensor]:
    """Mean over batches of the squared gradient of the batch-mean CE, per parameter, in eval
    mode (``batch_size=1``: the empirical diagonal Fisher). The model's mode and ``.grad``
    are left untouched."""
    if len(x) == 0 or batch_size < 1:
        raise ValueError("need at least one row and batch_size >= 1")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    was_training = model.training
    model.eval()
    n_batches = 0
    for b in range(0, len(x), batch_size):
        loss = F.cross_entropy(forward(model, x[b : b + batch_size]),
                               y[b : b + batch_size])
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for n, g in zip(params, grads):
            if g is not None:
                fisher[n] += g.pow(2)
        n_batches += 1
    model.train(was_training)
    return {n: f / n_batches for n, f in fisher.items()}


def dampening_factors(forget_imp: dict[str, torch.Tensor], retain_imp: dict[str, torch.Tensor],
                      alpha: float, lam: float) -> dict[str, torch.Tensor]:
    """Per weight: min(lam * I_D / I_f, 1) where I_f > alpha * I_D, else 1."""
    out = {}
    for n, f in forget_imp.items():
        d = retain_imp[n]
        selected = f > alpha * d
        beta = (lam * d / f.clamp_min(torch.finfo(f.dtype).tiny)).clamp(max=1.0)
        out[n] = torch.where(selected, beta, torch.ones_like(f))
    return out


@dataclass(frozen=True)
class SSDConfig:
    alpha: float = 10.0  # selection weighting (the paper's default)
    lam: float = 1.0  # dampening constant (the paper's default)
    batch_size: int = 1  # rows per gradient in the Fisher estimates
    max_steps: int = 1  # dampening passes; 1 = the paper's one-shot SSD
    alpha_decay: float = 0.5  # pass r uses alpha * alpha_decay**r (only with max_steps > 1)


@register("ssd", SSDConfig,
          "one-shot dampening of weights far more important (Fisher) for the forget set "
          "than for the retain sample (Foster et al., AAAI 2024)", needs_retain=True)
def ssd(model, forget: ForgetSet, cfg: SSDConfig, retain: RetainSample, ctx: Context) -> None:
    forget_imp = diagonal_fisher(model, forget.x, forget.avoid, cfg.batch_size)
    retain_imp = diagonal_fisher(model, retain.x, retain.y.long(), cfg.batch_size)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    alpha = cfg.alpha
    while not ctx.done:
        factors = dampening_factors(forget_imp, retain_imp, alpha, cfg.lam)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in factors:
                    p.copy_(original[n] * factors[n])
        ctx.info["dampened_weights"] = int(sum((f < 1).sum().item() for f in factors.values()))
        ctx.info["alpha"] = alpha
        count_step(ctx)
        alpha *= cfg.alpha_decay
