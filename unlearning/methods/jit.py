"""``jit``: Just in Time unlearning, zero-shot, by Lipschitz regularisation around each
forget instance.

Reference: Jack Foster, Kyle Fogarty, Stefan Schoepf, Cengiz Öztireli, Alexandra Brintrup,
"Zero-Shot Machine Unlearning at Scale via Lipschitz Regularization", arXiv:2402.01401, 2024
(code: jwf40/Information-Theoretic-Unlearning, ``lipschitz.py``). For each forget instance x,
``n_samples`` noisy copies x' = clip(x + N(0, sigma^2)) are drawn and the model is updated
with plain SGD to minimise the mean of ||f(x) - f(x')||_2 / ||x - x'||_2 (f: logits; f(x') is
held fixed, only f(x) carries gradient, as in the reference). Making the function flat around
x removes what is specific to x. Forget set only; nothing else is needed.

Adaptation to our objectives: the smoothing term is applied to every row; for ``relabel``
rows a CE term toward the new label (``relabel_weight``) is added, since smoothing alone can
never move an instance to a chosen class. ``misclassify`` rows get no extra term: JiT does
not aim at misclassification, so the objective may not be reached (``reached=False``, no
pretending). The reference runs one epoch (``epochs=1``, the default: on digits, repeating
epochs until the objective holds flattens the whole model); each batch is a ``ctx.step``,
and the loop also ends at ``max_steps`` or as soon as the objective holds. BatchNorm stays in eval mode
(``train_mode=False``): statistics of a few forget images are not the data's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..devices import forward
from ..forget_set import ForgetSet
from .loop import Context
from .peer_utils import shuffled_batches
from .registry import register


def lipschitz_loss(model: nn.Module, x: torch.Tensor, sigma: float, n_samples: int,
                   g: torch.Generator) -> torch.Tensor:
    """Mean over rows and noise draws of ||f(x) - f(x')|| / ||x - x'||, x' = clip(x + noise).

    x: (N, C, H, W) in [0, 1]; f(x') is computed without gradient.
    """
    if sigma <= 0 or n_samples < 1:
        raise ValueError("need sigma > 0 and n_samples >= 1")
    out = forward(model, x)
    noisy = (x.unsqueeze(0) + sigma * torch.randn((n_samples, *x.shape), generator=g)).clamp(0, 1)
    with torch.no_grad():
        out_noisy = forward(model, noisy.flatten(0, 1)).view(n_samples, len(x), -1)
    in_norm = (noisy - x.unsqueeze(0)).flatten(2).norm(dim=2).clamp_min(1e-12)  # (S, N)
    out_norm = (out.unsqueeze(0) - out_noisy).norm(dim=2)  # (S, N)
    return (out_norm / in_norm).mean()


@dataclass(frozen=True)
class JiTConfig:
    sigma: float = 0.01  # noise std in [0, 1] pixels (the reference's VGG16 setting)
    n_samples: int = 25
    lr: float = 3e-4  # plain SGD (the reference's VGG16 setting)
    relabel_weight: float = 1.0
    batch_size: int = 128  # the reference's forget loader
    epochs: int = 1  # passes over the forget set (the reference: one)
    max_steps: int = 200
    train_mode: bool = False


@register("jit", JiTConfig,
          "zero-shot: smooth the model around each forget instance (Lipschitz penalty on "
          "input noise; Foster et al. 2024)")
def jit(model, forget: ForgetSet, cfg: JiTConfig, retain, ctx: Context) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    batches = shuffled_batches(len(forget), cfg.batch_size, ctx.g)
    per_epoch = (len(forget) + cfg.batch_size - 1) // cfg.batch_size
    for _ in range(cfg.epochs * per_epoch):
        if ctx.done:
            return
        part = forget.subset(next(batches))
        model.train(cfg.train_mode and len(part) > 1)
        loss = lipschitz_loss(model, part.x, cfg.sigma, cfg.n_samples, ctx.g)
        if bool(part.is_relabel.any()):
            rel = part.is_relabel
            loss = loss + cfg.relabel_weight * F.cross_entropy(forward(model, part.x[rel]),
                                                               part.relabel_to[rel])
        ctx.step(opt, loss)
