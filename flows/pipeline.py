"""The release pipeline as Prefect flows: pretrain, process-deletions, promote, rollback.

Every flow takes ``home`` (the state folder; default: see ``tasks.paths.find_home``) so a
scheduled run knows where the state lives, and returns a small dict with a ``status``:
``ok``, ``refused`` (a guard said no: nothing changed) or ``failed`` (a precondition does not
hold). Unexpected errors raise: the flow run fails and the batch in hand stays pending.

One batch: validate -> fetch champion -> unlearn -> evaluate -> gates -> register
-> track data (data/releases.json, ``dvc add data``, tag ``data_rev``) -> (candidate, promote
to champion) -> ledger. Nothing is marked done before the champion
alias has moved; ``tasks.lineage.reconcile`` finishes the ledger if a run died between the
two, and refuses a champion that lacks a committed deletion.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from tasks import consolidation, escalation, registry, release
from tasks.adopt import write_base
from tasks.faults import fault
from tasks.gates import check_base_gates
from tasks.ledger import Ledger
from tasks.lineage import LineageError, guard, missing_reason, previous_champion, reconcile
from tasks.locks import pipeline_lock, pipeline_lock_holder, submit_lock
from tasks.params import EXACT_RETRAIN, PipelineParams, load_params
from tasks.paths import Paths, find_home
from tasks.release import manifest_problem
from tasks.state_check import check_state, new_base_refusal
from tasks.steps import (
    adopt_model,
    evaluate_model,
    fetch_model,
    gate_candidate,
    mark_candidate,
    prepare_unlearning,
    promote_model,
    record_attempt,
    record_batch,
    record_release,
    register_model,
    retrain_exact_model,
    run_unlearning,
    track_data,
    train_model,
    validate_forget_set,
)


class PipelineError(RuntimeError):
    """A state the pipeline cannot continue from (e.g. the registry disagrees with the ledger)."""


def setup(home: str | None) -> tuple[Paths, PipelineParams]:
    paths = Paths(Path(home).resolve() if home else find_home())
    cfg = load_params(paths.params_file)
    cfg.runtime.apply()
    return paths, cfg


_shape = registry.shape_of
input_shape = registry.input_shape  # here too: the flows' callers import it from this module


def dataset_mismatch(client, cfg: PipelineParams, version: int) -> str | None:
    """A reason if ``version`` was trained on another dataset than params.yaml names."""
    trained_on = registry.version_info(client, cfg.registry.model_name, version).tags.get("dataset")
    if trained_on and trained_on != cfg.dataset.name:
        return (f"the champion (version {version}) was trained on {trained_on!r} but "
                f"params.yaml says dataset.name: {cfg.dataset.name!r}")
    return None


def _damaged(paths: Paths, cfg: PipelineParams) -> dict[str, Any] | None:
    """A failure while the ledger, the registry and data/ disagree or the champion's served
    model changed (``tasks.state_check``): nothing may be accepted, promoted or released on
    top of records that cannot vouch for the committed deletions."""
    report = check_state(paths, cfg, served=True)
    if report.ok:
        return None
    return {"status": "failed", "damaged": True, "reason": report.line,
            "problems": [p.to_dict() for p in report.problems]}


@contextmanager
def _exclusive(paths: Paths, cfg: PipelineParams,
               after_lock: str | None = None) -> Iterator[dict[str, Any] | None]:
    """What every flow that builds on the registered releases does first: take the pipeline
    lock, then check the records (``_damaged``). Yields None when the flow may go on, else
    the refusal it returns (another command holds the lock, or the records disagree).
    ``after_lock``: a fault point (tasks/faults.py) between the two."""
    with pipeline_lock(paths, wait=False) as got:
        if not got:
            yield _busy(paths)
            return
        if after_lock:
            fault(after_lock)
        yield _damaged(paths, cfg)


def _busy(paths: Paths) -> dict[str, Any]:
    return {"status": "failed", "busy": True,
            "reason": f"another pipeline command is running ({pipeline_lock_holder(paths)}); "
                      "nothing was changed: try again when it has finished"}


# -- pretrain ---------------------------------------------------------------------------------


@flow(name="pretrain")
def pretrain_flow(home: str | None = None, dataset: str | None = None, arch: str | None = None,
                  epochs: int | None = None, seed: int | None = None) -> dict[str, Any]:
    """Train the base model and register it as version 1, the first ``champion``."""
    paths, cfg = setup(home)
    if dataset:
        cfg = cfg.with_overrides("dataset", name=dataset)
    cfg = cfg.with_overrides("pretrain", arch=arch, epochs=epochs, seed=seed)
    with pipeline_lock(paths, wait=False) as got:
        if not got:
            return _busy(paths)
        why = new_base_refusal(paths, cfg, "pretrain")  # never a base holding deleted data
        if why:
            return {"status": "refused", "reason": why}
        client = registry.connect(paths, cfg)
        existing = registry.list_versions(client, cfg.registry.model_name)
        if existing:
            return {"status": "refused", "reason": (
                f"{cfg.registry.model_name} already has {len(existing)} version(s); a new base "
                "model would not contain the deletions applied so far. Use a fresh state folder "
                "(UNLEARN_HOME) to start over")}
        record_attempt(paths, [], {"kind": "pretrain"})  # the ledger takes writes: then register
        trained = train_model(paths, cfg)
        data = release.dataset_of(cfg)
        spec = trained["spec"]
        metrics = {k: trained[k] for k in ("train_acc", "test_acc")}
        metrics["test_acc_before"] = metrics["test_acc"]
        metrics["weights_finite"] = float(trained["weights_finite"])
        gates = check_base_gates(metrics, cfg.gates)  # a base that fails is kept for audit
        tags = {
            "parent_version": "none", "batch_id": "none", "request_ids": "", "objective": "none",
            "method": "pretrain", "dataset": cfg.dataset.name, "arch": spec["arch"],
            "input_shape": f"{spec['in_channels']}x{spec['image_size']}x{spec['image_size']}",
            "seed": cfg.pretrain.seed, "status": "passed" if gates.passed else "failed",
            "gates_passed": "true" if gates.passed else "false",
            "gate_failures": ",".join(gates.failures),
            **_revs(paths, cfg), "weights_sha256": trained["weights_sha256"],
            "device": trained["device"],
        }
        version = register_model(
            paths, cfg, run_name="pretrain", checkpoint=trained["path"], tags=tags,
            metrics={**metrics, "train_seconds": trained["seconds"]},
            params={k: v for k, v in cfg.flat().items()
                    if k.split(".")[0] in ("dataset", "pretrain")},
            artifacts={}, input_example=data.test_x[:4].numpy())
        record_release(paths, version, None, [], gates.passed)
        write_base(paths, {"kind": "pretrain", "arch": spec["arch"],
                           "weights_sha256": trained["weights_sha256"]})
        track_data(paths, cfg, version, export=True)  # data/dataset, data.dvc -> data_rev
        if not gates.passed:
            return {"status": "failed", "version": version, **metrics,
                    "seconds": trained["seconds"], "gates": gates.to_dict(),
                    "reason": f"version {version}, the base model, failed its gates: "
                              f"{gates.summary()}; kept for audit, not champion (fix "
                              "params.yaml and start a fresh state folder)"}
        promote_model(paths, cfg, version)
        with Ledger(paths.ledger) as ledger:
            ledger.record_promotion(version, None, "pretrain")
    get_run_logger().info("registered %s version %s as champion", cfg.registry.model_name, version)
    return {"status": "ok", "version": version, **metrics, "seconds": trained["seconds"]}


# -- adopt ------------------------------------------------------------------------------------


@flow(name="adopt")
def adopt_flow(request: dict[str, Any], home: str | None = None) -> dict[str, Any]:
    """Register a model the user already has as version 1, the first ``champion``.

    ``request`` is a ``tasks.adopt.AdoptRequest`` as a dict. Bad input (the model does not
    fit, the source does not resolve, the registry already has versions) is ``invalid``,
    with nothing registered.
    """
    paths, cfg = setup(home)
    with pipeline_lock(paths, wait=False) as got:
        if not got:
            return _busy(paths)
        why = new_base_refusal(paths, cfg, "adopt")
        if why:
            return {"status": "refused", "reason": why}
        name = cfg.registry.model_name
        fresh = paths.tracking_uri == paths.default_tracking_uri \
            and not (paths.mlruns / "mlflow.db").exists()  # bad input must not create it
        existing = [] if fresh else registry.list_versions(registry.connect(paths, cfg), name)
        if existing:
            return {"status": "invalid", "reason": (
                f"{name} already has {len(existing)} version(s): adopt registers version 1 "
                "into an empty registry only (a new base model would not contain the "
                "deletions applied so far). Use a fresh state folder (UNLEARN_HOME)")}
        adopted = adopt_model(paths, cfg, request)
        if "invalid" in adopted:
            return {"status": "invalid", "reason": adopted["invalid"]}
        registry.connect(paths, cfg)
        data = release.dataset_of(cfg)
        spec = adopted["spec"]
        metrics = {"test_acc": adopted["test_acc"], "train_acc": adopted["train_acc"],
                   "test_acc_before": adopted["test_acc"],
                   "weights_finite": float(_finite_weights(adopted["path"]))}
        gates = check_base_gates(metrics, cfg.gates)  # a base that fails is kept for audit
        tags = {
            "parent_version": "none", "batch_id": "none", "request_ids": "", "objective": "none",
            "method": "adopt", "dataset": cfg.dataset.name, "arch": spec["arch"],
            "input_shape": f"{spec['in_channels']}x{spec['image_size']}x{spec['image_size']}",
            "input_contract": json.dumps(adopted["input_contract"], sort_keys=True),
            "classes": json.dumps(adopted["classes"]),
            "source": adopted["source"], "source_sha256": adopted["source_sha256"],
            "source_format": adopted["source_format"],
            "status": "passed" if gates.passed else "failed",
            "gates_passed": "true" if gates.passed else "false",
            "gate_failures": ",".join(gates.failures), **_revs(paths, cfg),
            "weights_sha256": adopted["weights_sha256"], "device": adopted["device"],
        }
        params = {k: v for k, v in cfg.flat().items() if k.split(".")[0] == "dataset"}
        params.update({f"adopt.{k}": v for k, v in request.items() if v is not None})
        version = register_model(
            paths, cfg, run_name="adopt", checkpoint=adopted["path"], tags=tags,
            metrics={**metrics, "adopt_seconds": adopted["seconds"]}, params=params,
            artifacts={"adopt": [str(paths.data / "base" / "source.json")]},
            input_example=data.test_x[:4].numpy())
        record_release(paths, version, None, [], gates.passed)
        track_data(paths, cfg, version, export=True)  # data/dataset, data/base -> data_rev
        if not gates.passed:
            return {"status": "failed", "version": version, **metrics,
                    "gates": gates.to_dict(),
                    "reason": f"version {version}, the adopted base model, failed its gates: "
                              f"{gates.summary()}; kept for audit, not champion"}
        promote_model(paths, cfg, version)
        with Ledger(paths.ledger) as ledger:
            ledger.record_promotion(version, None, "adopt")
    get_run_logger().info("adopted %s as %s version %s (champion)", adopted["source"], name,
                          version)
    return {"status": "ok", "version": version, **metrics, "seconds": adopted["seconds"],
            "warnings": adopted["warnings"],
            **{k: adopted[k] for k in ("source", "source_sha256", "source_format", "device",
                                       "input_contract", "weights_sha256")}}


def _finite_weights(checkpoint: str) -> bool:
    from unlearning.models import load_checkpoint

    model, _ = load_checkpoint(checkpoint)
    return all(bool(t.isfinite().all()) for t in model.state_dict().values()
               if t.is_floating_point())


def _revs(paths: Paths, cfg: PipelineParams) -> dict[str, str]:
    return {"data_rev": release.data_rev(paths.home), "code_rev": release.code_rev(),
            "params_sha256": cfg.sha256()}


# -- one batch --------------------------------------------------------------------------------


def _batch_tags(paths: Paths, cfg: PipelineParams, parent: dict[str, Any], batches: list[str],
                candidate: dict[str, Any], gates: dict[str, Any]) -> dict[str, Any]:
    rows = [r for b in batches for r in release.read_rows(paths.manifest(b))]
    objectives = sorted({r["objective"] for r in rows}) or ["none"]  # none: a consolidation
    return {
        **parent["tags"], **_revs(paths, cfg),
        "parent_version": parent["version"], "batch_id": ",".join(batches),
        "request_ids": ",".join(r["request_id"] for r in rows),
        "objective": objectives[0] if len(objectives) == 1 else "mixed",
        "method": cfg.unlearn.method, "seed": candidate["seed"],
        "weights_sha256": candidate["weights_sha256"], "device": candidate.get("device", "cpu"),
        "gates_passed": "true" if gates["passed"] else "false",
        "status": "passed" if gates["passed"] else "failed",
        "gate_failures": ",".join(gates["failures"]),
    }


def _register(paths: Paths, cfg: PipelineParams, parent: dict[str, Any], batches: list[str],
              candidate: dict[str, Any], metrics: dict[str, Any], gates: dict[str, Any],
              run_name: str, extra_tags: dict[str, Any] | None = None,
              built_with: dict[str, Any] | None = None) -> int:
    """Register a candidate as a version and publish it (``_publish``). ``built_with``: the
    method and params that built it (``_built``; default: ``cfg``'s primary method)."""
    folder = Path(candidate["path"]).parent
    params = {**cfg.flat(), "batch_ids": ",".join(batches), "parent_version": parent["version"]}
    artifacts = {
        "reports": [str(folder / f"{n}.json") for n in ("metrics", "gates", "unlearn", "validation")],
        "manifests": [str(paths.manifest(b)) for b in batches],
    }
    version = register_model(
        paths, cfg, run_name=run_name, checkpoint=candidate["path"],
        tags={**_batch_tags(paths, cfg, parent, batches, candidate, gates), **(extra_tags or {})},
        metrics={**metrics, "gates_passed": float(gates["passed"])}, params=params,
        artifacts=artifacts, input_example=release.dataset_of(cfg).test_x[:4].numpy())
    return _publish(paths, cfg, version, parent["version"], batches, gates["passed"],
                    built_with or _built(escalation.primary(cfg)))


def _built(attempt: escalation.Attempt, steps: list[dict[str, Any]] | None = None
           ) -> dict[str, Any]:
    """What the ledger and data/releases.json record as a release's ``built_with``: its
    method and params, and for a replay applied with several attempts, one per batch."""
    return {**attempt.record(), **({"steps": steps} if steps else {})}


def _publish(paths: Paths, cfg: PipelineParams, version: int, parent: int, batches: list[str],
             passed: bool, built_with: dict[str, Any]) -> int:
    """A registered version into the ledger (with the method and params that built it),
    data/ and (if it passed) the candidate alias. Every step is idempotent: a resumed run
    repeats them for a version it adopts."""
    record_release(paths, version, parent, batches, passed, built_with)
    fault("after:record_release")
    track_data(paths, cfg, version)  # data/releases.json, data.dvc -> data_rev
    mark_candidate(paths, cfg, version, passed)
    fault("after:candidate_alias")
    return version


def _adopt(paths: Paths, cfg: PipelineParams, client, batch_id: str, champion: int,
           attempt: escalation.Attempt | None = None,
           folder: Path | None = None) -> tuple[int, dict[str, Any], dict[str, Any]] | None:
    """A version an interrupted run registered for ``batch_id`` on the current champion
    (for ``attempt``, when given: its report in ``folder``): (version, metrics, gates) read
    back from the registry, or None if there is none."""
    if attempt is None:
        mv = registry.find_batch_version(client, cfg.registry.model_name, batch_id, champion,
                                         cfg.sha256())
    else:
        mv = escalation.find_attempt(client, cfg, batch_id, champion, attempt)
    registry.close_stale_runs(client, cfg.registry.experiment, batch_id,
                              registered_run=mv.run_id if mv is not None else None)
    if mv is None:
        return None
    metrics: dict[str, Any] = dict(client.get_run(mv.run_id).data.metrics)
    failures = [g for g in mv.tags.get("gate_failures", "").split(",") if g]
    gates: dict[str, Any] = {"passed": mv.tags.get("gates_passed") == "true",
                             "failures": failures, "summary": ", ".join(failures)}
    saved = (folder or paths.batch_dir(batch_id)) / "gates.json"
    try:  # the full report the interrupted run wrote, if it is there and agrees
        report = json.loads(saved.read_text())
        if report.get("passed") == gates["passed"]:
            gates = report
    except (OSError, ValueError):
        pass
    get_run_logger().warning("%s: resuming with version %s, registered by an interrupted run",
                             batch_id, mv.version)
    return int(mv.version), metrics, gates


def base_test_acc(paths: Paths, cfg: PipelineParams, client,
                  version: int) -> tuple[int, float] | None:
    """The base of ``version``'s lineage (the last exact model: pretrained or adopted, a
    consolidation or an exact retrain; ``consolidation.since_base``) and the held-out
    accuracy recorded on it."""
    drift = _drift(paths, cfg, client, version)
    if drift is None:
        return None
    acc = _recorded_test_acc(client, cfg, drift.base)
    return None if acc is None else (drift.base, acc)


def _recorded_test_acc(client, cfg: PipelineParams, version: int) -> float | None:
    """The held-out accuracy recorded on ``version`` (its run's metric, else its tag)."""
    mv = registry.version_info(client, cfg.registry.model_name, version)
    try:
        acc = client.get_run(mv.run_id).data.metrics.get("test_acc")
    except Exception:  # noqa: BLE001  (a deleted run: the version's tag holds it too)
        acc = None
    if acc is None and "test_acc" in mv.tags:
        acc = float(mv.tags["test_acc"])
    return None if acc is None else float(acc)


def _drift(paths: Paths, cfg: PipelineParams, client, version: int) -> consolidation.Drift | None:
    @functools.cache  # asked once, when the walk meets a release the ledger calls inexact
    def exact_versions() -> set[int]:
        return escalation.exact_versions(client, cfg.registry.model_name)

    def exact(v: int) -> bool:
        return v in exact_versions()

    with Ledger(paths.ledger) as ledger:
        return consolidation.since_base(ledger, version, exact)


def cumulative_drop(paths: Paths, cfg: PipelineParams, client, parent: int,
                    metrics: dict[str, Any]) -> dict[str, Any]:
    """``base_version``, ``base_test_acc`` and ``cumulative_drop`` (held-out points lost since
    the base of ``parent``'s lineage) for a candidate's metrics; the gate bounds the last, so
    many small drops cannot add up unseen. Empty when no base is recorded."""
    base = base_test_acc(paths, cfg, client, parent)
    if base is None or metrics.get("test_acc") is None:
        return {}
    return {"base_version": base[0], "base_test_acc": base[1],
            "cumulative_drop": base[1] - float(metrics["test_acc"])}


def _apply_batch(paths: Paths, cfg: PipelineParams, client, batch_id: str,
                 method: str | None = None) -> dict[str, Any]:
    """Validate, unlearn, evaluate, gate, register and (if it passes) promote one batch; a
    release that fails its gates is followed by the next attempt of the escalation policy
    (``unlearn.fallback``; ``method``: that method alone), from the same champion."""
    start = time.perf_counter()
    name = cfg.registry.model_name
    champion = registry.alias_version(client, name, registry.CHAMPION)
    if champion is None:
        raise PipelineError(f"the champion alias of {name} disappeared during the run")
    tags = registry.version_info(client, name, champion).tags
    checked = validate_forget_set(paths, cfg, batch_id, _shape(tags))
    if not checked["success"]:
        reason = "validation: " + checked["summary"]
        record_batch(paths, batch_id, "rejected", reason=reason, report=checked)
        return {"batch_id": batch_id, "state": "rejected", "reason": reason}
    objectives = {r["objective"] for r in release.read_rows(paths.manifest(batch_id))}
    with Ledger(paths.ledger) as ledger:  # attempts before a retry stay on record
        earlier_report = (b.report or {}) if (b := ledger.batch(batch_id)) else {}
    prior = list(earlier_report.get("escalation") or [])
    tried: list[dict[str, Any]] = []
    for attempt in escalation.plan(cfg, objectives, method):  # the policy: next on failure
        tried.append(_attempt(paths, cfg, client, batch_id, champion, attempt, tried))
        if tried[-1]["gates"]["passed"]:
            break
    last = tried[-1]
    version, metrics, gates = last["version"], last["metrics"], last["gates"]
    again = {t["version"] for t in tried}  # a re-queued batch may reuse an attempt
    report = {"gates": gates, "escalation": [p for p in prior if p["version"] not in again]
              + [_attempt_record(t) for t in tried],
              "exact": bool(gates["passed"] and last["exact"])}
    if gates["passed"]:
        promote_model(paths, cfg, version)
        record_batch(paths, batch_id, "done", version=version, report=report,
                     promotion=(version, champion, "promote"))
        state, reason = "done", None
    else:  # an open obligation: `unlearn requests` lists it, `unlearn retry` re-queues it
        reason = "gates: " + "; ".join(
            f"attempt {t['attempt']} ({t['method']}, version {t['version']}): "
            f"{t['gates']['summary']}" for t in tried)
        record_batch(paths, batch_id, "rejected", version=version, reason=reason,
                     report=report)
        state = "rejected"
    total = time.perf_counter() - start
    return {"batch_id": batch_id, "state": state, "version": version, "parent": champion,
            "reason": reason, "metrics": metrics, "gates": gates,
            "seconds": total, "unlearn_seconds": sum(t["seconds"] for t in tried),
            "resumed": any(t["resumed"] for t in tried), "exact": report["exact"],
            "attempts": report["escalation"]}


def _attempt_record(t: dict[str, Any]) -> dict[str, Any]:
    """One attempt as the ledger keeps it (``unlearn requests --json``, ``unlearn audit``)."""
    return {"attempt": t["attempt"], "version": t["version"], "method": t["method"],
            "params": t["params"], "exact": t["exact"], "passed": t["gates"]["passed"],
            "escalated_from": t["escalated_from"], "summary": t["gates"].get("summary"),
            "failures": [{"gate": c["name"], "value": c["value"], "limit": c["limit"],
                          "detail": c["detail"]}
                         for c in t["gates"].get("checks", []) if not c["passed"]]
            or [{"gate": f} for f in t["gates"]["failures"]]}


def _attempt(paths: Paths, cfg: PipelineParams, client, batch_id: str, champion: int,
             attempt: escalation.Attempt, tried: list[dict[str, Any]]) -> dict[str, Any]:
    """One attempt of the escalation policy on ``batch_id`` from ``champion``: registered
    (passed or not) with tags ``attempt``, ``attempt_key`` and ``escalated_from``; a version
    an interrupted run registered for the same attempt is finished instead."""
    first = attempt == escalation.primary(cfg)
    folder = paths.batch_dir(batch_id) / ("" if first else f"attempt-{attempt.key[:8]}")
    acfg = escalation.attempt_params(cfg, attempt)
    base = {**attempt.record(), "exact": attempt.exact,
            "escalated_from": tried[-1]["version"] if tried else None}
    if not tried:  # a retry: escalated from the batch's last failed version, if any
        versions = escalation.batch_versions(client, cfg.registry.model_name, batch_id)
        failed = [int(mv.version) for mv in versions if mv.tags.get("gates_passed") == "false"]
        base["escalated_from"] = failed[-1] if failed else None
    adopted = _adopt(paths, cfg, client, batch_id, champion, attempt, folder)
    if adopted is not None:  # registered before a crash: finish it, never register it twice
        version, metrics, gates = adopted
        _publish(paths, cfg, version, champion, [batch_id], gates["passed"], _built(attempt))
        number = int(registry.version_info(client, cfg.registry.model_name, version)
                     .tags.get("attempt") or 1)
        return {**base, "attempt": number, "version": version, "metrics": metrics,
                "gates": gates, "seconds": metrics.get("unlearn_seconds", 0.0), "resumed": True}
    number = len(escalation.batch_versions(client, cfg.registry.model_name, batch_id)) + 1
    # the ledger accepts the attempt before anything is registered for it
    record_attempt(paths, [batch_id], {"kind": "release", "parent": champion,
                                       "attempt": number, "method": attempt.method})
    fault(f"in:attempt-{number}")
    parent = fetch_model(paths, cfg, champion)
    earlier, recent = _earlier(paths, cfg, client, champion)
    candidate, metrics, gates = _build_and_gate(paths, cfg, client, attempt, parent, batch_id,
                                                earlier, recent, folder / "candidate.pt",
                                                champion)
    extra = {"attempt": str(number), "attempt_key": attempt.key, "method": attempt.method,
             "params_sha256": cfg.sha256(),  # params.yaml as a whole: it names the attempt
             "escalated_from": str(base["escalated_from"] or "")}
    if attempt.exact:
        extra.update(exact="true", seed=cfg.pretrain.seed)
    elif not first:
        extra["method_params"] = json.dumps(attempt.params, sort_keys=True)
    version = _register(paths, acfg if not attempt.exact else cfg, parent, [batch_id],
                        candidate, metrics, gates, run_name=f"unlearn-{batch_id}"
                        + ("" if number == 1 else f"-attempt-{number}"), extra_tags=extra,
                        built_with=_built(attempt))
    return {**base, "attempt": number, "version": version, "metrics": metrics,
            "gates": gates, "seconds": candidate["seconds"], "resumed": False}


def _earlier(paths: Paths, cfg: PipelineParams, client,
             version: int) -> tuple[list[str], list[str]]:
    """Every batch ``version`` holds, and those unlearned since the last exact model of its
    lineage (``consolidation.unlearned_since_exact``; every batch if the ledger does not
    record the lineage)."""
    with Ledger(paths.ledger) as ledger:
        covered = ledger.covered_batches(version)
    drift = _drift(paths, cfg, client, version)
    return covered, drift.batches if drift is not None else covered


def _build_and_gate(paths: Paths, cfg: PipelineParams, client, attempt: escalation.Attempt,
                    parent: dict[str, Any], batch_id: str, earlier: list[str],
                    recent: list[str], out: Path,
                    lineage_of: int) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """One attempt's candidate for ``batch_id`` from ``parent``, evaluated and gated: an exact
    retrain without ``earlier`` (every batch the parent holds) and the batch, gated by the
    exact gates; or the attempt's method, which keeps ``recent`` (the batches unlearned since
    the last exact model) forgotten and is gated on them. The cumulative drop is measured
    from the base of ``lineage_of``."""
    if attempt.exact:
        candidate = retrain_exact_model(paths, cfg, parent, [*earlier, batch_id], out)
    else:
        acfg = escalation.attempt_params(cfg, attempt)
        prepared = prepare_unlearning(paths, acfg, parent, batch_id, recent)
        candidate = run_unlearning(paths, acfg, parent, batch_id, recent, out, prepared,
                                   earlier)
    metrics = evaluate_model(paths, cfg, parent, candidate, batch_id, recent, earlier)
    metrics.update(cumulative_drop(paths, cfg, client, lineage_of, metrics))
    if attempt.exact:
        gates = escalation.exact_gates(metrics, cfg.gates)
        out.with_name("gates.json").write_text(json.dumps(gates, indent=2))
    else:
        gates = gate_candidate(metrics, cfg.gates, out.with_name("gates.json"))
    return candidate, metrics, gates


@flow(name="process-deletions")
def process_deletions_flow(home: str | None = None) -> dict[str, Any]:
    """Apply every pending batch in submission order, each from the current champion."""
    paths, cfg = setup(home)
    logger = get_run_logger()
    with _exclusive(paths, cfg, after_lock="after:lock") as refused:
        if refused is not None:
            return refused
        client = registry.connect(paths, cfg)
        name = cfg.registry.model_name
        champion = registry.alias_version(client, name, registry.CHAMPION)
        if champion is None:
            return {"status": "failed", "reason": "no champion yet: run `unlearn pretrain`"}
        mismatch = dataset_mismatch(client, cfg, champion)
        if mismatch:
            return {"status": "failed", "reason": mismatch}
        fault("before:list_pending")
        # under the submit lock: a submit in flight holds it from its ledger record until its
        # manifest is in data/deletions/, so every pending batch read here has its manifest
        with submit_lock(paths), Ledger(paths.ledger) as ledger:
            pending_batches = ledger.batches("pending")
            problems = [p for b in pending_batches if (p := manifest_problem(paths, b))]
            if problems:  # before anything moves: a tampered or lost input stops the run
                more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                return {"status": "failed", "reason": problems[0] + more}
            try:
                reconciled = reconcile(ledger, champion)
            except LineageError as e:
                return {"status": "failed", "reason": str(e)}
            pending = [b.batch_id for b in ledger.batches("pending")]
        if registry.alias_version(client, name, registry.CANDIDATE) == champion:
            client.delete_registered_model_alias(name, registry.CANDIDATE)  # a run died mid-promote
        results, consolidated = [], []
        for batch_id in pending:
            result = _apply_batch(paths, cfg, client, batch_id)
            logger.info("%s: %s%s", batch_id, result["state"],
                        f" (version {result['version']})" if result.get("version") else "")
            results.append(result)
            if result["state"] == "done":  # the next batch starts from the new base
                consolidated += _consolidate_if_due(paths, cfg, client)
        if not pending:  # due by a params.yaml change, or after an interrupted run
            consolidated += _consolidate_if_due(paths, cfg, client)
        champion = registry.alias_version(client, cfg.registry.model_name, registry.CHAMPION)
    return {"status": "ok", "batches": results, "consolidations": consolidated,
            "champion": champion, "reconciled": reconciled}


def _consolidate_if_due(paths: Paths, cfg: PipelineParams, client) -> list[dict[str, Any]]:
    """Consolidate the champion when ``consolidation.due``: an exact retrain of its whole
    deletion history, registered as a release with no batches of its own and, if it passes
    the exact gates, promoted (the new base). [] when not due; one result otherwise."""
    name = cfg.registry.model_name
    champion = registry.alias_version(client, name, registry.CHAMPION)
    if champion is None:
        return []
    drift = _drift(paths, cfg, client, champion)
    if drift is None:
        return []
    base_acc = _recorded_test_acc(client, cfg, drift.base)
    acc = registry.version_info(client, name, champion).tags.get("test_acc")
    lost = base_acc - float(acc) if base_acc is not None and acc is not None else None
    why = consolidation.due(cfg, drift, lost)
    if why is None:
        return []
    get_run_logger().info("consolidating version %s: %s", champion, why)
    start = time.perf_counter()
    found = consolidation.find(client, cfg, champion)
    if found is not None:  # registered before a crash: finish it, never register it twice
        version, passed = int(found.version), found.tags.get("gates_passed") == "true"
        gates = {"passed": passed, "failures": [g for g in found.tags.get(
            "gate_failures", "").split(",") if g]}
        metrics = dict(client.get_run(found.run_id).data.metrics)
        _publish(paths, cfg, version, champion, [], passed,
                 _built(escalation.Attempt(EXACT_RETRAIN)))
    else:
        fault("in:consolidate")
        parent = fetch_model(paths, cfg, champion)
        with Ledger(paths.ledger) as ledger:
            covered = ledger.covered_batches(champion)
        out = paths.artifacts / "consolidations" / f"from-v{champion}" / "candidate.pt"
        candidate = retrain_exact_model(paths, cfg, parent, covered, out)
        # objective rates on the newest batch and the earlier ones: reported, not gated
        metrics = evaluate_model(paths, cfg, parent, candidate, covered[-1], covered[:-1],
                                 covered[:-1])
        metrics.update(cumulative_drop(paths, cfg, client, champion, metrics))
        gates = escalation.exact_gates(metrics, cfg.gates)
        out.with_name("gates.json").write_text(json.dumps(gates, indent=2))
        extra = {consolidation.CONSOLIDATION_TAG: "true", "method": EXACT_RETRAIN,
                 "exact": "true", "seed": cfg.pretrain.seed, "params_sha256": cfg.sha256(),
                 "consolidated_rows": str(drift.rows), "consolidated_from": str(drift.base)}
        version = _register(paths, cfg, parent, [], candidate, metrics, gates,
                            run_name=f"consolidate-v{champion}", extra_tags=extra,
                            built_with=_built(escalation.Attempt(EXACT_RETRAIN)))
        passed = gates["passed"]
    if passed:
        _set_champion(paths, cfg, version, "consolidate", note=why)
    return [{"version": version, "parent": champion, "passed": passed, "reason": why,
             "rows": drift.rows, "base": drift.base, "gates": gates,
             "test_acc": metrics.get("test_acc"), "seconds": time.perf_counter() - start}]


# -- retry ------------------------------------------------------------------------------------


def retry_problem(cfg: PipelineParams, batch, method: str | None) -> str | None:
    """Why ``batch`` cannot be retried (None if it can): only a batch whose release failed
    its gates (an open obligation) is; ``method`` must be one the pipeline runs."""
    from tasks.obligations import status_of

    if batch is None:
        return "no such batch"
    status = status_of(batch)
    if status != "open" or batch.state != "rejected":
        what = {"invalid": f"was rejected at validation ({batch.reason}); fix the manifest "
                           "and submit it again",
                "open": "is pending already: `unlearn run` applies it"}.get(
            status, f"is {status} already")
        return f"batch {batch.batch_id} {what}"
    if method is not None:
        from tasks.params import ParamsError

        try:  # checked as a fallback entry is: known, and runnable by the pipeline
            cfg.with_overrides("unlearn", fallback=[{"method": method}])
        except ParamsError as e:
            return f"--method {method}: {str(e).split('.method: ', 1)[-1]}"
    return None


@flow(name="retry")
def retry_flow(batch_id: str, method: str | None = None,
               home: str | None = None) -> dict[str, Any]:
    """Re-queue a batch whose release failed its gates (``pending`` again: the next run
    applies it with the whole escalation policy); with ``method``, apply it now with that
    method alone, from the current champion."""
    paths, cfg = setup(home)
    with _exclusive(paths, cfg) as refused:
        if refused is not None:
            return refused
        with Ledger(paths.ledger) as ledger:
            batch = ledger.batch(batch_id)
            why = retry_problem(cfg, batch, method)
            if why is None:
                ids = {r["instance_id"] for r in ledger.requests(batch_id)}
                again = ids & ledger.claimed_instances(exclude_batch=batch_id)
                if again:
                    why = (f"instance(s) {', '.join(map(str, sorted(again)[:5]))} of batch "
                           f"{batch_id} were submitted again in another batch: that one "
                           "carries the obligation now")
            if why is not None:
                return {"status": "invalid", "reason": why}
            problem = manifest_problem(paths, batch)
            if problem:
                return {"status": "failed", "reason": problem}
            with ledger.transaction() as db:  # an open obligation back in the queue
                db.execute("UPDATE batches SET state='pending', updated=? WHERE batch_id=? "
                           "AND state='rejected'", (time.time(), batch_id))
        if method is None:
            return {"status": "ok", "requeued": batch_id, "batches": []}
        client = registry.connect(paths, cfg)
        if registry.alias_version(client, cfg.registry.model_name, registry.CHAMPION) is None:
            return {"status": "failed", "reason": "no champion yet: run `unlearn pretrain`"}
        result = _apply_batch(paths, cfg, client, batch_id, method)
        consolidated = (_consolidate_if_due(paths, cfg, client)
                        if result["state"] == "done" else [])
        champion = registry.alias_version(client, cfg.registry.model_name, registry.CHAMPION)
    return {"status": "ok", "requeued": batch_id, "batches": [result],
            "consolidations": consolidated, "champion": champion}


# -- promote and rollback ---------------------------------------------------------------------


def _set_champion(paths: Paths, cfg: PipelineParams, version: int, action: str,
                  note: str | None = None) -> dict[str, Any]:
    previous = promote_model(paths, cfg, version)
    with Ledger(paths.ledger) as ledger:
        ledger.record_promotion(version, previous, action, note)
    return {"status": "ok", "champion": version, "previous": previous, "action": action}


@flow(name="promote")
def promote_flow(version: int, home: str | None = None) -> dict[str, Any]:
    """Make ``version`` the champion, if it passed its gates and holds every deletion."""
    paths, cfg = setup(home)
    with _exclusive(paths, cfg) as refused:
        if refused is not None:
            return refused
        client = registry.connect(paths, cfg)
        if not _exists(client, cfg, version):
            return _unknown(cfg, version)
        champion = registry.alias_version(client, cfg.registry.model_name, registry.CHAMPION)
        if champion == version:
            return {"status": "ok", "champion": version, "previous": version, "action": "none"}
        with Ledger(paths.ledger) as ledger:
            why, missing = guard(ledger, version)
            if why is None and missing:
                why = missing_reason(ledger, version, missing, "Use `unlearn rollback --to "
                                     f"{version} --reapply` to replay them onto it instead")
        if why:
            return {"status": "refused", "reason": why, "champion": champion}
        return _set_champion(paths, cfg, version, "promote")


def _exists(client, cfg: PipelineParams, version: int) -> bool:
    try:
        registry.version_info(client, cfg.registry.model_name, version)
    except registry.RegistryError:
        return False
    return True


def _unknown(cfg: PipelineParams, version: int) -> dict[str, Any]:
    return {"status": "invalid", "reason": f"{cfg.registry.model_name} has no version {version}"}


def _adopt_replay(paths: Paths, cfg: PipelineParams, target: int,
                  missing: list[str]) -> dict[str, Any] | None:
    """The version an interrupted ``rollback --reapply`` registered for ``missing`` onto
    ``target`` (or for the first batches of it, where a failed gate stopped the replay),
    published again (idempotent) instead of registering a second copy; None if there is
    none."""
    client = registry.connect(paths, cfg)
    for n in range(len(missing), 0, -1):
        if n < len(missing):  # only a replay its gates stopped: an older, passing replay of
            mv = registry.find_batch_version(  # fewer batches is not this one
                client, cfg.registry.model_name, ",".join(missing[:n]), target, cfg.sha256())
            if mv is None or mv.tags.get("gates_passed") != "false":
                continue
        adopted = _adopt(paths, cfg, client, ",".join(missing[:n]), target)
        if adopted is None:
            continue
        version, _, gates = adopted
        passed = gates["passed"] and n == len(missing)
        tags = registry.version_info(client, cfg.registry.model_name, version).tags
        steps = escalation.replay_steps(cfg, tags, missing[:n])
        built = (_built(steps[-1], [_built(a) for a in steps]) if steps
                 else _built(escalation.primary(cfg)))
        _publish(paths, cfg, version, target, missing[:n], passed, built)
        return {"version": version, "passed": passed, "steps": [], "resumed": True,
                "gates": {**gates, "passed": passed}}
    return None


def _journal(paths: Paths) -> Path:
    """``rollback --reapply`` in progress: {from, target, missing}; a retry finishes it."""
    return paths.artifacts / "rollback.json"


def _read_journal(paths: Paths, client, cfg: PipelineParams,
                  champion: int) -> dict[str, Any] | None:
    """The interrupted rollback this one may finish: its champion is still the one it started
    from, or the version it replayed (the alias moved before the ledger recorded it).
    Anything else is stale and removed."""
    path = _journal(paths)
    try:
        journal = json.loads(path.read_text())
        target, missing, start = int(journal["target"]), list(journal["missing"]), journal["from"]
    except (OSError, ValueError, KeyError, TypeError):
        path.unlink(missing_ok=True)
        return None
    if champion == start:
        return journal
    tags = registry.version_info(client, cfg.registry.model_name, champion).tags
    if tags.get("parent_version") == str(target) and tags.get("batch_id") == ",".join(missing):
        return {**journal, "version": champion}
    path.unlink(missing_ok=True)
    return None


def _replay(paths: Paths, cfg: PipelineParams, target: int, missing: list[str]) -> dict[str, Any]:
    """Apply ``missing`` batches in order onto ``target``; register the result as one version
    (or finish the one an interrupted replay registered)."""
    resumed = _adopt_replay(paths, cfg, target, missing)
    if resumed is not None:
        return resumed
    record_attempt(paths, missing, {"kind": "replay", "onto": target})  # before registering
    base = fetch_model(paths, cfg, target)
    client = registry.connect(paths, cfg)
    earlier, recent = _earlier(paths, cfg, client, target)
    current, steps = base, list[dict[str, Any]]()
    primary = escalation.primary(cfg)
    for batch_id in missing:
        objectives = {r["objective"] for r in release.read_rows(paths.manifest(batch_id))}
        for attempt in escalation.plan(cfg, objectives):  # the policy, as for a new batch
            folder = paths.artifacts / "replay" / f"from-v{target}" / batch_id
            out = (folder if attempt == primary else folder / f"attempt-{attempt.key[:8]}") \
                / "candidate.pt"
            candidate, metrics, gates = _build_and_gate(paths, cfg, client, attempt, current,
                                                        batch_id, earlier, recent, out, target)
            if gates["passed"]:
                break
        steps.append({"batch_id": batch_id, "gates": gates, "metrics": metrics,
                      **attempt.record()})
        earlier = earlier + [batch_id]
        recent = [] if attempt.exact else recent + [batch_id]  # an exact step: nothing drifts
        current = {**candidate, "version": None, "tags": base["tags"]}
        if not gates["passed"]:
            break
    passed = all(s["gates"]["passed"] for s in steps) and len(steps) == len(missing)
    gates = {**steps[-1]["gates"], "passed": passed,
             "failures": sorted({f for s in steps for f in s["gates"]["failures"]})}
    used = [escalation.Attempt.from_record(s) for s in steps]
    extra, built = {}, _built(primary)
    if any(a != primary for a in used):  # `unlearn verify` and `dvc repro` follow each step
        records = [_built(a) for a in used]
        extra = {"replay_steps": json.dumps(records, sort_keys=True), "method": used[-1].method}
        built = _built(used[-1], records)
    version = _register(paths, cfg, base, missing[: len(steps)], current, steps[-1]["metrics"],
                        gates, run_name=f"replay-onto-v{target}", extra_tags=extra,
                        built_with=built)
    return {"version": version, "passed": passed, "steps": steps, "gates": gates}


@flow(name="rollback")
def rollback_flow(to: int | None = None, reapply: bool = False,
                  home: str | None = None) -> dict[str, Any]:
    """Point the champion back at ``to`` (default: the champion before the current one).

    Refused when ``to`` lacks a committed deletion, unless ``reapply``: then the missing
    batches are replayed onto ``to`` and the result, if it passes the gates, becomes champion.
    """
    paths, cfg = setup(home)
    with _exclusive(paths, cfg) as refused:
        if refused is not None:
            return refused
        client = registry.connect(paths, cfg)
        champion = registry.alias_version(client, cfg.registry.model_name, registry.CHAMPION)
        if champion is None:
            return {"status": "failed", "reason": "no champion yet: nothing to roll back"}
        journal = _read_journal(paths, client, cfg, champion) if reapply else None
        if journal is not None and to not in (None, journal["target"]):
            journal = None  # another rollback: the interrupted one is left as it was
        if journal is not None and "version" in journal:  # killed after moving the alias
            return _finish_rollback(paths, cfg, journal)
        with Ledger(paths.ledger) as ledger:
            target = to if to is not None else (
                journal["target"] if journal is not None else previous_champion(ledger, champion))
            if target is None:
                return {"status": "refused", "champion": champion,
                        "reason": f"no earlier champion recorded before version {champion}"}
            if not _exists(client, cfg, target):
                return _unknown(cfg, target)
            why, missing = guard(ledger, target)
            if why is None and missing and not reapply:
                why = missing_reason(ledger, target, missing, "Use --reapply to replay them onto "
                                     f"version {target} as a new version")
        if why:
            return {"status": "refused", "reason": why, "champion": champion, "target": target}
        if target == champion:
            return {"status": "ok", "champion": champion, "previous": champion, "action": "none"}
        if not missing:
            return _set_champion(paths, cfg, target, "rollback")
        _journal(paths).write_text(json.dumps({"from": champion, "target": target,
                                               "missing": missing}))
        replay = _replay(paths, cfg, target, missing)
        if replay["passed"] and replay["version"] == champion:  # done before: nothing moves
            if registry.alias_version(client, cfg.registry.model_name,
                                      registry.CANDIDATE) == champion:
                client.delete_registered_model_alias(cfg.registry.model_name,
                                                     registry.CANDIDATE)
            _journal(paths).unlink(missing_ok=True)
            return {"status": "ok", "champion": champion, "previous": champion,
                    "action": "none", "target": target, "replayed": missing, "resumed": True}
        if not replay["passed"]:
            _journal(paths).unlink(missing_ok=True)
            return {"status": "failed", "champion": champion, "version": replay["version"],
                    "reason": f"replay onto version {target} failed its gates: "
                              + ", ".join(replay["gates"]["failures"])}
        result = _set_champion(paths, cfg, replay["version"], "rollback-reapply",
                               note=f"v{target} + {', '.join(missing)}")
        _journal(paths).unlink(missing_ok=True)
        return {**result, "target": target, "replayed": missing,
                "resumed": bool(replay.get("resumed"))}


def _finish_rollback(paths: Paths, cfg: PipelineParams, journal: dict[str, Any]) -> dict[str, Any]:
    """A ``rollback --reapply`` killed after the champion alias moved to its replayed version:
    clear ``candidate``, record the promotion the ledger lacks, and report it as done."""
    version, start = int(journal["version"]), int(journal["from"])
    target, missing = int(journal["target"]), list(journal["missing"])
    client = registry.connect(paths, cfg)
    name = cfg.registry.model_name
    if registry.alias_version(client, name, registry.CANDIDATE) == version:
        client.delete_registered_model_alias(name, registry.CANDIDATE)
    with Ledger(paths.ledger) as ledger:
        history = ledger.promotions()
        if not history or history[-1]["version"] != version:
            ledger.record_promotion(version, start, "rollback-reapply",
                                    note=f"v{target} + {', '.join(missing)}")
    _journal(paths).unlink(missing_ok=True)
    return {"status": "ok", "champion": version, "previous": start,
            "action": "rollback-reapply", "target": target, "replayed": missing,
            "resumed": True}
