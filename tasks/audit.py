"""The audit of one deletion request (or every request for one instance), for a privacy
officer: when it was asked for, what became of its batch, which release removed it with the
metrics recorded on that version, and a live check that the current champion still honours it.

The live check loads the champion the way the pipeline does (``registry.fetch_version``:
weights-only checkpoint, verified against its ``weights_sha256`` tag) and asks the model for
the instance's class now: a ``misclassify`` deletion holds while the prediction differs from
the original label, a ``relabel`` one while it equals the new label. An ``as-if-unseen`` one is
judged by its own membership rule, for its whole batch (the rows hold together): they must
sit among held-out data of their classes on the champion, with levels from the model the
champion was released from (``unseen_check``), as the champion's release gate judged them.
The release named is the one in the champion's lineage that carries the batch now (after
``rollback --reapply``, the replay), with ``applied_by`` the release that applied it first.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from . import escalation, registry
from .ledger import Ledger, ledger_present
from .params import PipelineParams
from .paths import Paths


class AuditError(LookupError):
    """Nothing to audit: no ledger, or no request with that id."""


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC).isoformat(timespec="seconds")


def find_requests(ledger: Ledger, ident: str) -> list[dict[str, Any]]:
    """Requests whose request_id is ``ident``; failing that, every request for the instance
    key ``ident`` (``train/cat/0001.png``), then for the instance id ``ident`` (an integer).
    Oldest batch first; empty when nothing matches."""
    rows = ledger.requests()
    found = [r for r in rows if r["request_id"] is not None and str(r["request_id"]) == ident]
    if not found:
        found = [r for r in rows if r.get("instance_key") is not None
                 and str(r["instance_key"]) == ident]
    if not found:
        try:
            instance = int(ident)
        except ValueError:
            return []
        found = [r for r in rows if r["instance_id"] is not None
                 and int(r["instance_id"]) == instance]
    return found


def ancestry(ledger: Ledger, version: int) -> list[int]:
    """``version`` and its recorded parents, newest first (the ledger's release chain)."""
    chain: list[int] = []
    current: int | None = version
    while current is not None and current not in chain:
        chain.append(current)
        rel = ledger.release(current)
        current = rel["parent"] if rel else None
    return chain


def version_record(client, name: str, version: int) -> dict[str, Any]:
    """What the registry recorded on ``version``: status, lineage tags and metrics (the
    version's metric tags, completed by its run's logged metrics)."""
    mv = registry.version_info(client, name, version)
    desc = registry.describe_version(mv, [])
    metrics = dict(desc["metrics"])
    from mlflow.exceptions import MlflowException

    try:
        run_metrics = client.get_run(mv.run_id).data.metrics
    except MlflowException:  # a deleted run: the version's tags still hold the metrics
        run_metrics = {}
    for key, value in run_metrics.items():
        metrics.setdefault(key, float(value))
    lineage = desc["lineage"]
    return {"version": version, "run_id": mv.run_id, "created": _iso(mv.creation_timestamp / 1000),
            "gates_passed": desc["gates_passed"], "status": lineage.get("status"),
            "parent_version": lineage.get("parent_version"),
            "weights_sha256": lineage.get("weights_sha256"),
            "metrics": dict(sorted(metrics.items()))}


def unseen_check(model, parent, dataset, rows: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """The as-if-unseen rule of one batch, on ``model``, as the pipeline judges it: the batch's
    as-if-unseen rows together sit among held-out data of their classes (mean rank in the
    model's own held-out confidence at most their mean level plus one standard error), the
    levels taken from ``parent`` (``tasks.release.build_forget_set``, ``ForgetSet.satisfied_by``).
    Returns, per instance id of those rows, ``{"holds", "rule"}`` (the same for every row:
    the rows hold together). ``parent``: the model the champion was released from, whose
    gate judged these rows the same way."""
    from unlearning.objectives import UNSEEN_TOLERANCE_Z, class_ranks, confidence_logit
    from unlearning.train import predict_logits

    from .release import build_forget_set

    unseen = [{"instance_id": int(r["instance_id"]), "objective": "as-if-unseen",
               "new_label": None} for r in rows if r["objective"] == "as-if-unseen"]
    if not unseen:
        return {}
    forget = build_forget_set(dataset, unseen, parent)
    holds = forget.satisfied_by(model)
    phi = confidence_logit(predict_logits(model, forget.x), forget.y)
    phi_ref = forget.reference_confidence(model)
    assert phi_ref is not None and forget.reference is not None and forget.level is not None
    rank = class_ranks(phi, forget.y, phi_ref, forget.reference[1]).mean().item()
    level = forget.level.mean().item()
    slack = UNSEEN_TOLERANCE_Z * (1.0 / (12 * len(unseen))) ** 0.5
    rule = (f"as-if-unseen: the batch's {len(unseen)} row(s) sit among held-out data of their "
            f"classes (mean rank {rank:.2f} <= mean level {level:.2f} + {slack:.2f})")
    return {r["instance_id"]: {"holds": bool(holds[i]), "rule": rule}
            for i, r in enumerate(unseen)}


def live_check(model, dataset, request: dict[str, Any],
               unseen: dict[int, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The champion's prediction for the request's instance, and whether its objective holds
    by the objective's own rule: ``misclassify`` predicted away from the original label,
    ``relabel`` predicted as the new label, ``as-if-unseen`` its batch's membership rule
    (``unseen``: ``unseen_check`` of the batch)."""
    import torch

    instance = int(request["instance_id"])
    dataset.check_ids([instance])
    with torch.no_grad():
        pred = int(model(dataset.train_x[instance:instance + 1]).argmax(1).item())
    label = int(dataset.train_y[instance])
    if request["objective"] == "as-if-unseen":
        verdict = (unseen or {}).get(instance)
        if verdict is None:
            raise ValueError(f"no as-if-unseen verdict for instance {instance}")
        return {"prediction": pred, "original_label": label, **verdict}
    if request["objective"] == "relabel":
        holds = pred == int(request["new_label"])
        rule = f"prediction == new label {request['new_label']}"
    else:
        holds = pred != label
        rule = f"prediction != original label {label}"
    return {"prediction": pred, "original_label": label, "rule": rule, "holds": holds}


def audit(paths: Paths, cfg: PipelineParams, ident: str, *, live: bool = True) -> dict[str, Any]:
    """The audit record of ``ident`` (a request id or an instance id).

    Raises AuditError when nothing matches (before touching MLflow). ``ok`` is False when a
    done request's objective no longer holds in the current champion.
    """
    shown = repr(ident if len(ident) <= 60 else ident[:60] + "…")  # one readable line
    if not ledger_present(paths.ledger):
        raise AuditError(f"no request {shown}: no deletion requests in {paths.home} yet")
    with Ledger(paths.ledger) as ledger:
        found = find_requests(ledger, ident)
        if not found:
            raise AuditError(f"no request or instance with id {shown} in the ledger")
        batches = {r["batch_id"]: ledger.batch(r["batch_id"]) for r in found}
        client = registry.connect(paths, cfg)
        name = cfg.registry.model_name
        champion = registry.alias_version(client, name, registry.CHAMPION)
        chain = ancestry(ledger, champion) if champion is not None else []
        covered = set(ledger.covered_batches(champion)) if champion is not None else set()
        # the release of the champion's lineage that carries each batch now: after
        # `rollback --reapply` it is the replay, not the replaced release that applied it first
        carrier = {b: next((v for v in chain if b in (ledger.release(v) or {}).get("batches", [])),
                           None) for b in batches}
        # exact retrains in the champion's lineage (consolidations, exact releases), newest
        # first like ``chain``: one at or after a batch's carrier never trained on its rows
        exact = escalation.exact_versions(client, name) if chain else set()
        exact_at = [i for i, v in enumerate(chain) if v in exact]
        champion_rel = ledger.release(champion) if champion is not None else None
        parent_version = champion_rel["parent"] if champion_rel else None
        unseen_rows = {b: ledger.requests(b) for b, batch in batches.items()
                       if batch is not None and batch.state == "done"
                       and any(r["batch_id"] == b and r["objective"] == "as-if-unseen"
                               for r in found)}

    model = None
    champion_sha = None
    verdicts: dict[str, dict[int, dict[str, Any]]] = {}
    served = None
    if champion is not None and live and any(b.state == "done" for b in batches.values()):
        # what consumers load (the logged MLflow model), against its fingerprint from
        # registration: the live check below reads the checkpoint, which they do not load
        served = registry.served_check(client, name, champion)
        from unlearning.models import load_checkpoint

        from .release import dataset_of

        fetched = registry.fetch_version(paths, client, name, champion)
        champion_sha = fetched["weights_sha256"]
        model, _ = load_checkpoint(fetched["path"], expected_sha256=champion_sha)
        dataset = dataset_of(cfg)
        if unseen_rows:  # levels from the model the champion was released from
            parent = model
            if parent_version is not None:
                got = registry.fetch_version(paths, client, name, int(parent_version))
                parent, _ = load_checkpoint(got["path"], expected_sha256=got["weights_sha256"])
            verdicts = {b: unseen_check(model, parent, dataset, rows)
                        for b, rows in unseen_rows.items()}

    records: list[dict[str, Any]] = []
    versions: dict[int, dict[str, Any]] = {}
    for r in found:
        b = batches[r["batch_id"]]
        rec: dict[str, Any] = {
            "request_id": r["request_id"], "instance_id": r["instance_id"],
            "instance_key": r.get("instance_key"), "objective": r["objective"],
            "new_label": r["new_label"],
            "requested": _iso(b.submitted), "batch_id": b.batch_id, "batch_state": b.state,
            "reason": b.reason, "updated": _iso(b.updated),
            "release": None, "in_champion_lineage": None, "live": None,
        }
        if b.state == "done" and b.version is not None:
            now = carrier.get(b.batch_id) or b.version  # the release that carries it now
            if now not in versions:
                versions[now] = version_record(client, name, now)
            rec["release"] = versions[now]
            rec["applied_by"] = b.version  # the release that applied it first
            rec["in_champion_lineage"] = now in chain and b.batch_id in covered
            if model is not None:
                rec["live"] = (live_check(model, dataset, r, verdicts.get(b.batch_id))
                               if r["objective"] == "as-if-unseen"
                               else live_check(model, dataset, r))
                retrained = now in chain and any(i <= chain.index(now) for i in exact_at)
                if not rec["live"]["holds"] and ((b.report or {}).get("exact") or retrained):
                    # released by exact retraining, or consolidated since (an exact retrain of
                    # the history, tasks/consolidation.py): a model never trained on the row
                    # may still predict it correctly; its influence is gone
                    rec["live"] = {**rec["live"], "holds": True, "exact": True,
                                   "rule": "done (exact): the champion descends from an exact "
                                   "retrain that never saw this row; its own rule ("
                                   + rec["live"]["rule"] + ") is not required"}
        elif b.version is not None:  # rejected after unlearning: the version is kept for audit
            rec["kept_version"] = b.version
        records.append(rec)

    done = [rec for rec in records if rec["batch_state"] == "done"]
    failures = [rec for rec in done if not rec["in_champion_lineage"]
                or (rec["live"] is not None and not rec["live"]["holds"])]
    if done and champion is None:
        failures = done
    served_ok = served is None or served["ok"] is not False
    return {"query": ident, "model": name, "champion": champion,
            "champion_weights_sha256": champion_sha, "champion_lineage": chain,
            "served": served, "requests": records, "ok": not failures and served_ok}
