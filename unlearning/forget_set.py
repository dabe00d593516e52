"""The forget set (instances plus, per row, what "forgotten" means) and the optional retain
sample: the only data an unlearning method sees."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .objectives import (
    AS_IF_UNSEEN,
    MISCLASSIFY,
    OBJECTIVES,
    PERCENTILES,
    ceilings_at,
    class_ranks,
    confidence_logit,
    heldout_ceiling,
    heldout_reference,
    unseen_holds,
    unseen_levels,
)
from .train import predict_logits


@dataclass(frozen=True)
class ForgetSet:
    """Forget instances and, per row, what "forgotten" means.

    ``avoid`` is the label a misclassify row must move away from (its original label, or the
    original model's prediction); ``relabel_to`` is the new label of a relabel row, -1 for
    misclassify, -2 for as-if-unseen. An as-if-unseen row is forgotten when the model is no
    more confident in its label than it is, typically, on held-out data of that class:
    ``confidence_logit <= ceiling`` (``ceiling`` is +inf on the other rows).
    """

    x: torch.Tensor
    y: torch.Tensor
    avoid: torch.Tensor
    relabel_to: torch.Tensor
    ids: tuple[int, ...] = ()
    ceiling: torch.Tensor | None = None  # as-if-unseen: fixed at deletion time (+inf: other)
    batch: torch.Tensor | None = None  # per row, which deletion batch (concat); None: one
    level: torch.Tensor | None = None  # as-if-unseen: the row's held-out quantile (nan: other)
    heldout_cdf: torch.Tensor | None = None  # (rows, 99): held-out phi percentiles of its class
    reference: tuple[torch.Tensor, torch.Tensor] | None = None  # held-out rows, re-read at checks

    @classmethod
    def build(
        cls,
        x: torch.Tensor,
        y: torch.Tensor,
        objectives: str | list[str],
        new_labels: list[int | None] | torch.Tensor | None = None,
        away_from: str = "label",
        model: nn.Module | None = None,
        num_classes: int | None = None,
        ids: list[int] | tuple[int, ...] = (),
        heldout: tuple[torch.Tensor, torch.Tensor] | None = None,
        unseen_quantile: float | None = None,
    ) -> ForgetSet:
        """``heldout`` (images and labels the model never trained on, e.g. the test split) and
        ``model`` (the one the rows are deleted from) are needed for as-if-unseen rows.

        Each such row gets a level (:func:`unseen_levels`), and the rows of a batch are
        forgotten together when their mean rank in their class's held-out confidence is at
        most their mean level (:meth:`satisfied`), on the model being judged. ``ceiling``
        holds the parent's confidence at each level; while unlearning, the targets are
        re-read from the model (:meth:`ceilings_for`, every ``CEILING_REFRESH`` steps): it
        grows a little less sure of the whole class as it goes. ``unseen_quantile`` instead
        fixes each ceiling at that quantile of the row's nearest held-out neighbours
        (:func:`heldout_ceiling`) and judges rows one by one (stricter per row, looser per
        batch)."""
        k = len(x)
        if k == 0:
            raise ValueError("the forget set is empty")
        objs = [objectives] * k if isinstance(objectives, str) else list(objectives)
        if len(objs) != k or any(o not in OBJECTIVES for o in objs):
            raise ValueError(f"objectives must be one of {OBJECTIVES} per instance")
        if away_from not in ("label", "prediction"):
            raise ValueError("away_from must be 'label' or 'prediction'")
        if away_from == "prediction":
            if model is None:
                raise ValueError("away_from='prediction' needs the original model")
            avoid = predict_logits(model, x).argmax(1)
        else:
            avoid = y.clone()
        new = [None] * k if new_labels is None else [
            None if v is None else int(v) for v in (new_labels.tolist() if torch.is_tensor(new_labels) else new_labels)
        ]
        relabel_to = torch.full((k,), MISCLASSIFY, dtype=torch.long)
        for i, (o, v) in enumerate(zip(objs, new)):
            if o == "relabel":
                if v is None or v < 0 or (num_classes is not None and v >= num_classes):
                    raise ValueError(f"row {i}: relabel needs a new label in range, got {v}")
                if v == int(y[i]):
                    raise ValueError(f"row {i}: new label {v} equals the current label")
                relabel_to[i] = v
            elif v is not None:
                raise ValueError(f"row {i}: new_label is only allowed for relabel")
            elif o == "as-if-unseen":
                relabel_to[i] = AS_IF_UNSEEN
        out = cls(x=x, y=y.long(), avoid=avoid.long(), relabel_to=relabel_to, ids=tuple(ids))
        unseen = relabel_to == AS_IF_UNSEEN
        if not bool(unseen.any()):
            return out
        if model is None or heldout is None:
            raise ValueError("as-if-unseen needs the original model and held-out data")
        y_unseen = y[unseen].long()
        if unseen_quantile is not None:
            if not 0.0 < unseen_quantile <= 1.0:
                raise ValueError("unseen_quantile must be in (0, 1]")
            ceiling = torch.full((k,), float("inf"))
            ceiling[unseen] = heldout_ceiling(model, x[unseen], y_unseen, heldout,
                                              quantile=unseen_quantile)
            return dataclasses.replace(out, ceiling=ceiling)
        hx, hy = heldout
        phi = confidence_logit(predict_logits(model, hx), hy.long())
        levels = unseen_levels(model, x[unseen], y_unseen, heldout)
        ceiling = torch.full((k,), float("inf"))
        ceiling[unseen] = ceilings_at(phi, hy.long(), y_unseen, levels)
        level = torch.full((k,), float("nan"))
        level[unseen] = levels
        cdf = torch.full((k, len(PERCENTILES)), float("inf"))
        cdf[unseen] = ceilings_at(phi, hy.long(), y_unseen.repeat_interleave(len(PERCENTILES)),
                                  PERCENTILES.repeat(len(y_unseen))).view(-1, len(PERCENTILES))
        return dataclasses.replace(out, ceiling=ceiling, level=level, heldout_cdf=cdf,
                                   reference=heldout_reference(heldout))

    def __len__(self) -> int:
        return len(self.x)

    @property
    def is_relabel(self) -> torch.Tensor:
        return self.relabel_to >= 0

    @property
    def is_unseen(self) -> torch.Tensor:
        return self.relabel_to == AS_IF_UNSEEN

    @property
    def key_label(self) -> torch.Tensor:
        """Per row, the label that decides it: the new label (relabel) or ``avoid``."""
        return torch.where(self.is_relabel, self.relabel_to, self.avoid)

    def satisfied(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-row bool: relabel rows predicted as their new label, misclassify rows away from
        ``avoid``; as-if-unseen rows hold together, per deletion batch, when they sit on
        average no higher in their class's held-out confidence than their levels, within
        ``UNSEEN_TOLERANCE_Z`` standard errors (:func:`unseen_holds`): the class-matched
        membership AUC of the release gate (:func:`unlearning.metrics.membership_auc`).
        From logits alone the ranks are read against the parent's held-out confidence
        (``heldout_cdf``); :meth:`satisfied_by` confirms a batch that holds against the
        judged model's own (unlearning makes the whole class a little less sure, and an
        attacker compares on the released model).

        Why together: a level predicts where a model that never saw the row would put it,
        and a prediction is off both ways. A retrained model leaves about half the rows over
        their ceilings; asking every row to go under its own pushed the batch below held-out
        data (Fashion-MNIST, 128 rows: 800 steps without getting there), and rows less
        confident than unseen data give the deletion away as well. Sets built with
        ``unseen_quantile`` keep the first, per-row rule: phi <= ceiling.
        """
        pred = logits.argmax(1)
        ok = torch.where(self.is_relabel, pred == self.relabel_to, pred != self.avoid)
        if self.ceiling is None:
            return ok
        unseen = self.is_unseen
        phi = confidence_logit(logits, self.y)
        if self.heldout_cdf is None or self.level is None:
            return torch.where(unseen, phi <= self.ceiling, ok)
        below = (self.heldout_cdf < phi[:, None]).float() + 0.5 * (self.heldout_cdf == phi[:, None]).float()
        return self._judge_batches(ok, unseen, below.mean(1))

    def _judge_batches(self, ok: torch.Tensor, rows: torch.Tensor,
                       rank: torch.Tensor) -> torch.Tensor:
        """``ok`` with each deletion batch's ``rows`` set together by :func:`unseen_holds`."""
        assert self.level is not None  # only rank-matched sets are judged by batch
        batch = self.batch if self.batch is not None else torch.zeros(len(self), dtype=torch.long)
        for b in batch[rows].unique():
            part = rows & (batch == b)
            ok[part] = unseen_holds(rank[part], self.level[part])
        return ok

    def reference_confidence(self, model: nn.Module) -> torch.Tensor | None:
        """``model``'s confidence logit on the held-out reference rows (None without one)."""
        if self.reference is None or self.level is None:
            return None
        return self._reference_phi(model)

    def _reference_phi(self, model: nn.Module) -> torch.Tensor:
        assert self.reference is not None
        ref_x, ref_y = self.reference
        return confidence_logit(predict_logits(model, ref_x), ref_y)

    def ceilings_for(self, model: nn.Module,
                     phi_ref: torch.Tensor | None = None) -> torch.Tensor | None:
        """Per row, the confidence the row's level stands for under ``model`` (its held-out
        reference re-read, or ``phi_ref`` when the caller has it): where unlearning must take
        an as-if-unseen row now. +inf for other rows; ``ceiling`` (the parent's) when the set
        has no reference."""
        if self.reference is None or self.level is None:
            return self.ceiling
        phi_ref = self._reference_phi(model) if phi_ref is None else phi_ref
        ref_y = self.reference[1]
        out = torch.full((len(self),), float("inf"))
        rows = self.level.isfinite()
        out[rows] = ceilings_at(phi_ref, ref_y, self.y[rows], self.level[rows])
        return out

    def satisfied_by(self, model: nn.Module, phi_ref: torch.Tensor | None = None,
                     logits: torch.Tensor | None = None) -> torch.Tensor:
        """Per row, whether ``model`` meets the row's objective (``phi_ref``: the model's
        reference confidence, ``logits``: its logits on the rows, when the caller already
        has them)."""
        logits = predict_logits(model, self.x) if logits is None else logits
        ok = self.satisfied(logits)
        held = self.is_unseen & ok
        if self.reference is None or self.level is None or not bool(held.any()):
            return ok
        # the expensive confirmation, only for batches that hold against the parent
        phi_ref = self._reference_phi(model) if phi_ref is None else phi_ref
        ref_y = self.reference[1]
        phi = confidence_logit(logits[held], self.y[held])
        rank = torch.zeros(len(self))
        rank[held] = class_ranks(phi, self.y[held], phi_ref, ref_y)
        return self._judge_batches(ok, held, rank)

    @staticmethod
    def concat(parts: list[ForgetSet]) -> ForgetSet:
        """One forget set holding every row of ``parts`` (e.g. all earlier deletions)."""
        if not parts:
            raise ValueError("nothing to concatenate")
        cat = lambda name: torch.cat([getattr(p, name) for p in parts])
        ids = tuple(i for p in parts for i in p.ids)
        def optional(name: str, fill: float, width: int = 0) -> torch.Tensor | None:
            if all(getattr(p, name) is None for p in parts):
                return None
            shape = lambda p: (len(p), width) if width else (len(p),)
            return torch.cat([getattr(p, name) if getattr(p, name) is not None
                              else torch.full(shape(p), fill) for p in parts])

        batches, offset = [], 0  # each part keeps its own batches: judged apart
        for p in parts:
            own = p.batch if p.batch is not None else torch.zeros(len(p), dtype=torch.long)
            batches.append(own + offset)
            offset += int(own.max()) + 1 if len(own) else 0
        # every part's reference comes from the same held-out split: one serves them all
        reference = next((p.reference for p in parts if p.reference is not None), None)
        return ForgetSet(cat("x"), cat("y"), cat("avoid"), cat("relabel_to"), ids,
                         optional("ceiling", float("inf")), torch.cat(batches),
                         optional("level", float("nan")),
                         optional("heldout_cdf", float("inf"), len(PERCENTILES)), reference)

    def subset(self, idx: torch.Tensor) -> ForgetSet:
        ids = tuple(self.ids[i] for i in idx.tolist()) if self.ids else ()
        pick = lambda t: None if t is None else t[idx]
        return ForgetSet(self.x[idx], self.y[idx], self.avoid[idx], self.relabel_to[idx], ids,
                         pick(self.ceiling), pick(self.batch), pick(self.level),
                         pick(self.heldout_cdf), self.reference)


@dataclass(frozen=True)
class RetainSample:
    """Optional, privileged: a small sample of the data the model must keep (<= 1% of train)."""

    x: torch.Tensor
    y: torch.Tensor


def directional_ce(logits: torch.Tensor, forget: ForgetSet, reduction: str = "mean") -> torch.Tensor:
    """-CE toward ``avoid`` on misclassify rows, +CE toward ``relabel_to`` on relabel rows.

    This is the reference code's forget term (unbounded below for misclassify rows).
    """
    ce = F.cross_entropy(logits, forget.key_label, reduction="none")
    signed = torch.where(forget.is_relabel, ce, -ce)
    return signed.mean() if reduction == "mean" else signed.sum() if reduction == "sum" else signed
