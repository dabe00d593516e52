"""The escalation policy: what a batch is retried with when its release fails the gates.

``params.yaml: unlearn.fallback`` is an ordered list of ``{method, params[, objectives]}``.
A batch is first released with ``unlearn.method``/``unlearn.params``; if that release fails
its gates, the next entry that applies to the batch's objectives is tried, from the same
champion, in the same run, until one passes or the list ends. Every attempt is a registered
version (tags ``attempt``, ``attempt_key``, ``escalated_from``); ``params_sha256`` stays the
hash of the whole params.yaml, so one file pins the policy and every attempt it made.

``retrain-exact`` is exact unlearning: a model of the champion's architecture trained from
scratch with params.yaml's ``pretrain`` recipe on the training split minus every committed
deletion and this batch (relabel rows kept, carrying their new labels). It is gated as a base
model is, on held-out accuracy (drop vs the parent, drop since the base, the base minimum)
and finite weights; the objective, earlier-deletion and membership gates are reported, not
gated, because the rows' influence is gone by construction: a model never trained on a
``misclassify`` row may still predict it correctly, and the request is then ``done (exact)``.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import registry
from .gates import GateReport, check_base_gates, check_gates
from .params import EXACT_RETRAIN, GatesParams, PipelineParams
from .paths import Paths

# the gates an exact retrain answers to (the rest are reported only, see the module doc)
EXACT_GATES = ("test_drop", "cumulative_drop", "weights_finite", "base_accuracy")


@dataclass(frozen=True)
class Attempt:
    method: str
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def exact(self) -> bool:
        return self.method == EXACT_RETRAIN

    @property
    def key(self) -> str:
        """Identifies the attempt among a batch's versions (a resumed run finds its own)."""
        blob = json.dumps(self.record(), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def describe(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in sorted(self.params.items()))
        return f"{self.method}({extra})" if extra else self.method

    def record(self) -> dict[str, Any]:
        """As the ledger, data/releases.json and the ``replay_steps`` tag keep it."""
        return {"method": self.method, "params": self.params}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Attempt:
        return cls(record["method"], dict(record.get("params") or {}))


def primary(cfg: PipelineParams) -> Attempt:
    return Attempt(cfg.unlearn.method, dict(cfg.unlearn.params))


def plan(cfg: PipelineParams, objectives: set[str], method: str | None = None) -> list[Attempt]:
    """The attempts for a batch with ``objectives``, in order: the primary method, then every
    fallback entry that applies to all of them. With ``method`` (``unlearn retry --method``):
    that method alone, with its fallback entry's params if the policy names it."""
    first = primary(cfg)
    if method is not None:
        if method == first.method:
            return [first]
        entry = next((e for e in cfg.unlearn.fallback if e.method == method), None)
        return [Attempt(method, dict(entry.params) if entry else {})]
    out = [first]
    for entry in cfg.unlearn.fallback:
        if entry.objectives is None or objectives <= set(entry.objectives):
            attempt = Attempt(entry.method, dict(entry.params))
            if attempt not in out:
                out.append(attempt)
    return out


def attempt_params(cfg: PipelineParams, attempt: Attempt) -> PipelineParams:
    """params.yaml as the attempt's method sees it (``unlearn.method``/``params`` replaced)."""
    if attempt.exact or attempt == primary(cfg):
        return cfg
    return cfg.with_overrides("unlearn", method=attempt.method, params=dict(attempt.params))


# the tags that mark a version exact: any one of them is enough
EXACT_MARKS = (("exact", "true"), ("method", EXACT_RETRAIN))


def exact_tags(tags: dict[str, str]) -> bool:
    """A registered version whose last step was an exact retrain (an exact attempt, a
    consolidation, a replay the policy finished with one), from its tags."""
    return any(tags.get(key) == value for key, value in EXACT_MARKS)


def exact_versions(client, name: str) -> set[int]:
    """Every registered version of ``name`` that ``exact_tags`` holds for, one search per
    mark, filtered by the registry itself: exact versions are few, and asking version by
    version costs a query per release of the lineage."""
    return {int(mv.version) for key, value in EXACT_MARKS
            for mv in registry.versions_tagged(client, name, **{key: value})}


def attempt_of(cfg: PipelineParams, tags: dict[str, str]) -> Attempt:
    """The attempt a registered release was built with, from its tags (``unlearn verify``
    rebuilds it the same way); a release from before escalation: the primary method."""
    if exact_tags(tags):
        return Attempt(EXACT_RETRAIN)
    if "method_params" in tags:
        return Attempt(tags.get("method", cfg.unlearn.method), json.loads(tags["method_params"]))
    return primary(cfg)


def replay_steps(cfg: PipelineParams, tags: dict[str, str],
                 batches: list[str]) -> list[Attempt] | None:
    """The attempt each batch of a ``rollback --reapply`` replay was applied with, from the
    version's ``replay_steps`` tag (None when the version has none: one attempt for all)."""
    if "replay_steps" not in tags:
        return None
    steps = [Attempt.from_record(s) for s in json.loads(tags["replay_steps"])]
    if len(steps) != len(batches):
        raise ValueError(f"replay_steps names {len(steps)} attempt(s) for {len(batches)} "
                         "batch(es)")
    return steps


def rebuild_steps(paths: Paths, cfg: PipelineParams, parent: dict[str, Any], batches: list[str],
                  attempts: list[Attempt], earlier: list[str], recent: list[str],
                  folder: Path, progress=None) -> dict[str, Any]:
    """``release.rebuild_release`` with an attempt per batch (a replay the escalation policy
    completed): each step in ``folder/<batch_id>/model.pt``, an exact one retrained without
    ``earlier`` (every batch the parent holds) and every batch up to and including its own,
    an unlearning one keeping ``recent`` (those unlearned since the last exact model) and the
    steps since forgotten, as ``flows.pipeline._replay`` applies them."""
    from . import release

    current, steps, parent_of_last = parent, [], parent
    for i, (batch_id, attempt) in enumerate(zip(batches, attempts, strict=True)):
        parent_of_last = current
        out = folder / batch_id / "model.pt"
        if attempt.exact:
            current = retrain_exact(paths, cfg, current, earlier + batches[: i + 1], out, progress)
        else:
            current = release.unlearn_batch(paths, attempt_params(cfg, attempt), current,
                                            batch_id, recent, out, progress,
                                            held=earlier + batches[:i])
        recent = [] if attempt.exact else recent + [batch_id]
        steps.append(current)
    return {**current, "steps": steps, "parent_of_last": parent_of_last}


def batch_versions(client, name: str, batch_id: str) -> list[Any]:
    """Every registered version released for ``batch_id`` alone (any parent), oldest first."""
    return registry.versions_tagged(client, name, batch_id=batch_id)


def find_attempt(client, cfg: PipelineParams, batch_id: str, parent: int,
                 attempt: Attempt) -> Any | None:
    """The version an interrupted run registered for this attempt (same batch, parent,
    params.yaml and attempt), or None. Versions from before escalation carry no
    ``attempt_key``: they were the primary method's."""
    first = primary(cfg).key
    same = [mv for mv in batch_versions(client, cfg.registry.model_name, batch_id)
            if mv.tags.get("parent_version") == str(parent)
            and mv.tags.get("params_sha256") == cfg.sha256()
            and mv.tags.get("attempt_key", first) == attempt.key]
    return same[0] if same else None


def exact_gates(metrics: dict[str, Any], gates: GatesParams) -> dict[str, Any]:
    """The gate report of an exact retrain: held-out accuracy and finite weights gate; the
    other checks are kept in ``reported`` (not gating)."""
    full = check_gates(metrics, gates)
    base = check_base_gates(metrics, gates)
    checks = [c for c in full.checks if c.name in EXACT_GATES]
    checks += [c for c in base.checks if c.name == "base_accuracy"]
    report = GateReport(all(c.passed for c in checks), checks)
    return {**report.to_dict(), "summary": report.summary(), "exact": True,
            "reported": [c.__dict__ for c in full.checks if c.name not in EXACT_GATES]}


def retrain_exact(paths: Paths, cfg: PipelineParams, parent: dict[str, Any],
                  batch_ids: list[str], out: Path, progress=None) -> dict[str, Any]:
    """A fresh model of the parent's architecture trained with the pretrain recipe on the
    training split minus the rows of ``batch_ids`` (relabel rows kept with their new label);
    saved as a weights-only checkpoint at ``out``. Deterministic on the CPU."""
    import torch

    from unlearning.datasets.core import take
    from unlearning.devices import describe_device
    from unlearning.models import build_model, load_checkpoint, save_checkpoint
    from unlearning.train import TrainConfig, train_classifier

    from . import release

    data = release.dataset_of(cfg)
    rows = [r for b in batch_ids for r in release.read_rows(paths.manifest(b))]
    data.check_ids([r["instance_id"] for r in rows])
    release.check_keys(data, rows)
    labels = data.train_y.clone()
    keep = torch.ones(data.num_train, dtype=torch.bool)
    for r in rows:
        if r["objective"] == "relabel":
            labels[r["instance_id"]] = int(r["new_label"])
        else:
            keep[r["instance_id"]] = False
    idx = keep.nonzero().squeeze(1)
    p = cfg.pretrain
    config = TrainConfig(epochs=p.epochs, batch_size=p.batch_size, lr=p.lr, momentum=p.momentum,
                         weight_decay=p.weight_decay, seed=p.seed, augment=p.augment)
    device = cfg.runtime.torch_device()
    _, spec = load_checkpoint(parent["path"], parent["weights_sha256"])
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    model = build_model(spec).to(device)  # drawn on the CPU, as pretrain does
    train_classifier(model, take(data.train_x, idx), labels[idx], config, progress)
    model.eval()
    seconds = time.perf_counter() - start
    out.parent.mkdir(parents=True, exist_ok=True)
    sha = save_checkpoint(out, model, spec)
    summary = {"path": str(out), "weights_sha256": sha, "seed": p.seed, "steps": 0,
               "device": describe_device(device), "seconds": seconds, "reached": None,
               "satisfied": None, "total": len(rows),
               "info": {"trained_on": int(idx.numel()), "removed": int((~keep).sum()),
                        "relabelled": sum(r["objective"] == "relabel" for r in rows),
                        "batches": ",".join(batch_ids)}}
    out.with_name("unlearn.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    return summary
