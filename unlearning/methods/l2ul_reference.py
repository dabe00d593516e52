"""The reference recipe of Cha et al. (AAAI 2024), as published in the official code.

Kept unchanged for comparison: targeted L2-PGD examples generated once
from the original model, a count-weighted loss ``(-sum CE_forget + sum CE_adv) / (n_f+n_a)``,
the inverted-MAS anchor with lambda 1, SGD lr 1e-3, BatchNorm in train mode, stop at 0%.
Only the reference code's bugs are fixed: targets uniform over the other classes, the
importance gradients zeroed per batch, no division by zero in the normalisation.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..attacks import adversarial_set
from ..devices import forward
from ..forget_set import ForgetSet, directional_ce
from ..importance import anchor_penalty, inverted_importance, mas_importance
from .loop import Context
from .registry import register


@dataclass(frozen=True)
class L2ULReferenceConfig:
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    forget_batch: int = 32
    adv_batch: int = 256
    adv_per_instance: int = 20
    pgd_eps: float = 4.0
    pgd_step: float = 0.1
    pgd_steps: int = 100
    reg_lambda: float = 1.0
    use_importance: bool = True
    max_steps: int = 2000


@register("l2ul-reference", L2ULReferenceConfig,
          "the published L2UL recipe: adversarial examples + inverted MAS importance")
def l2ul_reference(model, forget: ForgetSet, cfg: L2ULReferenceConfig, retain, ctx: Context) -> None:
    num_classes = forward(model, forget.x[:1]).shape[1]
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    weights = inverted_importance(mas_importance(model, forget.x, cfg.forget_batch)) \
        if cfg.use_importance else {}
    # Relabel rows are pushed to their new label, so their adversarial targets avoid it too.
    avoid = forget.key_label
    x_adv, y_adv, _ = adversarial_set(model, forget.x, avoid, num_classes, cfg.adv_per_instance,
                                      cfg.pgd_eps, cfg.pgd_step, cfg.pgd_steps, ctx.g)
    ctx.info["adversarial_examples"] = len(x_adv)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    k = len(forget)
    forget_batches = itertools.cycle(
        [torch.arange(b, min(b + cfg.forget_batch, k)) for b in range(0, k, cfg.forget_batch)])
    while not ctx.done:  # one pass over the adversarial set per "epoch", as in the reference
        for a in range(0, len(x_adv), cfg.adv_batch):
            part = forget.subset(next(forget_batches))
            xa, ya = x_adv[a : a + cfg.adv_batch], y_adv[a : a + cfg.adv_batch]
            n_f, n_a = len(part), len(xa)
            model.train()
            loss = (directional_ce(forward(model, part.x), part, "sum")
                    + F.cross_entropy(forward(model, xa), ya, reduction="sum")) / (n_f + n_a)
            if weights:
                loss = loss + cfg.reg_lambda * anchor_penalty(model, anchor, weights)
            if ctx.step(opt, loss):
                return
