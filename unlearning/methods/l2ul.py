"""``l2ul``: the project's method. Same principle as Cha et al. (only the pre-trained model and
the forget set are required; adversarial examples and weight importance protect the rest),
changed where the published recipe destroys the model. Why: fine-tuning a sharp classifier
on a handful of typical training images moves class-wide features, so every nearby test
image moves with them; the published recipe has nothing that says where *not* to move.
Each change is a switch, so ``unlearn bench --ablation`` can turn it off alone:

1. ``forget_loss="margin"``: a bounded hinge on the logit margin replaces -CE. -CE is
   unbounded below and keeps pushing instances that are already forgotten; the hinge stops
   pulling once an instance is ``margin`` logits past its boundary.
2. ``anchor_loss="kl"``: anchors are distilled toward the *original model's whole output
   distribution* instead of a hard CE on one target label, so they pin every logit.
3. Anchors that say where not to move, all derived from the model and the forget set:
   the paper's targeted adversarial examples (``adv_per_instance``); small translations of
   each forget instance (``neighbour_shifts``, at ``neighbour_weight``): on-manifold
   neighbours that must keep their prediction while the instance itself moves, so the
   update has to use what is specific to that one image rather than move its class; and
   ``synthetic_anchors``: images inverted from the model's BatchNorm statistics (see
   ``unlearning.synthesis``), started from mixtures of forget instances, a data-free stand-in
   for the rest of the training distribution. A model without BatchNorm has no statistics
   to invert: those anchors are skipped (``info["synthetic_anchors_skipped"]`` says so).
4. ``anchor_decay``: the forget-derived anchors are strong at first (``anchor_weight``) and
   relax geometrically, so instances they block are eventually freed and the objective is
   reached (a release that misses it fails its gate) with no more collateral than needed.
   They relax only on steps where the forget loss has stalled (it fell by less than
   ``relax_progress`` over the last ``relax_patience`` steps): while the objective is still
   being won under the current anchors, loosening them only buys collateral. Once
   ``relax_always_after`` of the step budget is spent they relax on every step: a run that
   ends at the cap with rows left fails its gate, which costs more than the collateral.
5. ``freeze_bn``: BatchNorm keeps the pre-trained running statistics during the update;
   batches of a few forget images are not the data distribution.
6. ``optimizer="adam"`` with a short learning-rate warm-up (``warmup_steps``), few PGD steps
   with a large step size (the reference: 100 of 0.1).
7. Importance: inverted MAS as in the paper (``use_importance``, ``reg_lambda``).

An optional retain sample (``RetainSample``, at most 1% of the training set) is distilled
the same way, starting at ``anchor_weight * retain_weight`` and relaxing by ``retain_decay``
on the same steps as the other anchors, so that it cannot block the objective; it is never
required. With one, every anchor relaxes on every step from ``retain_relax_always_after`` of
the budget on (default 0: from the start) instead of ``relax_always_after``: real data pins
the function well enough that holding the anchors through slow progress buys little accuracy
and can leave the last rows unforgotten at the step cap. The real rows also stand in for the
training data in place of the BatchNorm-inverted images (``retain_synthetic_anchors``, default
0, replaces ``synthetic_anchors``: the inversion is most of the set-up), and each step sees
``retain_anchor_batch`` anchors and as many retain rows instead of ``anchor_batch`` anchors.

Which parameters move (``update``; with a retain sample ``retain_update``): every one, or only
the classifier head (``unlearning.head``: the trailing linear layers). The head alone runs on
features computed once, so an update costs a pass through a few linear layers and sees every
anchor and every retain row; it has fewer ways to separate a forget instance from its class,
so it needs rows to hold it in place: real ones (a retain sample) or, from the forget set
alone, ``head_noise_anchors`` points drawn afresh at every update around the forget rows'
head inputs (``HeadNoise``), which bound how far around each instance the head may change.
The default is the whole network without a retain sample and, with one, the head from
``head_min_retain`` rows on ("auto"); with fewer real rows, or a model without a head, the
whole network.

Why each change, and the ablation that measures it: docs/l2ul.md.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..attacks import adversarial_set
from ..devices import forward
from ..forget_set import ForgetSet, directional_ce
from ..head import NoHeadError, classifier_head, head_inputs
from ..importance import anchor_penalty, inverted_importance, mas_importance
from ..objectives import OBJECTIVES, confidence_logit
from ..synthesis import has_batchnorm, invert_batchnorm
from .loop import Context
from .registry import MethodConfigError, register

UPDATES = ("all", "head")


@dataclass(frozen=True)
class L2ULConfig:
    forget_loss: str = "margin"  # "margin" | "neg-ce" (reference)
    margin: float = 0.2
    # "active": the hinge is averaged over the rows still short of their margin, so the last
    # rows of a large batch keep the pull the whole batch had; "all": over every row.
    forget_average: str = "all"
    anchor_loss: str = "kl"  # "kl" | "ce" (reference: CE on the adversarial target labels)
    anchor_weight: float = 100.0
    anchor_decay: float = 0.995  # per step, on forget-derived anchors (not on a retain sample)
    # Shifted copies per forget instance (0 switches them off), at full anchor weight: they
    # keep their prediction while the instance flips, so the change is instance-specific.
    neighbour_shifts: int = 8
    max_shift: int = 3
    neighbour_weight: float = 1.0  # relative to the other anchors
    adv_per_instance: int = 4
    pgd_eps_rms: float = 0.07  # L2 radius as per-pixel RMS (the reference eps=4 on CIFAR)
    pgd_steps: int = 10
    mixup_anchors: int = 0  # 0 switches mixup anchors off
    synthetic_anchors: int = 256  # BN-inverted images (started as synthetic_init says); 0 = off
    synthesis_steps: int = 30
    # where the inversion starts: "forget" (mixups of the forget instances and their
    # adversarial examples) or "noise" (uniform noise of a fixed seed). "noise" anchors
    # depend on the model alone and could be made once per model version, but they lie away
    # from the forget instances and hold less of what surrounds them (docs/l2ul.md)
    synthetic_init: str = "forget"
    anchor_batch: int = 128
    freeze_bn: bool = True
    optimizer: str = "adam"  # "adam" | "sgd" (reference: SGD lr 1e-3, momentum 0.9)
    lr: float = 1e-3  # reached after warmup_steps
    warmup_steps: int = 20  # linear learning-rate warm-up; 0 = off (see the comment in the loop)
    relax_patience: int = 10  # anchors relax only when the forget loss stalls; 0 = every step
    relax_progress: float = 0.05  # share the forget loss must fall over relax_patience steps
    relax_always_after: float = 0.5  # share of max_steps after which anchors relax every step
    reg_lambda: float = 1.0
    use_importance: bool = True
    retain_weight: float = 1.0
    retain_decay: float = 0.995  # per step, on the retain sample's anchor (1 = constant)
    retain_relax_always_after: float = 0.0  # replaces relax_always_after when a retain sample is given
    retain_anchor_batch: int = 64  # replaces anchor_batch (and is the retain rows per step) then
    retain_synthetic_anchors: int = 0  # replaces synthetic_anchors then
    # Which parameters move: "all", or "head" (only the classifier head, on features computed
    # once; see _update_head).
    update: str = "all"
    # replaces update when a retain sample is given; "auto": "head" from head_min_retain rows
    # on (fewer real rows do not hold the head in place), "all" below
    retain_update: str = "auto"
    head_min_retain: int = 256
    head_updates: int = 5  # head updates per step (a step is the unit of max_steps)
    head_decay: float = 0.999  # per head update; replaces anchor_decay and retain_decay
    # While the head alone moves: at every update, this many points drawn afresh around the
    # forget rows' head inputs (Gaussian noise in each coordinate's spread over the forget
    # rows, times a radius drawn per point, log-uniform from head_noise_scale divided by
    # head_noise_spread to head_noise_scale times it; spread 1: one radius), distilled toward
    # the unchanged head at the anchor weight. They bound how far around each forget
    # instance the head may change, without any data: 0 = off.
    head_noise_anchors: int = 0
    head_noise_scale: float = 0.7
    head_noise_spread: float = 2.0
    max_steps: int = 800

    def __post_init__(self) -> None:
        """Values the loop cannot use are refused here, naming the key (params.yaml is checked
        when it is loaded, not when a batch runs); ranges common to every method (finite
        floats, positive lr, counts) are ``registry.check_ranges``."""
        for key, allowed in (("forget_loss", ("margin", "neg-ce")), ("anchor_loss", ("kl", "ce")),
                             ("optimizer", ("adam", "sgd")), ("forget_average", ("all", "active")),
                             ("update", UPDATES), ("retain_update", ("auto", *UPDATES)),
                             ("synthetic_init", ("forget", "noise"))):
            if getattr(self, key) not in allowed:
                raise MethodConfigError(key, f"must be one of {', '.join(allowed)}, got "
                                             f"{getattr(self, key)!r}")
        for key in ("relax_always_after", "retain_relax_always_after"):
            if not 0 <= getattr(self, key) <= 1:
                raise MethodConfigError(key, f"must be a share in [0, 1], got {getattr(self, key)}")
        if not 0 <= self.relax_progress < 1:
            raise MethodConfigError("relax_progress", f"must be in [0, 1), got {self.relax_progress}")
        if not self.neighbour_weight >= 0:
            raise MethodConfigError("neighbour_weight", f"must be >= 0, got {self.neighbour_weight}")
        if not self.head_noise_scale > 0:
            raise MethodConfigError("head_noise_scale", f"must be > 0, got {self.head_noise_scale}")
        if not self.head_noise_spread >= 1:
            raise MethodConfigError("head_noise_spread",
                                    f"must be >= 1, got {self.head_noise_spread}")
        if self.head_updates < 1:
            raise MethodConfigError("head_updates", f"must be >= 1, got {self.head_updates}")
        if not 0 < self.head_decay <= 1:
            raise MethodConfigError("head_decay", f"must be in (0, 1], got {self.head_decay}")


def margin_loss(logits: torch.Tensor, forget: ForgetSet, margin: float,
                ceiling: torch.Tensor | None = None, active_only: bool = False) -> torch.Tensor:
    """Hinge on the logit margin; zero for rows already ``margin`` past their boundary.

    Misclassify rows:   relu(z_avoid - max_{j != avoid} z_j + margin).
    Relabel rows:       relu(max_{j != new} z_j - z_new + margin).
    As-if-unseen rows:  relu(phi_y - ceiling + margin), phi = log(p_y / (1 - p_y)), with
                        ``ceiling`` the current targets (``Context.ceiling``; default the
                        parent's, ``forget.ceiling``).
    """
    ceiling = forget.ceiling if ceiling is None else ceiling
    key = forget.key_label
    z_key = logits.gather(1, key[:, None]).squeeze(1)
    others = logits.scatter(1, key[:, None], float("-inf")).max(1).values
    gap = torch.where(forget.is_relabel, others - z_key, z_key - others)
    if ceiling is not None:
        excess = confidence_logit(logits, forget.y) - ceiling
        gap = torch.where(forget.is_unseen, excess, gap)
    hinge = F.relu(gap + margin)
    if active_only:  # rows past their margin give no gradient; the rest share the whole pull
        return hinge.sum() / (hinge > 0).sum().clamp(min=1)
    return hinge.mean()


def distill(logits: torch.Tensor, teacher_probs: torch.Tensor,
            weight: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher || student) per row, averaged over the batch (optionally row-weighted)."""
    kl = F.kl_div(F.log_softmax(logits, 1), teacher_probs, reduction="none").sum(1)
    return kl.mean() if weight is None else (kl * weight).mean()


def stalled(losses: list[float], patience: int, progress: float) -> bool:
    """True when the last loss is not below the one ``patience`` steps earlier by ``progress``
    of its size (a loss stuck at 0 has stalled too); always True for ``patience`` 0 and while
    fewer than ``patience`` steps are done."""
    if patience == 0 or len(losses) <= patience:
        return True
    then = losses[-1 - patience]
    return losses[-1] >= then - progress * abs(then)


def shifted_copies(x: torch.Tensor, copies: int, max_shift: int, g: torch.Generator) -> torch.Tensor:
    """``copies`` translations of every image by a random non-zero offset of <= max_shift px."""
    if copies <= 0 or max_shift <= 0:
        return x[:0]
    offsets = [(dy, dx) for dy in range(-max_shift, max_shift + 1)
               for dx in range(-max_shift, max_shift + 1) if (dy, dx) != (0, 0)]
    pick = torch.randint(0, len(offsets), (copies, len(x)), generator=g)
    out = torch.empty((copies, *x.shape), dtype=x.dtype)
    for c in range(copies):
        for i in range(len(x)):
            dy, dx = offsets[int(pick[c, i])]
            out[c, i] = torch.roll(x[i], shifts=(dy, dx), dims=(1, 2))
    return out.flatten(0, 1)


def mixup_pairs(x: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    """``n`` mixtures lam*x_i + (1-lam)*x_j of random pairs, lam ~ U(0.2, 0.8)."""
    if n <= 0 or len(x) < 2:
        return x[:0]
    i = torch.randint(0, len(x), (n,), generator=g)
    j = (i + torch.randint(1, len(x), (n,), generator=g)) % len(x)  # j != i
    lam = (0.2 + 0.6 * torch.rand(n, generator=g)).view(-1, *([1] * (x.dim() - 1)))
    return lam * x[i] + (1 - lam) * x[j]


def _check(cfg: L2ULConfig, forget: ForgetSet) -> None:
    if cfg.forget_loss not in ("margin", "neg-ce") or cfg.anchor_loss not in ("kl", "ce") \
            or cfg.optimizer not in ("adam", "sgd") or not cfg.lr > 0 or cfg.warmup_steps < 0 \
            or cfg.relax_patience < 0 or not 0 <= cfg.relax_progress < 1 \
            or not 0 <= cfg.relax_always_after <= 1 \
            or not 0 <= cfg.retain_relax_always_after <= 1 \
            or cfg.neighbour_shifts < 0 or cfg.max_shift < 0 or not cfg.neighbour_weight >= 0:
        raise ValueError(f"invalid l2ul config: {cfg}")
    if cfg.forget_loss == "neg-ce" and bool(forget.is_unseen.any()):
        raise ValueError("forget_loss='neg-ce' has no as-if-unseen form; use 'margin'")


def l2ul_prepare(model, forget: ForgetSet, cfg: L2ULConfig, ctx: Context) -> dict[str, Any]:
    """The set-up before the first step: inverted MAS importance and the anchor inputs
    (adversarial, mixup, shifted and BN-inverted), labelled by the unchanged model. It does
    not depend on the step budget, so escalation attempts that only raise ``max_steps``
    share it (``registry.prepare``)."""
    _check(cfg, forget)
    model.eval()
    num_classes = forward(model, forget.x[:1]).shape[1]
    # the head alone needs no importance ("auto" depends on the retain sample's size: not known)
    head_only = (cfg.retain_update if ctx.with_retain else cfg.update) == "head"
    weights = inverted_importance(mas_importance(model, forget.x, train_mode=not cfg.freeze_bn)) \
        if cfg.use_importance and not head_only else {}

    # Anchor inputs, all labelled by the original model (before any update).
    avoid = forget.key_label  # adversarial targets avoid the label that decides each row
    dim = forget.x[0].numel()
    eps = cfg.pgd_eps_rms * math.sqrt(dim)
    x_adv, y_adv, _ = adversarial_set(model, forget.x, avoid, num_classes, cfg.adv_per_instance,
                                      eps, 2.5 * eps / max(cfg.pgd_steps, 1), cfg.pgd_steps, ctx.g)
    pool = torch.cat([forget.x, x_adv])
    x_mix = mixup_pairs(pool, cfg.mixup_anchors, ctx.g)
    x_near = shifted_copies(forget.x, cfg.neighbour_shifts, cfg.max_shift, ctx.g)
    x_syn = x_mix[:0]
    synthetic = cfg.retain_synthetic_anchors if ctx.with_retain else cfg.synthetic_anchors
    if synthetic and has_batchnorm(model):
        x_syn = model_anchors(model, forget.x, synthetic, cfg.synthesis_steps) \
            if cfg.synthetic_init == "noise" \
            else invert_batchnorm(model, mixup_pairs(pool, synthetic, ctx.g),
                                  cfg.synthesis_steps, ctx.g)
    elif synthetic:  # nothing to invert: the other anchors carry the update
        ctx.info["synthetic_anchors_skipped"] = "the model has no BatchNorm statistics to invert"
    x_anchor = torch.cat([x_adv, x_mix, x_near, x_syn])
    with torch.no_grad():
        teacher = F.softmax(forward(model, x_anchor), 1)
    # Reference variant: hard CE on the adversarial targets (other anchors: teacher argmax).
    hard = torch.cat([y_adv, teacher[len(x_adv):].argmax(1)])
    row_weight = torch.ones(len(x_anchor))
    row_weight[len(x_adv) + len(x_mix): len(x_adv) + len(x_mix) + len(x_near)] = cfg.neighbour_weight
    perm = torch.randperm(len(x_anchor), generator=ctx.g)  # mix anchor kinds in every batch
    ctx.info.update(adversarial_examples=len(x_adv), mixup_anchors=len(x_mix),
                    neighbour_anchors=len(x_near), synthetic_anchors=len(x_syn))
    return {"importance": weights, "x_anchor": x_anchor[perm], "teacher": teacher[perm],
            "hard": hard[perm], "row_weight": row_weight[perm]}


def model_anchors(model, like: torch.Tensor, count: int, steps: int) -> torch.Tensor:
    """Anchors inverted from the model's BatchNorm statistics, starting from noise of a fixed
    seed: a function of the model's weights and these settings alone, never of a forget set."""
    g = torch.Generator().manual_seed(0)
    init = torch.rand(count, *like.shape[1:], generator=g).to(like.device)
    return invert_batchnorm(model, init, steps, g)


@register("l2ul", L2ULConfig,
          "the project's L2UL: bounded forget loss, distilled adversarial, shifted and "
          "BN-inverted anchors, "
          "frozen BatchNorm, inverted MAS importance", accepts_retain=True, objectives=OBJECTIVES,
          prepare=l2ul_prepare)
def l2ul(model, forget: ForgetSet, cfg: L2ULConfig, retain, ctx: Context) -> None:
    _check(cfg, forget)
    setup = ctx.prepared if ctx.prepared is not None else l2ul_prepare(model, forget, cfg, ctx)
    weights, x_anchor, teacher = setup["importance"], setup["x_anchor"], setup["teacher"]
    hard, row_weight = setup["hard"], setup["row_weight"]
    model.eval()
    retain_teacher: torch.Tensor | None = None
    if retain is not None:  # privileged real data: its own batches, distilled the same way
        with torch.no_grad():
            retain_teacher = F.softmax(forward(model, retain.x), 1)
    head = _head_to_update(model, forget, cfg, retain, ctx)
    if head is not None:
        _update_head(model, forget, cfg, retain, retain_teacher, setup, head, ctx)
        return
    anchor_params = {n: p.detach().clone() for n, p in model.named_parameters()}

    # The bounded update: forget hinge + relaxing anchors (+ retain) + importance penalty.
    if cfg.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=1e-4)
    warmup = _warmup(opt, cfg)
    n_anchor = len(x_anchor)
    per_step = cfg.anchor_batch if retain is None else cfg.retain_anchor_batch
    cursor = retain_cursor = 0
    weight = cfg.anchor_weight
    retain_weight = cfg.anchor_weight * cfg.retain_weight
    relax_always_after = cfg.relax_always_after if retain is None else cfg.retain_relax_always_after
    forget_losses: list[float] = []
    while not ctx.done:
        model.train(not cfg.freeze_bn)
        logits = forward(model, forget.x)
        loss = margin_loss(logits, forget, cfg.margin, ctx.ceiling,
                           active_only=cfg.forget_average == "active") \
            if cfg.forget_loss == "margin" else directional_ce(logits, forget)
        forget_losses.append(loss.item())
        if n_anchor:
            idx = torch.arange(cursor, cursor + min(per_step, n_anchor)) % n_anchor
            cursor = (cursor + len(idx)) % n_anchor
            out = forward(model, x_anchor[idx])
            anchor = distill(out, teacher[idx], row_weight[idx]) if cfg.anchor_loss == "kl" \
                else (F.cross_entropy(out, hard[idx], reduction="none") * row_weight[idx]).mean()
            loss = loss + weight * anchor
        if retain is not None and retain_teacher is not None:
            ridx = torch.arange(retain_cursor, retain_cursor + min(per_step, len(retain.x)))
            ridx = ridx % len(retain.x)
            retain_cursor = int(ridx[-1] + 1) % len(retain.x)
            loss = loss + retain_weight * distill(forward(model, retain.x[ridx]),
                                                 retain_teacher[ridx])
        if weights:
            loss = loss + cfg.reg_lambda * anchor_penalty(model, anchor_params, weights)
        ctx.step(opt, loss)
        warmup.step()
        if ctx.steps >= relax_always_after * ctx.max_steps \
                or stalled(forget_losses, cfg.relax_patience, cfg.relax_progress):
            weight *= cfg.anchor_decay
            retain_weight *= cfg.retain_decay


def _head_to_update(model, forget: ForgetSet, cfg: L2ULConfig, retain,
                    ctx: Context) -> tuple[str, torch.nn.Module] | None:
    """``(name, head)`` when only the head moves (``update``, or with a retain sample
    ``retain_update``), None when every parameter does. "auto" falls back to every parameter
    for a retain sample under ``head_min_retain`` rows or a model without a head; an asked-for
    head that the model does not have is an error (``NoHeadError``)."""
    wanted = cfg.update if retain is None else cfg.retain_update
    if wanted == "all" or (wanted == "auto" and len(retain.x) < cfg.head_min_retain):
        return None
    try:
        return classifier_head(model, forget.x)
    except NoHeadError as e:
        if wanted != "auto":
            raise
        ctx.info["head_update_skipped"] = str(e)
        return None


class HeadNoise:
    """Anchors around the forget rows' head inputs, drawn afresh at every update: each row
    in turn plus Gaussian noise of each coordinate's spread over the forget rows (for one
    row, its own magnitude) times a radius drawn per point, log-uniform between
    ``scale / spread`` and ``scale * spread``; kept non-negative where every forget input is
    (the head follows a ReLU), and labelled by the head as it is when this is built. Where
    the forget instances must move and these points must not, the change stays close to
    each instance: a data-free bound on what else it moves. The radius varies because one radius does not
    fit every batch: a batch of a few rows needs far points to hold the space between its
    instances, a large one near points, since the far points of one row fall on the others
    (docs/l2ul.md)."""

    def __init__(self, head: torch.nn.Module, f_forget: torch.Tensor, count: int,
                 scale: float, spread: float, g: torch.Generator) -> None:
        self.original = copy.deepcopy(head).eval().requires_grad_(False)
        self.g, self.log_spread = g, math.log(spread)
        coordinate = f_forget.std(0, keepdim=True) if len(f_forget) > 1 else f_forget.abs()
        self.sd = scale * torch.nan_to_num(coordinate)
        self.non_negative = bool((f_forget >= 0).all())
        self.base = f_forget[torch.arange(count, device=f_forget.device) % len(f_forget)]

    def draw(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``count`` new points and the unchanged head's probabilities on them."""
        base = self.base
        noise = torch.randn(tuple(base.shape), generator=self.g).to(base.device, base.dtype)
        radius = torch.empty((len(base),) + (1,) * (base.dim() - 1)).uniform_(
            -self.log_spread, self.log_spread, generator=self.g).exp().to(base.device, base.dtype)
        f = base + radius * self.sd * noise
        if self.non_negative:
            f = f.clamp_min(0)
        with torch.no_grad():
            return f, F.softmax(self.original(f), 1)


def _warmup(opt: torch.optim.Optimizer, cfg: L2ULConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Adam's first steps move every weight by about lr before the anchors (distillation
    toward the unchanged model: zero gradient at step 0) push back; a warm-up shrinks them."""
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0)


def _update_head(model, forget: ForgetSet, cfg: L2ULConfig, retain, retain_teacher,
                 setup: dict[str, Any], named_head: tuple[str, torch.nn.Module],
                 ctx: Context) -> None:
    """The same losses with only the classifier head moving (``unlearning.head``). What the
    head receives cannot change, so it is computed once for the forget rows, the anchors and
    the retain rows; an update is then a pass through the head alone, so every anchor and
    every retain row is in every update, a step is ``head_updates`` updates, and the anchors
    relax by ``head_decay`` on every update. There is no importance penalty: it never
    relaxes, and on the few weights of a head it holds every row in place."""
    name, head = named_head
    feats = lambda x: head_inputs(model, head, x)
    f_forget, f_anchor = feats(forget.x), feats(setup["x_anchor"])
    f_retain = feats(retain.x) if retain is not None else None
    teacher, row_weight = setup["teacher"], setup["row_weight"]
    logits_of = lambda f: head(f).to(forget.x.device)
    near = HeadNoise(head, f_forget, cfg.head_noise_anchors, cfg.head_noise_scale,
                     cfg.head_noise_spread, ctx.g) \
        if cfg.head_noise_anchors else None
    rows = len(f_forget) + len(f_anchor) + (len(f_retain) if f_retain is not None else 0) \
        + cfg.head_noise_anchors
    # An update backpropagates through the head alone: it is not counted as example-gradients
    # of the whole model (``grad_examples``), but here, in rows through the head.
    ctx.info.update(updated=name, updated_parameters=sum(p.numel() for p in head.parameters()),
                    head_rows_per_update=rows)
    opt = torch.optim.Adam(head.parameters(), lr=cfg.lr) if cfg.optimizer == "adam" \
        else torch.optim.SGD(head.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=1e-4)
    warmup = _warmup(opt, cfg)
    weight = cfg.anchor_weight
    retain_weight = cfg.anchor_weight * cfg.retain_weight
    head.eval()  # no dropout: the anchors' targets were computed in eval mode

    def loss_now() -> torch.Tensor:
        logits = logits_of(f_forget)
        loss = margin_loss(logits, forget, cfg.margin, ctx.ceiling,
                           active_only=cfg.forget_average == "active") \
            if cfg.forget_loss == "margin" else directional_ce(logits, forget)
        if len(f_anchor):
            out = logits_of(f_anchor)
            anchor = distill(out, teacher, row_weight) if cfg.anchor_loss == "kl" \
                else (F.cross_entropy(out, setup["hard"], reduction="none") * row_weight).mean()
            loss = loss + weight * anchor
        if near is not None:
            f_near, near_teacher = near.draw()
            loss = loss + weight * distill(logits_of(f_near), near_teacher)
        if f_retain is not None:
            loss = loss + retain_weight * distill(logits_of(f_retain), retain_teacher)
        return loss

    while not ctx.done:
        for update in range(cfg.head_updates):
            loss = loss_now()
            if update < cfg.head_updates - 1:
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            else:  # the step: the last update, then the objective check
                ctx.step(opt, loss, forget_logits=lambda: logits_of(f_forget))
            warmup.step()
            weight *= cfg.head_decay
            retain_weight *= cfg.head_decay
    ctx.info["head_updates"] = ctx.steps * cfg.head_updates
