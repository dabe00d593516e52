"""``retrain``: exact unlearning, training from scratch without the forget set.

References: Cao & Yang, "Towards Making Systems Forget with Machine Unlearning", IEEE S&P
2015 (retraining as the definition of exact unlearning); Bourtoule et al., "Machine
Unlearning", IEEE S&P 2021, arXiv:1912.03817 (retraining cost as the bar to beat). Every
peer benchmark (SalUn, SCRUB, SSD, JiT) reports it as the reference ("Retrain").

Adaptation to our objectives. Retraining has no objective of its own: it is what the model
would be had the forget rows never been seen. For ``relabel`` rows the rows are *not* removed
but trained with their new label (the model a team would have had with the corrected
labels); ``misclassify`` rows are removed. A retrained model usually still predicts a
removed row correctly (it generalises), so ``reached`` is often False for misclassify: that
is the honest reference, not a failure.

Two entry points, because the reference needs the full training set and the pipeline's
methods only ever see a small retain sample:

* :func:`retrain_reference` - the benchmark reference: the whole training split minus the
  forget rows (plus relabelled rows) with :func:`unlearning.train.train_classifier`, so for a
  misclassify forget set it gives the same weights as ``benchmark.retrain_without``.
* the registered method ``retrain`` (``needs_retain=True``): re-initialises the model and
  trains on the retain data it is given (plus relabelled rows). It is exact only when the
  caller passes the *full* training set minus the forget set as the retain sample; given a
  <=1% sample (``unlearn bench --retain-fraction``) it is a retrain on that sample alone,
  a degenerate model, and the rows say how many rows it trained on (``info.trained_on``).

Context loop: each optimiser step is counted against ``max_steps`` (which caps the schedule),
but there is no early stop on the objective: a retrain stopped when the forget rows happen
to be misclassified (a freshly initialised model misclassifies almost everything) would not
be a retrain.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..devices import forward
from ..forget_set import ForgetSet, RetainSample
from ..objectives import OBJECTIVES
from ..train import TrainConfig, train_classifier
from .loop import Context
from .peer_utils import reinitialise
from .registry import register


def training_data_without(train_x: torch.Tensor, train_y: torch.Tensor,
                          forget: ForgetSet) -> tuple[torch.Tensor, torch.Tensor]:
    """The training split with the forget rows removed and relabel rows put back with their
    new label (at their original position, so the data order matches a plain removal).

    Needs ``forget.ids`` (indices into the training split).
    """
    if len(forget.ids) != len(forget):
        raise ValueError("retraining needs the forget rows' training indices (ForgetSet.ids)")
    ids = torch.as_tensor(forget.ids, dtype=torch.long)
    y = train_y.clone()
    keep = torch.ones(len(train_x), dtype=torch.bool)
    relabel = forget.is_relabel
    y[ids[relabel]] = forget.relabel_to[relabel]
    keep[ids[~relabel]] = False
    return train_x[keep], y[keep]


def retrain_reference(model_factory: Callable[[], nn.Module], train_x: torch.Tensor,
                      train_y: torch.Tensor, forget: ForgetSet,
                      config: TrainConfig) -> tuple[nn.Module, float]:
    """Exact reference: a fresh model trained on :func:`training_data_without`.

    Returns (model in eval mode, seconds). Deterministic for ``config.seed`` on CPU.
    """
    x, y = training_data_without(train_x, train_y, forget)
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    model = model_factory()
    train_classifier(model, x, y, config)
    return model, time.perf_counter() - start


@dataclass(frozen=True)
class RetrainConfig:
    epochs: int = 30  # the digits pre-training recipe (unlearning.train.TrainConfig)
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    max_steps: int = 100_000  # caps epochs * steps per epoch


@register("retrain", RetrainConfig,
          "exact reference: re-initialise and train on the retain data given (exact only "
          "with the full training set minus the forget set; relabel rows keep their new label)",
          needs_retain=True, objectives=OBJECTIVES)  # as-if-unseen rows are simply left out
def retrain(model, forget: ForgetSet, cfg: RetrainConfig, retain: RetainSample,
            ctx: Context) -> None:
    relabel = forget.is_relabel
    x = torch.cat([retain.x, forget.x[relabel]])
    y = torch.cat([retain.y.long(), forget.relabel_to[relabel]])
    per_epoch = (len(x) + cfg.batch_size - 1) // cfg.batch_size
    total = min(cfg.epochs * per_epoch, ctx.max_steps)
    ctx.info.update(trained_on=len(x), reinitialised_modules=reinitialise(model))
    if total <= 0:
        return
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total,
                                                pct_start=0.15)
    model.train()
    while ctx.steps < total:
        order = torch.randperm(len(x), generator=ctx.g)
        for b in range(per_epoch):
            if ctx.steps >= total:
                break
            idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            model.train(len(idx) > 1)  # BatchNorm needs two rows in train mode
            loss = F.cross_entropy(forward(model, x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            ctx.steps += 1  # counted, but no early stop on the objective (see module doc)
    ctx.reached = bool(forget.satisfied_by(model).all())
