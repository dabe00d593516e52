"""Data-free anchor inputs: model inversion from BatchNorm statistics (Yin et al., 2020).

A trained network's BatchNorm layers hold the mean and variance of its training data's
features at every depth. Optimising a few images so their batch statistics match those, and
so the network assigns them a spread of classes, yields inputs that exercise the network
roughly the way its training data did -- without any training data. L2UL uses them as
anchors: the unlearned model must keep the original model's outputs on them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .devices import forward


def has_batchnorm(model: nn.Module) -> bool:
    """Whether the model has BatchNorm layers with running statistics to invert."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
               for m in model.modules())


def invert_batchnorm(
    model: nn.Module,
    init: torch.Tensor,
    steps: int,
    g: torch.Generator,
    lr: float = 0.05,
    bn_weight: float = 10.0,
) -> torch.Tensor:
    """Return images in [0, 1] optimised from ``init`` toward the model's BN statistics.

    Each image gets a random target class; the loss is CE to it plus ``bn_weight`` times the
    relative distance of every BatchNorm layer's batch mean/variance to its running values.
    The model is left unchanged (eval mode, gradients restored). A model without BatchNorm
    statistics (:func:`has_batchnorm`) has nothing to invert: ``init`` comes back unchanged,
    so callers that want inverted images check first.
    """
    bns = [m for m in model.modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]
    if steps <= 0 or not bns or len(init) < 2:
        return init.detach().clone()
    was_training = model.training
    model.eval()
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    gaps: list[torch.Tensor] = []

    def hook(module, inputs, _output):
        h = inputs[0]
        dims = [0] + list(range(2, h.dim()))
        mu, var = h.mean(dims), h.var(dims, unbiased=False)
        gaps.append((mu - module.running_mean).norm() / module.running_mean.norm().clamp_min(1e-3)
                    + (var - module.running_var).norm() / module.running_var.norm().clamp_min(1e-3))

    handles = [b.register_forward_hook(hook) for b in bns]
    try:
        with torch.no_grad():
            num_classes = forward(model, init[:1]).shape[1]
        target = torch.randint(0, num_classes, (len(init),), generator=g)
        z = torch.logit(init.clamp(0.02, 0.98)).detach().requires_grad_(True)
        opt = torch.optim.Adam([z], lr=lr)
        for _ in range(steps):
            gaps.clear()
            loss = F.cross_entropy(forward(model, torch.sigmoid(z)), target) \
                + bn_weight * sum(gaps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return torch.sigmoid(z).detach()
    finally:
        for h in handles:
            h.remove()
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
        model.train(was_training)
