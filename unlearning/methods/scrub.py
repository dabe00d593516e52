"""``scrub``: SCalable Remembering and Unlearning unBound, a max-min teacher-student game.

Reference: Meghdad Kurmanji, Peter Triantafillou, Jamie Hayes, Eleni Triantafillou, "Towards
Unbounded Machine Unlearning", NeurIPS 2023, arXiv:2302.09880 (code: meghdadk/SCRUB). The
student starts as the original model (the frozen teacher). Max steps push the student's
tempered softmax away from the teacher's on forget data (-KL); min steps keep it on retain
data: ``gamma * CE + alpha * KL``. Defaults are the reference notebooks' (T=4, alpha=0.001,
gamma=0.99, SGD lr 5e-4, momentum 0.9, weight decay 5e-4). Needs a retain sample.

Adaptation to our objectives: ``misclassify`` rows get the max step (-KL, unbounded: it
pushes until the prediction leaves ``avoid``); ``relabel`` rows are a descent on CE toward
their new label in the same step (SCRUB has no notion of a target label). The reference's
schedule (a few max epochs interleaved with min epochs, then min only) becomes: one max step,
then ``min_steps_per_max`` min steps, repeated; a min-only tail is pointless here since the
loop ends the moment the objective holds. Every step goes through ``ctx.step`` (counted
against ``max_steps``, objective checked after each).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..devices import forward
from ..forget_set import ForgetSet, RetainSample
from .loop import Context
from .peer_utils import shuffled_batches
from .registry import register


def tempered_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                temperature: float) -> torch.Tensor:
    """Per row KL(teacher_T || student_T) * T^2 (Hinton's scaling, as SCRUB's DistillKL)."""
    log_s = F.log_softmax(student_logits / temperature, 1)
    p_t = F.softmax(teacher_logits / temperature, 1)
    return F.kl_div(log_s, p_t, reduction="none").sum(1) * temperature ** 2


@dataclass(frozen=True)
class ScrubConfig:
    optimizer: str = "sgd"  # "sgd" (the reference notebooks: momentum 0.9, decay 5e-4) | "adam"
    lr: float = 5e-4  # the reference notebooks' sgda_learning_rate
    temperature: float = 4.0
    alpha: float = 0.001  # weight of the KL to the teacher on retain rows (min step)
    gamma: float = 0.99  # weight of the CE on retain rows (min step)
    min_steps_per_max: int = 1
    forget_batch_size: int = 32  # the reference notebooks' del_batch_size
    batch_size: int = 128  # retain rows per min step (the reference's sgda_batch_size)
    max_steps: int = 600
    train_mode: bool = True  # as the reference: student in train mode, teacher in eval


@register("scrub", ScrubConfig,
          "teacher-student max-min distillation: away from the teacher on the forget set, "
          "with it on the retain sample (Kurmanji et al., NeurIPS 2023)", needs_retain=True)
def scrub(model, forget: ForgetSet, cfg: ScrubConfig, retain: RetainSample,
          ctx: Context) -> None:
    teacher: nn.Module = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    if cfg.optimizer not in ("sgd", "adam"):
        raise ValueError(f"scrub optimizer must be 'sgd' or 'adam', got {cfg.optimizer!r}")
    opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr) \
        if cfg.optimizer == "adam" else \
        torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=5e-4)
    forget_batches = shuffled_batches(len(forget), cfg.forget_batch_size, ctx.g)
    retain_batches = shuffled_batches(len(retain.x), cfg.batch_size, ctx.g)
    while not ctx.done:
        part = forget.subset(next(forget_batches))  # max step
        model.train(cfg.train_mode and len(part) > 1)
        out = forward(model, part.x)
        with torch.no_grad():
            t = forward(teacher, part.x)
        kl = tempered_kl(out, t, cfg.temperature)
        ce_new = F.cross_entropy(out, part.key_label, reduction="none")
        if ctx.step(opt, torch.where(part.is_relabel, ce_new, -kl).mean()):
            return
        for _ in range(cfg.min_steps_per_max):  # min steps
            idx = next(retain_batches)
            x, y = retain.x[idx], retain.y[idx].long()
            model.train(cfg.train_mode and len(x) > 1)
            out = forward(model, x)
            with torch.no_grad():
                t = forward(teacher, x)
            loss = cfg.gamma * F.cross_entropy(out, y) \
                + cfg.alpha * tempered_kl(out, t, cfg.temperature).mean()
            if ctx.step(opt, loss):
                return
