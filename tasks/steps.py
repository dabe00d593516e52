"""The Prefect tasks: one per step, thin wrappers over the plain functions of this package.

Tasks take paths, the frozen params object and small dicts, and return small dicts; models
and tensors never cross a task boundary. Nothing is cached (every step has side effects or
reads mutable state). Only registry I/O retries; training and unlearning never do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from unlearning.progress import ProgressLine

from . import datastore, registry, release
from .faults import fault
from .gates import check_gates
from .ledger import Ledger, LedgerError
from .params import GatesParams, PipelineParams
from .paths import Paths
from .submit import revalidate


def _may_pass(task, task_run, state) -> bool:
    """Retry what may pass on a second try (a busy store, a dropped connection), not what
    fails the same way again: a checkpoint that does not match its hash, a version the
    registry lacks, a ledger that cannot be read or written."""
    from unlearning.models import CheckpointError

    return not isinstance(getattr(state, "data", None),
                          (CheckpointError, registry.RegistryError, LedgerError))


def _progress(label: str, fn):
    """Run ``fn(progress)`` with a terminal progress line (silent when not a TTY)."""
    line = ProgressLine(label)
    try:
        return fn(line)
    finally:
        line.close()


@task(name="validate-forget-set", cache_policy=NO_CACHE)
def validate_forget_set(paths: Paths, cfg: PipelineParams, batch_id: str,
                        image_shape: tuple[int, int, int]) -> dict[str, Any]:
    """Great Expectations suites on the batch, against the state it is applied to."""
    return revalidate(paths, cfg, batch_id, image_shape)


@task(name="fetch-model", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2,
      retry_condition_fn=_may_pass)
def fetch_model(paths: Paths, cfg: PipelineParams, version: int) -> dict[str, Any]:
    """Download a version's weights-only checkpoint; verify its weights_sha256."""
    client = registry.connect(paths, cfg)
    return registry.fetch_version(paths, client, cfg.registry.model_name, version)


@task(name="pretrain", cache_policy=NO_CACHE)
def train_model(paths: Paths, cfg: PipelineParams) -> dict[str, Any]:
    out = paths.artifacts / "pretrain" / "model.pt"
    return _progress("pretrain", lambda p: release.pretrain_model(cfg, out, p))


@task(name="adopt", cache_policy=NO_CACHE)
def adopt_model(paths: Paths, cfg: PipelineParams, request: dict[str, Any]) -> dict[str, Any]:
    """Read, check and evaluate the user's model; ``{"invalid": reason}`` for bad input (a
    usage error, not a failed task: nothing is registered)."""
    from .adopt import AdoptError, AdoptRequest
    from .adopt import adopt_model as adopt

    out = paths.artifacts / "adopt" / "model.pt"
    try:
        return adopt(paths, cfg, AdoptRequest.from_dict(request), out)
    except AdoptError as e:
        return {"invalid": str(e)}


@task(name="importance", cache_policy=NO_CACHE)
def prepare_unlearning(paths: Paths, cfg: PipelineParams, parent: dict[str, Any],
                       batch_id: str, earlier: list[str]) -> dict[str, Any] | None:
    """The method's set-up (``l2ul``: inverted MAS importance and the anchors), computed once
    per parent version, forget set and set-up settings and kept in artifacts/prepared/
    (``release.prepare_batch``); Prefect's own task cache is off, the file is the cache."""
    return release.prepare_batch(paths, cfg, parent, batch_id, earlier)


@task(name="unlearn", cache_policy=NO_CACHE)
def run_unlearning(paths: Paths, cfg: PipelineParams, parent: dict[str, Any], batch_id: str,
                   earlier: list[str], out: Path, prepared: dict[str, Any] | None,
                   held: list[str]) -> dict[str, Any]:
    """The bounded unlearning loop (the library's ``unlearn``) from the prepared set-up;
    ``held``: every batch the parent holds, never in a retain sample."""
    return _progress(f"unlearn {batch_id}", lambda p: release.unlearn_batch(
        paths, cfg, parent, batch_id, earlier, out, p, prepared, held=held))


@task(name="retrain-exact", cache_policy=NO_CACHE)
def retrain_exact_model(paths: Paths, cfg: PipelineParams, parent: dict[str, Any],
                        batch_ids: list[str], out: Path) -> dict[str, Any]:
    """The escalation's last resort: retrain from scratch without ``batch_ids``."""
    from .escalation import retrain_exact

    return _progress("retrain-exact", lambda p: retrain_exact(paths, cfg, parent, batch_ids,
                                                              out, p))


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_model(paths: Paths, cfg: PipelineParams, parent: dict[str, Any],
                   candidate: dict[str, Any], batch_id: str,
                   earlier: list[str], deleted_before: list[str]) -> dict[str, Any]:
    """``release.evaluate_candidate``: ``earlier`` are the batches whose objective must still
    hold, ``deleted_before`` every batch deleted before this one."""
    return release.evaluate_candidate(paths, cfg, parent, candidate, batch_id, earlier,
                                      deleted_before)


@task(name="check-gates", cache_policy=NO_CACHE)
def gate_candidate(metrics: dict[str, Any], gates: GatesParams, out: Path) -> dict[str, Any]:
    report = check_gates(metrics, gates)
    data = {**report.to_dict(), "summary": report.summary()}
    out.write_text(json.dumps(data, indent=2))
    return data


@task(name="register", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2,
      retry_condition_fn=_may_pass)
def register_model(paths: Paths, cfg: PipelineParams, **kwargs: Any) -> int:
    """An MLflow run and model version (tags: lineage, metrics, gates_passed)."""
    registry.connect(paths, cfg)
    return registry.register_release(paths, cfg, **kwargs)


@task(name="promote", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2,
      retry_condition_fn=_may_pass)
def promote_model(paths: Paths, cfg: PipelineParams, version: int) -> int | None:
    """Point ``champion`` at ``version`` (drop ``candidate`` if it named it); return the old one."""
    client = registry.connect(paths, cfg)
    name = cfg.registry.model_name
    previous = registry.alias_version(client, name, registry.CHAMPION)
    client.set_registered_model_alias(name, registry.CHAMPION, str(version))
    fault("after:champion_alias")
    if registry.alias_version(client, name, registry.CANDIDATE) == version:
        client.delete_registered_model_alias(name, registry.CANDIDATE)
    return previous


@task(name="mark-candidate", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2,
      retry_condition_fn=_may_pass)
def mark_candidate(paths: Paths, cfg: PipelineParams, version: int, passed: bool) -> None:
    """A passing version gets the ``candidate`` alias; a failing one keeps no alias."""
    if passed:
        client = registry.connect(paths, cfg)
        client.set_registered_model_alias(cfg.registry.model_name, registry.CANDIDATE,
                                          str(version))


@task(name="record", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2,
      retry_condition_fn=_may_pass)
def record_batch(paths: Paths, batch_id: str, state: str, version: int | None = None,
                 reason: str | None = None, report: dict[str, Any] | None = None,
                 promotion: tuple[int, int | None, str] | None = None) -> None:
    """The ledger's state change for a batch (and its promotion), in one transaction."""
    with Ledger(paths.ledger) as ledger:
        ledger.set_state(batch_id, state, version=version, reason=reason, report=report,
                         promotion=promotion)


@task(name="record-attempt", cache_policy=NO_CACHE)
def record_attempt(paths: Paths, batch_ids: list[str], attempt: dict[str, Any]) -> None:
    """The ledger accepts the attempt before anything is registered (LedgerError if it
    cannot be written: then nothing is)."""
    with Ledger(paths.ledger) as ledger:
        ledger.accept_attempt(batch_ids, attempt)


@task(name="record-release", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2,
      retry_condition_fn=_may_pass)
def record_release(paths: Paths, version: int, parent: int | None, batches: list[str],
                   passed: bool, built_with: dict[str, Any] | None = None) -> None:
    with Ledger(paths.ledger) as ledger:
        ledger.add_release(version, parent, batches, passed, built_with)


@task(name="track-data", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2,
      retry_condition_fn=_may_pass)
def track_data(paths: Paths, cfg: PipelineParams, version: int, export: bool = False) -> str:
    """Mirror the ledger into data/releases.json, ``dvc add data``, and record the resulting
    data revision as the version's ``data_rev``: the data/ that can rebuild it."""
    from .adopt import read_base, write_base

    if not (paths.data / "base").is_dir():  # a state folder from before `adopt`: pretrained
        write_base(paths, read_base(paths))
    rev = datastore.track(paths, cfg, export=export)
    client = registry.connect(paths, cfg)
    registry.set_data_rev(client, cfg.registry.model_name, version, rev)
    return rev
