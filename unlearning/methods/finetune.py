"""``finetune`` (FT): fine-tune on retain data only and rely on catastrophic forgetting.

References: the "Fine-tune" baseline of Golatkar, Achille & Soatto, "Eternal Sunshine of the
Spotless Net: Selective Forgetting in Deep Networks", CVPR 2020, arXiv:1911.04933; FT as
benchmarked by SalUn (Fan et al., ICLR 2024) after Warnecke et al., "Machine Unlearning of
Features and Labels", NDSS 2023, arXiv:2108.11577. The peers run it for a few epochs on the
full retain set; here it sees the <=1% retain sample (``needs_retain=True``).

Adaptation to our objectives: ``misclassify`` rows are simply absent from the training data
(the method never looks at them), so the objective is reached only if forgetting happens on
its own; with a small retain sample it usually is not, and ``reached=False`` says so.
``relabel`` rows are trained with their new label in every batch, next to the retain rows,
as retraining with corrected labels would. Context loop: SGD steps through ``ctx.step``,
``while not ctx.done``, so it stops at ``max_steps`` or as soon as every row is satisfied. Learning rate: the smallest of
{1e-4, 1e-3, 1e-2} that reaches relabel at k=32 within ``max_steps`` on digits (forget seed 0;
SalUn searches FT's in [1e-4, 1e-1]).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..devices import forward
from ..forget_set import ForgetSet, RetainSample
from .loop import Context
from .peer_utils import shuffled_batches
from .registry import register


@dataclass(frozen=True)
class FinetuneConfig:
    lr: float = 1e-3  # see the module docstring
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64  # retain rows per step
    max_steps: int = 200
    train_mode: bool = True  # as the peers' code: BatchNorm in train mode


@register("finetune", FinetuneConfig,
          "fine-tune on the retain sample (relabel rows join with their new label)",
          needs_retain=True)
def finetune(model, forget: ForgetSet, cfg: FinetuneConfig, retain: RetainSample,
             ctx: Context) -> None:
    relabel = forget.is_relabel
    x_new, y_new = forget.x[relabel], forget.relabel_to[relabel]
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    batches = shuffled_batches(len(retain.x), cfg.batch_size, ctx.g)
    while not ctx.done:
        idx = next(batches)
        x = torch.cat([retain.x[idx], x_new])
        y = torch.cat([retain.y[idx].long(), y_new])
        model.train(cfg.train_mode and len(x) > 1)
        ctx.step(opt, F.cross_entropy(forward(model, x), y))
