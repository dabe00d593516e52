"""``boundary-shrink``: relabel each forget instance to its nearest wrong class, found by
one FGSM step, and fine-tune on those labels.

Reference: Min Chen, Weizhuo Gao, Gaoyang Liu, Kai Peng, Chen Wang, "Boundary Unlearning:
Rapid Forgetting of Deep Networks via Shifting the Decision Boundary", CVPR 2023
(pp. 7766-7775), arXiv:2303.11570 (code: TY-LEE-KR/Boundary-Unlearning-Code; SalUn
re-implements it for random forgetting). The paper forgets whole classes; its Boundary Shrink
step is per instance (an untargeted L-inf FGSM step of size ``eps`` on the original model,
the adversarial prediction as the new label), so it applies to instance-wise deletion as is.
Forget set only.

Adaptation to our objectives: for ``misclassify`` rows the attack moves away from ``avoid``
and the target is the adversarial prediction with ``avoid`` excluded (where FGSM fails to
cross the boundary, the reference trains the row on its own label and forgets nothing; we
take the runner-up class instead). ``relabel`` rows are trained toward their new label (the
"nearest" class is imposed by the request). The labels come from the original model, once,
as in the reference (its frozen copy gives the same labels every epoch). Context loop: SGD
steps through ``ctx.step`` until the objective holds or ``max_steps``.

Learning rate: the reference uses SGD lr 1e-5 (momentum 0.9) for 10 epochs on CIFAR; on
digits 1e-5 does not reach misclassify at k=32 within 1000 steps, so the default is the
smallest of {1e-5, 1e-4, 1e-3} that does (forget seed 0).
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


def nearest_wrong_labels(model: nn.Module, x: torch.Tensor, avoid: torch.Tensor,
                         eps: float) -> torch.Tensor:
    """Per row, the class an FGSM step of L-inf size ``eps`` (in [0, 1] pixel space, away from
    ``avoid``) lands in, never ``avoid`` itself (the runner-up where the step does not cross).

    x: (N, C, H, W) in [0, 1]. Eval mode; the model's mode and gradients are left untouched.
    """
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    was_training = model.training
    model.eval()
    try:
        x = x.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(forward(model, x), avoid), x)
        with torch.no_grad():
            x_adv = (x + eps * grad.sign()).clamp(0, 1)
            logits = forward(model, x_adv)
            logits.scatter_(1, avoid[:, None], float("-inf"))
            return logits.argmax(1)
    finally:
        model.train(was_training)


@dataclass(frozen=True)
class BoundaryShrinkConfig:
    eps: float = 0.1  # FGSM bound, as the reference (L-inf, [0, 1] pixels)
    lr: float = 1e-4  # see the module docstring
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 32
    max_steps: int = 1000
    train_mode: bool = True  # as the reference code: BatchNorm in train mode


@register("boundary-shrink", BoundaryShrinkConfig,
          "fine-tune each forget instance toward its nearest wrong class found by FGSM "
          "(Chen et al., CVPR 2023)")
def boundary_shrink(model, forget: ForgetSet, cfg: BoundaryShrinkConfig, retain,
                    ctx: Context) -> None:
    nearest = nearest_wrong_labels(model, forget.x, forget.avoid, cfg.eps)
    targets = torch.where(forget.is_relabel, forget.relabel_to, nearest)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    batches = shuffled_batches(len(forget), cfg.batch_size, ctx.g)
    while not ctx.done:
        idx = next(batches)
        model.train(cfg.train_mode and len(idx) > 1)
        ctx.step(opt, F.cross_entropy(forward(model, forget.x[idx]), targets[idx]))
