"""Deterministic supervised training and evaluation helpers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .devices import forward

Progress = Callable[[int, int, str], None]  # (done, total, message)


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch and make CPU kernels deterministic; return a generator for sampling."""
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    return torch.Generator().manual_seed(seed)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 5
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    augment: bool = False  # random shifts by up to 2 pixels


MIN_TAIL = 16  # smallest last batch trained on its own


def _shift(x: torch.Tensor, g: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    dx, dy = torch.randint(-max_shift, max_shift + 1, (2,), generator=g).tolist()
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def steps_per_epoch(rows: int, batch_size: int) -> int:
    """Optimiser steps per epoch of :func:`train_classifier` on ``rows`` rows."""
    steps = (rows + batch_size - 1) // batch_size
    if steps > 1 and 0 < rows % batch_size < MIN_TAIL:
        steps -= 1  # a tail of a few rows joins the last batch: BatchNorm statistics
        # of 1-2 images are noise (a 2-row tail cost a retrained digits model 5 points)
    return steps


def train_classifier(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    config: TrainConfig,
    progress: Progress | None = None,
) -> nn.Module:
    """SGD with a cosine schedule; same seed and data give the same weights on CPU.

    Runs where the model is (batches move to it); ``x`` and ``y`` stay where they are."""
    g = seed_everything(config.seed)
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                          weight_decay=config.weight_decay, nesterov=True)
    per_epoch = steps_per_epoch(len(x), config.batch_size)
    total = config.epochs * per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=max(total, 1),
                                                pct_start=0.15)
    model.train()
    step = 0
    for epoch in range(config.epochs):
        order = torch.randperm(len(x), generator=g)
        running = 0.0
        for b in range(per_epoch):
            end = len(x) if b + 1 == per_epoch else (b + 1) * config.batch_size
            idx = order[b * config.batch_size : end]
            xb = x[idx]
            if config.augment:
                xb = _shift(xb, g)
            loss = F.cross_entropy(forward(model, xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            running += loss.item()
            if progress and (b + 1 == per_epoch or step % 50 == 0):
                progress(step, total, f"epoch {epoch + 1}/{config.epochs} loss {running / (b + 1):.3f}")
    model.eval()
    return model


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Logits in eval mode, batched, on ``x``'s device (the model runs on its own);
    restores the model's previous mode."""
    was_training = model.training
    model.eval()
    out = torch.cat([forward(model, x[i : i + batch_size]) for i in range(0, len(x), batch_size)]) \
        if len(x) else torch.empty(0)
    model.train(was_training)
    return out


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in percent (0.0 for an empty set)."""
    if len(x) == 0:
        return 0.0
    return 100.0 * (predict_logits(model, x).argmax(1) == y).float().mean().item()


def pretrain(dataset, arch: str, config: TrainConfig, progress: Progress | None = None,
             device: torch.device | str | None = None):
    """Build ``arch`` for ``dataset`` and train it on the whole training split, on ``device``
    (default: the CPU). The initial weights are drawn on the CPU, so they do not depend on
    the device.

    Returns (model, spec), the model on ``device``. Deterministic for a seed on CPU.
    """
    from .models import build_model, spec_for

    spec = spec_for(arch, dataset)
    torch.manual_seed(config.seed)
    model = build_model(spec)
    if device is not None:
        model.to(device)
    train_classifier(model, dataset.train_x, dataset.train_y, config, progress)
    return model, spec
