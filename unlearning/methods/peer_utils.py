"""Helpers shared by the peer methods (retrain, finetune, salun, boundary-shrink, scrub, ssd,
jit): batching, the labels that decide each forget row, and re-initialisation.

Every method still updates the model only through ``ctx.step`` (gradient steps) or
:func:`count_step` (a step that is not a gradient step, e.g. one SSD dampening pass), so the
registry's ``max_steps`` bound and the per-step objective check hold for all of them.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from ..attacks import random_other_labels
from ..devices import forward
from ..forget_set import ForgetSet
from .loop import Context


@torch.no_grad()
def num_classes_of(model: nn.Module, x: torch.Tensor) -> int:
    """Number of logits, from one row in eval mode (no BatchNorm statistics are touched)."""
    was_training = model.training
    model.eval()
    n = forward(model, x[:1]).shape[1]
    model.train(was_training)
    return int(n)


def shuffled_batches(n: int, batch_size: int, g: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless index batches over ``range(n)``: a fresh permutation each pass, last batch short."""
    if n <= 0 or batch_size <= 0:
        raise ValueError(f"need n > 0 and batch_size > 0, got {n} and {batch_size}")
    while True:
        perm = torch.randperm(n, generator=g)
        for b in range(0, n, batch_size):
            yield perm[b : b + batch_size]


def wrong_labels(forget: ForgetSet, num_classes: int, g: torch.Generator) -> torch.Tensor:
    """Per row, a training target that satisfies the objective: the new label for relabel
    rows, a label drawn uniformly from the classes other than ``avoid`` for misclassify rows."""
    return torch.where(forget.is_relabel, forget.relabel_to,
                       random_other_labels(forget.avoid, num_classes, g))


def count_step(ctx: Context) -> bool:
    """Record one step that is not an optimiser step, then check the objective like
    ``ctx.step`` does. Returns True when the loop must end."""
    ctx.steps += 1
    ctx.reached = bool(ctx.forget.satisfied_by(ctx.model).all())
    return ctx.done


def reinitialise(model: nn.Module) -> int:
    """Reset every submodule that has ``reset_parameters`` (draws from torch's global RNG,
    which :func:`unlearning.methods.unlearn` seeds). Returns how many modules were reset."""
    n = 0
    for m in model.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()
            n += 1
    return n
