"""MAS weight importance (Aljundi et al., 2018) on the forget set, inverted for L2UL.

Importance of a weight = mean |d ||f(x)|| / d theta| over the forget instances: how much the
network's output on them depends on it. L2UL inverts the per-tensor min-max normalised
importance, so weights that carry the forget instances are free to move (penalty ~0) and the
rest are anchored (penalty ~1) to the pre-trained values.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .devices import forward

Importance = dict[str, torch.Tensor]


def mas_importance(
    model: nn.Module, x: torch.Tensor, batch_size: int = 32, squared: bool = False,
    train_mode: bool = True,
) -> Importance:
    """|gradient| of the batch-mean L2 norm of the logits, averaged over batches.

    ``squared=False`` and ``train_mode=True`` follow the reference code; unlike it, the
    gradients of the copy are zeroed per batch (the reference accumulated them).
    """
    work = copy.deepcopy(model)
    work.train(train_mode)
    params = {n: p for n, p in work.named_parameters() if p.requires_grad}
    omega = {n: torch.zeros_like(p) for n, p in params.items()}
    n_seen = 0
    for b in range(0, len(x), batch_size):
        xb = x[b : b + batch_size]
        if train_mode and len(xb) < 2:  # BatchNorm in train mode needs two samples
            work.eval()
        work.zero_grad(set_to_none=True)
        norms = forward(work, xb).norm(p=2, dim=1)
        loss = (norms.pow(2) if squared else norms).mean()
        loss.backward()
        for n, p in params.items():
            if p.grad is not None:
                omega[n] += p.grad.abs() * len(xb)
        n_seen += len(xb)
        work.train(train_mode)
    return {n: o / max(n_seen, 1) for n, o in omega.items()}


def normalise_per_tensor(importance: Importance) -> Importance:
    """Min-max scale each tensor to [0, 1]; a constant tensor maps to 0 (no division by 0)."""
    out = {}
    for n, o in importance.items():
        lo, hi = o.min(), o.max()
        span = hi - lo
        out[n] = (o - lo) / span if span > 0 else torch.zeros_like(o)
    return out


def inverted_importance(importance: Importance) -> Importance:
    """Penalty weights 1 - normalised importance: ~0 for weights the forget set uses most."""
    return {n: 1.0 - o for n, o in normalise_per_tensor(importance).items()}


def anchor_penalty(model: nn.Module, anchor: dict[str, torch.Tensor],
                   weights: Importance) -> torch.Tensor:
    """sum_p sum_i w_i (theta_i - theta*_i)^2 / 2 over the parameters named in ``weights``."""
    total = torch.zeros(())
    for n, p in model.named_parameters():
        if n in weights:
            total = total + (weights[n] * (p - anchor[n]).pow(2)).sum() / 2
    return total
