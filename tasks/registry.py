"""MLflow: tracking runs, the model registry, aliases, and loading a version's weights.

Each release version carries two copies of the same weights:

- the logged MLflow model, ``serialization_format="pt2"`` (torch.export with a dynamic batch
  dimension): what a consumer loads with ``mlflow.pytorch.load_model("models:/NAME@champion")``
  without this project's code and without unpickling anything. Its input is the version's
  input contract (``unlearning.models.published_model``; the ``input_contract`` tag and
  artifact): pixels in [0, 1] for a pretrained model, the user's own preprocessed input for
  an adopted one (the network alone, a drop-in replacement for the model they adopted);
- ``checkpoint/model.pt``, the weights-only state dict plus the ModelSpec: what the pipeline
  itself loads (``torch.load(weights_only=True)``), checked against the ``weights_sha256`` tag.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .faults import fault
from .params import PipelineParams
from .paths import Paths
from .served import DIGEST_TAG, FILES_TAG, compare, fingerprint_tags

CHECKPOINT_ARTIFACT = "checkpoint/model.pt"
CHAMPION, CANDIDATE = "champion", "candidate"
PIP_REQUIREMENTS = ["torch==2.14.1", "numpy"]
LINEAGE_TAGS = ("parent_version", "batch_id", "request_ids", "objective", "method", "data_rev",
                "code_rev", "params_sha256", "weights_sha256", "dataset", "arch", "input_shape",
                "seed", "status", "device", "source", "source_sha256", "source_format",
                "input_contract", "classes", "served_sha256",
                # the escalation policy (tasks/escalation.py): which attempt, after which
                "attempt", "escalated_from", "exact", "method_params", "gate_failures",
                # a consolidation (tasks/consolidation.py); a replay completed by the policy
                "consolidation", "consolidated_rows", "consolidated_from", "replay_steps")
# copied from parent to child versions (releases keep the base model's contract and classes)
CARRIED_TAGS = ("dataset", "arch", "input_shape", "input_contract", "classes")
CONTRACT_ARTIFACT = "input_contract.json"
METRIC_TAGS = ("forget_acc", "objective_rate", "relabel_success", "test_acc_before", "test_acc",
               "test_drop", "earlier_objective_rate", "weights_finite", "mia_efficacy",
               "loss_mia_auc", "steps", "train_acc")


class RegistryError(RuntimeError):
    """The registry is not in the state an operation needs (no champion, unknown version)."""


def connect(paths: Paths, cfg: PipelineParams):
    """Point MLflow at the project's store; make sure the experiment exists. Returns a client."""
    import mlflow
    from mlflow import MlflowClient

    uri = paths.tracking_uri
    if uri == paths.default_tracking_uri:
        paths.mlruns.mkdir(parents=True, exist_ok=True)
    user_uri = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)  # the registry follows it unless MLFLOW_REGISTRY_URI is set
    # set_tracking_uri also exports MLFLOW_TRACKING_URI; undo that, so the next state folder
    # this process serves (tests, `serve`) is not mistaken for a user's override
    if user_uri is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = user_uri
    if mlflow.get_experiment_by_name(cfg.registry.experiment) is None:
        from mlflow.exceptions import MlflowException

        # a tracking server (http) keeps the artifacts where it was told to (its
        # --artifacts-destination, served over HTTP); a local store keeps them in mlruns/
        served = uri.split(":", 1)[0].lower() in ("http", "https")
        try:
            mlflow.create_experiment(cfg.registry.experiment,
                                     artifact_location=None if served else paths.artifact_root)
        except MlflowException as e:  # another process created it first: use theirs
            if getattr(e, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                raise
    mlflow.set_experiment(cfg.registry.experiment)
    return MlflowClient(tracking_uri=uri,
                        registry_uri=os.environ.get("MLFLOW_REGISTRY_URI") or uri)


def _not_found(e: Exception) -> bool:
    """MLflow's "no such model / version / alias" (anything else is a real failure)."""
    return getattr(e, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def alias_version(client, name: str, alias: str) -> int | None:
    from mlflow.exceptions import MlflowException

    try:
        return int(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as e:
        if _not_found(e):
            return None
        raise


def version_info(client, name: str, version: int):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, str(version))
    except MlflowException as e:
        if _not_found(e):
            raise RegistryError(f"model {name!r} has no version {version}") from None
        raise


def list_versions(client, name: str) -> list[dict[str, Any]]:
    """Every version of ``name`` as plain data (see ``describe_version``), oldest first."""
    from mlflow.exceptions import MlflowException

    try:
        found = client.search_model_versions(f"name = {quoted(name)}")
        aliases = client.get_registered_model(name).aliases
    except MlflowException as e:
        if _not_found(e):
            return []
        raise
    by_version: dict[int, list[str]] = {}
    for alias, version in aliases.items():  # search results carry no aliases
        by_version.setdefault(int(version), []).append(alias)
    return sorted((describe_version(v, by_version.get(int(v.version), [])) for v in found),
                  key=lambda d: d["version"])


def read_versions(paths: Paths, cfg: PipelineParams) -> list[dict[str, Any]]:
    """``list_versions`` for a listing: from a snapshot while the local registry database is
    unchanged since the snapshot was taken, else from MLflow (and a new snapshot).

    Importing MLflow and opening its SQL store costs seconds on a small machine; the snapshot
    is keyed by the database files' size, mtime and inode, taken before the read, so any
    write to the registry (by this pipeline, the MLflow UI or a client) invalidates it. A
    remote tracking server is always asked."""
    db = paths.registry_db
    name = cfg.registry.model_name
    if db is None or not db.exists():
        return list_versions(connect(paths, cfg), name)
    snapshot = paths.artifacts / "registry-snapshot.json"
    try:
        cached = json.loads(snapshot.read_text())
        if cached["model"] == name and cached["stamp"] == _stamp(db):
            return cached["versions"]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # none yet, or unreadable: read the registry
    client = connect(paths, cfg)  # (may create the experiment: a write, before the stamp)
    stamp = _stamp(db)
    versions = list_versions(client, name)
    try:
        snapshot.parent.mkdir(parents=True, exist_ok=True)
        tmp = snapshot.with_name(f".{snapshot.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"model": name, "stamp": stamp, "versions": versions}))
        tmp.replace(snapshot)
    except OSError:
        pass  # a read-only state folder still lists, only slower
    return versions


def _stamp(db: Path) -> list[list[int] | None]:
    """What changes whenever SQLite writes the database (its journal files included)."""
    out: list[list[int] | None] = []
    for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-journal")):
        try:
            st = path.stat()
        except FileNotFoundError:
            out.append(None)
            continue
        out.append([st.st_size, st.st_mtime_ns, st.st_ino])
    return out


def fetch_version(paths: Paths, client, name: str, version: int) -> dict[str, Any]:
    """Download a version's weights-only checkpoint and verify it against weights_sha256."""
    from unlearning.models import CheckpointError, load_checkpoint

    mv = version_info(client, name, version)
    sha = mv.tags.get("weights_sha256")
    if not sha:
        raise RegistryError(f"{name} version {version} has no weights_sha256 tag")
    target = paths.model_file(version)
    try:  # a verified local copy saves the download
        load_checkpoint(target, expected_sha256=sha)
    except CheckpointError:
        target.parent.mkdir(parents=True, exist_ok=True)
        downloaded = Path(client.download_artifacts(mv.run_id, CHECKPOINT_ARTIFACT,
                                                    str(target.parent / f".v{version}")))
        downloaded.replace(target)
        load_checkpoint(target, expected_sha256=sha)  # raises CheckpointError on a mismatch
    return {"version": version, "path": str(target), "weights_sha256": sha,
            "tags": {k: mv.tags[k] for k in CARRIED_TAGS if k in mv.tags}}


def register_release(
    paths: Paths,
    cfg: PipelineParams,
    *,
    run_name: str,
    checkpoint: str,
    tags: dict[str, Any],
    metrics: dict[str, Any],
    params: dict[str, Any],
    artifacts: dict[str, list[str]],
    input_example: Any,
) -> int:
    """One MLflow run (params, metrics, reports, checkpoint, pt2 model) and its model version.

    Returns the new version number. The version carries ``tags`` (lineage, gates_passed) and
    the numeric metrics as tags too, so ``releases`` reads one object per version.
    """

    import mlflow
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature

    from unlearning.models import consumer_input, input_contract, load_checkpoint, published_model

    model, spec = load_checkpoint(checkpoint, tags.get("weights_sha256"))
    contract = input_contract(spec)
    tags = {"input_contract": json.dumps(contract, sort_keys=True), **tags}
    name = cfg.registry.model_name
    numeric = {k: float(v) for k, v in metrics.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    with mlflow.start_run(run_name=run_name):
        mlflow.set_tags({k: str(v) for k, v in tags.items()})
        fault("after:start_run")
        mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})
        mlflow.log_metrics(numeric)
        with tempfile.TemporaryDirectory() as tmp:  # always stored as checkpoint/model.pt
            named = Path(tmp) / Path(CHECKPOINT_ARTIFACT).name
            shutil.copyfile(checkpoint, named)
            mlflow.log_artifact(str(named), artifact_path=str(Path(CHECKPOINT_ARTIFACT).parent))
        for folder, files in artifacts.items():
            for path in files:
                if Path(path).is_file():
                    mlflow.log_artifact(path, artifact_path=folder)
        mlflow.log_dict(contract, CONTRACT_ARTIFACT)
        published = published_model(model, spec)
        example = consumer_input(model, spec, torch.as_tensor(input_example)).numpy()
        with torch.no_grad():
            output = published(torch.as_tensor(example)).numpy()
        # off: MLflow's serving-input check reloads the model it has just written and, when
        # that fails, only logs a warning; a cost on every release that guards nothing
        info = mlflow.pytorch.log_model(
            published, name="model", serialization_format="pt2", input_example=example,
            signature=infer_signature(example, output),
            pip_requirements=PIP_REQUIREMENTS, validate_serving_input=False,
        )
        version_tags = {k: str(v) for k, v in tags.items()}
        version_tags.update({k: f"{numeric[k]:.4f}" for k in METRIC_TAGS if k in numeric})
        # what consumers load, fingerprinted as stored: part of the version from its creation
        version_tags.update(served_fingerprint(info.model_uri))
        mlflow.set_tags({k: version_tags[k] for k in (DIGEST_TAG, FILES_TAG) if k in version_tags})
        mv = mlflow.register_model(info.model_uri, name, tags=version_tags)
        fault("after:register_version")
        mlflow.set_tag("registered_version", mv.version)
    return int(mv.version)


def served_fingerprint(model_uri: str) -> dict[str, str]:
    """The ``served_sha256`` (and ``served_files``) tags of a logged model, from its files as
    the artifact store holds them (``tasks.served``)."""
    with tempfile.TemporaryDirectory(prefix="served-") as tmp:
        import mlflow

        folder = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp)
        return fingerprint_tags(folder)


def served_check(client, name: str, version: int) -> dict[str, Any]:
    """Download what consumers load for ``version`` and compare it with its ``served_sha256``
    (``tasks.served.compare``): ``ok`` True, False (``reason`` names the changed file) or
    None (no fingerprint recorded)."""
    import mlflow

    mv = version_info(client, name, version)
    what = f"the served model of version {version} ({name}/{version})"
    with tempfile.TemporaryDirectory(prefix="served-") as tmp:
        try:
            folder = mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=tmp)
        except Exception as e:  # noqa: BLE001  (gone from the artifact store: not served as registered)
            return {"ok": False, "served_sha256": None, "recorded": mv.tags.get(DIGEST_TAG),
                    "files": [], "changed": [], "reason": f"{what} cannot be downloaded: "
                    f"{str(e).splitlines()[0] if str(e) else e.__class__.__name__}"}
        return compare(folder, dict(mv.tags), what)


def quoted(value: str) -> str:
    """``value`` as a quoted literal of an MLflow search filter; a RegistryError for a value
    the filter syntax cannot quote (a quote or a backslash)."""
    if "'" in value or "\\" in value:
        raise RegistryError(f"cannot search the registry for {value!r}: it holds a quote "
                            "or a backslash")
    return f"'{value}'"


def versions_tagged(client, name: str, **tags: str) -> list[Any]:
    """The versions of ``name`` whose tags hold every value in ``tags``, oldest first. The
    registry filters them itself (one clause per tag), so the answer costs what the matches
    cost, not what the whole registry does: a pipeline pass asks several times, and a model
    with years of weekly releases has hundreds of versions. A value the filter syntax
    cannot quote (a quote or a backslash) is a RegistryError."""
    clauses = [f"name = {quoted(name)}"]
    clauses += [f"tags.`{key}` = {quoted(value)}" for key, value in tags.items()]
    return sorted(client.search_model_versions(" AND ".join(clauses)),
                  key=lambda mv: int(mv.version))


def find_batch_version(client, name: str, batch_id: str, parent: int,
                       params_sha256: str) -> Any | None:
    """The version already registered for ``batch_id`` (one batch, or a replay's
    comma-separated batches) on top of ``parent`` with the same parameters (a run that died
    after registering it), or None. Resuming adopts it instead of registering a duplicate;
    after a change of params.yaml it is left aside (no alias, not in the ledger) and the
    batch is released anew. An attempt of the escalation policy (tag ``attempt``) is found by
    ``escalation.find_attempt``, never here: a replay onto a batch's own parent must not take
    the batch's failed first attempt for itself."""
    from mlflow.exceptions import MlflowException

    try:
        found = versions_tagged(client, name, batch_id=batch_id, parent_version=str(parent),
                                params_sha256=params_sha256)
    except MlflowException as e:
        if _not_found(e):
            return None
        raise
    same = [mv for mv in found if "attempt" not in mv.tags]
    return same[0] if same else None


def close_stale_runs(client, experiment: str, batch_id: str,
                     registered_run: str | None = None) -> list[str]:
    """Runs of ``batch_id`` a killed process left RUNNING: FINISHED for ``registered_run`` (the
    one whose version is adopted), FAILED otherwise. Call under the pipeline lock only: then
    no live process owns them."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    closed = []
    running = f"tags.batch_id = {quoted(batch_id)} and attributes.status = 'RUNNING'"
    for run in client.search_runs([exp.experiment_id], running):
        status = "FINISHED" if run.info.run_id == registered_run else "FAILED"
        client.set_terminated(run.info.run_id, status)
        closed.append(run.info.run_id)
    return closed


def shape_of(tags: dict[str, str]) -> tuple[int, int, int]:
    """A version's ``input_shape`` tag ("1x8x8") as (C, H, W)."""
    c, h, w = (int(s) for s in tags["input_shape"].split("x"))
    return c, h, w


def input_shape(paths: Paths, cfg: PipelineParams) -> tuple[int, int, int]:
    """The champion's input shape (C, H, W), or the dataset's before there is a champion."""
    from .release import dataset_of

    client = connect(paths, cfg)
    version = alias_version(client, cfg.registry.model_name, CHAMPION)
    if version is not None:
        tags = version_info(client, cfg.registry.model_name, version).tags
        if "input_shape" in tags:
            return shape_of(tags)
    return dataset_of(cfg).image_shape


def set_data_rev(client, name: str, version: int, rev: str) -> None:
    """Record the data revision (``data.dvc``'s md5) on a version and on its run."""
    client.set_model_version_tag(name, str(version), "data_rev", rev)
    client.set_tag(version_info(client, name, version).run_id, "data_rev", rev)


def log_validation(paths: Paths, cfg: PipelineParams, batch_id: str, report_path: Path,
                   manifest_path: Path, report: dict[str, Any]) -> str:
    """A small tracking run per submitted batch: the GX result as an artifact, counts."""
    import mlflow

    with mlflow.start_run(run_name=f"validate-{batch_id}") as run:
        mlflow.set_tags({"step": "validate", "batch_id": batch_id,
                         "result": "accepted" if report["success"] else "rejected"})
        mlflow.log_metrics({"rows": float(report["rows"]),
                            "failed_rules": float(len(report["failures"]))})
        mlflow.log_artifact(str(report_path), artifact_path="validation")
        mlflow.log_artifact(str(manifest_path), artifact_path="manifest")
        return run.info.run_id


def describe_version(mv, aliases: list[str]) -> dict[str, Any]:
    """A registry version as plain data: lineage tags, metrics, aliases."""
    tags = dict(mv.tags)
    metrics = {}
    for key in METRIC_TAGS:
        if key in tags:
            try:
                metrics[key] = float(tags[key])
            except ValueError:
                pass
    return {
        "version": int(mv.version),
        "aliases": sorted(aliases),
        "created": mv.creation_timestamp,
        "run_id": mv.run_id,
        "gates_passed": tags.get("gates_passed") == "true",
        "lineage": {k: tags[k] for k in LINEAGE_TAGS if k in tags},
        "metrics": metrics,
        "gate_failures": [g for g in tags.get("gate_failures", "").split(",") if g],
    }
