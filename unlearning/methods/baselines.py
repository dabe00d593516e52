"""Forget-set-only baselines: gradient ascent (NegGrad) and random labels."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..attacks import random_other_labels
from ..devices import forward
from ..forget_set import ForgetSet, directional_ce
from .loop import Context
from .registry import register


@dataclass(frozen=True)
class NegGradConfig:
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 32
    max_steps: int = 1000
    train_mode: bool = True  # as in the reference code: BatchNorm in train mode


@register("neggrad", NegGradConfig,
          "gradient ascent on the forget set (descent to the new label for relabel rows)")
def neggrad(model, forget: ForgetSet, cfg: NegGradConfig, retain, ctx: Context) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    while not ctx.done:
        for b in range(0, len(forget), cfg.batch_size):
            part = forget.subset(torch.arange(b, min(b + cfg.batch_size, len(forget))))
            model.train(cfg.train_mode and len(part) > 1)
            if ctx.step(opt, directional_ce(forward(model, part.x), part)):
                return


@dataclass(frozen=True)
class RandomLabelConfig:
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 32
    max_steps: int = 1000
    train_mode: bool = True


@register("random-label", RandomLabelConfig,
          "fine-tune the forget set on random wrong labels (new labels for relabel rows)")
def random_label(model, forget: ForgetSet, cfg: RandomLabelConfig, retain, ctx: Context) -> None:
    num_classes = forward(model, forget.x[:1]).shape[1]
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    while not ctx.done:
        for b in range(0, len(forget), cfg.batch_size):
            part = forget.subset(torch.arange(b, min(b + cfg.batch_size, len(forget))))
            target = torch.where(part.is_relabel, part.relabel_to,
                                 random_other_labels(part.avoid, num_classes, ctx.g))
            model.train(cfg.train_mode and len(part) > 1)
            if ctx.step(opt, F.cross_entropy(forward(model, part.x), target)):
                return
