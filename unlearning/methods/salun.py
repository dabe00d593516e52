"""``salun``: gradient-based weight saliency, then random-label fine-tuning of the salient
weights only.

Reference: Chongyu Fan, Jiancheng Liu, Yihua Zhang, Eric Wong, Dennis Wei, Sijia Liu,
"SalUn: Empowering Machine Unlearning via Gradient-based Weight Saliency in Both Image
Classification and Generation", ICLR 2024, arXiv:2310.12508 (code: OPTML-Group/Unlearn-Saliency).
The mask keeps the top ``mask_fraction`` of all weights by |gradient of the forget loss|
(one global threshold over every parameter tensor; the paper's default keeps 50%); the update
is the paper's RL (random labels on the forget set, mixed with retain rows when a retain
sample is given) with the gradient multiplied by the mask.

Adaptation to our objectives: the saliency gradient is that of the directional forget loss
(-CE toward ``avoid`` for misclassify rows, CE toward the new label for relabel rows; for
misclassify its magnitude equals the paper's |grad CE|). The random labels are drawn once,
as the reference code does, from the classes other than ``avoid`` (the reference drew over
all classes, so sometimes the true one); relabel rows use their new label. Weight decay is 0
so that weights outside the mask stay exactly where they were (the reference decays all
weights). Context loop: masked SGD steps through ``ctx.step`` until the objective holds or
``max_steps``.

Learning rate: the smallest of {1e-5, 1e-4, 1e-3} that reaches both objectives at k=32
within ``max_steps`` on digits (forget seed 0); the paper searches it per dataset too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..devices import forward
from ..forget_set import ForgetSet, RetainSample, directional_ce
from .loop import Context
from .peer_utils import num_classes_of, shuffled_batches, wrong_labels
from .registry import register


def saliency_mask(model: nn.Module, forget: ForgetSet, fraction: float) -> dict[str, torch.Tensor]:
    """Per parameter, a 0/1 float mask: 1 for the ``fraction`` of all weights (one global
    ranking) with the largest |d forget-loss / d theta|, computed in eval mode.

    Exactly ``round(fraction * total)`` ones (ties broken by ``topk``).
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"mask fraction must be in [0, 1], got {fraction}")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    was_training = model.training
    model.eval()
    grads = torch.autograd.grad(directional_ce(forward(model, forget.x), forget), list(params.values()),
                                allow_unused=True)
    model.train(was_training)
    flat = torch.cat([(torch.zeros_like(p) if g is None else g.abs()).flatten()
                      for p, g in zip(params.values(), grads)])
    keep = torch.zeros_like(flat)
    k = round(fraction * flat.numel())
    if k:
        keep[torch.topk(flat, k).indices] = 1.0
    out, offset = {}, 0
    for n, p in params.items():
        out[n] = keep[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    return out


class MaskedSGD(torch.optim.SGD):
    """SGD whose gradients are multiplied by a fixed 0/1 mask before every step; with
    ``weight_decay=0`` weights outside the mask never move (momentum only sees masked grads)."""

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor], **kwargs):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        super().__init__([p for _, p in named], **kwargs)
        self._masked = [(p, masks[n]) for n, p in named if n in masks]

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        for p, m in self._masked:
            if p.grad is not None:
                p.grad.mul_(m)
        return super().step(closure)


@dataclass(frozen=True)
class SalUnConfig:
    mask_fraction: float = 0.5  # share of weights that may move (the paper's default)
    lr: float = 1e-4  # see below
    momentum: float = 0.9
    batch_size: int = 32  # forget rows per step (as many retain rows join it)
    max_steps: int = 1000
    train_mode: bool = True  # as the reference code: BatchNorm in train mode


@register("salun", SalUnConfig,
          "saliency-masked random-label fine-tuning (Fan et al., ICLR 2024); retain rows "
          "join the batches if given", accepts_retain=True)
def salun(model, forget: ForgetSet, cfg: SalUnConfig, retain: RetainSample | None,
          ctx: Context) -> None:
    masks = saliency_mask(model, forget, cfg.mask_fraction)
    ctx.info["salient_weights"] = int(sum(m.sum().item() for m in masks.values()))
    targets = wrong_labels(forget, num_classes_of(model, forget.x), ctx.g)
    opt = MaskedSGD(model, masks, lr=cfg.lr, momentum=cfg.momentum, weight_decay=0.0)
    forget_batches = shuffled_batches(len(forget), cfg.batch_size, ctx.g)
    retain_batches = shuffled_batches(len(retain.x), cfg.batch_size, ctx.g) \
        if retain is not None else None
    while not ctx.done:
        idx = next(forget_batches)
        x, y = forget.x[idx], targets[idx]
        if retain is not None and retain_batches is not None:
            ridx = next(retain_batches)
            x, y = torch.cat([x, retain.x[ridx]]), torch.cat([y, retain.y[ridx].long()])
        model.train(cfg.train_mode and len(x) > 1)
        ctx.step(opt, F.cross_entropy(forward(model, x), y))
