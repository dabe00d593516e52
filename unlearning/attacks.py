"""Targeted L2 PGD in [0, 1] pixel space (Madry et al.; the reference code used advertorch)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .devices import forward


def random_other_labels(y: torch.Tensor, num_classes: int, g: torch.Generator) -> torch.Tensor:
    """A label drawn uniformly from the classes other than ``y`` (per element).

    The reference code drew over all classes and replaced a collision with class C//2,
    which sometimes targets the true label; drawing from C-1 and skipping ``y`` does not.
    """
    if num_classes < 2:
        raise ValueError("need at least two classes")
    r = torch.randint(0, num_classes - 1, y.shape, generator=g).to(y.device)
    return r + (r >= y).long()


def _l2_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.dim() - 1)))


def _project(delta: torch.Tensor, eps: float) -> torch.Tensor:
    factor = (eps / _l2_norm(delta)).clamp(max=1.0)
    return delta * factor


def l2_pgd_targeted(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    eps: float,
    step_size: float,
    steps: int,
    g: torch.Generator,
    rand_init: bool = True,
) -> torch.Tensor:
    """Return x_adv with ||x_adv - x||_2 <= eps, x_adv in [0, 1], pushed toward ``target``.

    Runs the model in eval mode (BatchNorm running statistics) and restores its mode.
    Random init follows advertorch: a uniform point in [0, 1]^d projected on the ball.
    """
    if eps <= 0 or steps < 0:
        raise ValueError("eps must be > 0 and steps >= 0")
    was_training = model.training
    model.eval()
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        x = x.detach()
        if rand_init:
            delta = torch.rand(x.shape, generator=g) - x
            delta = _project(delta, eps)
            delta = (x + delta).clamp(0, 1) - x
        else:
            delta = torch.zeros_like(x)
        for _ in range(steps):
            delta.requires_grad_(True)
            loss = F.cross_entropy(forward(model, x + delta), target, reduction="sum")
            (grad,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                delta = delta - step_size * grad / _l2_norm(grad)  # minimise CE to the target
                delta = (x + delta).clamp(0, 1) - x
                delta = _project(delta, eps)
        return (x + delta).detach()
    finally:
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
        model.train(was_training)


def adversarial_set(
    model: nn.Module,
    x: torch.Tensor,
    avoid: torch.Tensor,
    num_classes: int,
    per_instance: int,
    eps: float,
    step_size: float,
    steps: int,
    g: torch.Generator,
    batch_size: int = 512,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``per_instance`` targeted examples of every forget instance, each round a fresh target.

    Returns (x_adv, target, source_index); rounds are outer, instances inner, as in the
    reference code. Targets avoid ``avoid`` (the label the instance must move away from).
    """
    xs, ts, src = [], [], []
    idx = torch.arange(len(x))
    for _ in range(per_instance):
        t = random_other_labels(avoid, num_classes, g)
        for b in range(0, len(x), batch_size):
            xs.append(l2_pgd_targeted(model, x[b : b + batch_size], t[b : b + batch_size],
                                      eps, step_size, steps, g))
        ts.append(t)
        src.append(idx)
    if not xs:
        return x[:0], avoid[:0], idx[:0]
    return torch.cat(xs), torch.cat(ts), torch.cat(src)
