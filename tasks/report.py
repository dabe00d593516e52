"""Release report data: what a reviewer of one model version needs to see, as plain data.

``collect_report`` does the I/O (the registry version and its run, the ledger, both
checkpoints, the batch manifests) and calls the analysis in ``unlearning.analysis``, which
takes models and tensors and returns plain data. Images stay float arrays (C, H, W) in
[0, 1]; the HTML renderer (``flows.render.report``) turns them into PNGs.
``log_report`` attaches the rendered page to the version's MLflow run.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from unlearning.analysis import (
    adversarial_examples,
    class_accuracy_table,
    forget_rows,
    score_distributions,
)

from . import registry
from .params import PipelineParams
from .paths import Paths

REPORT_ARTIFACT_DIR = "report"
REPORT_ARTIFACT_NAME = "release-report.html"
GATES_ARTIFACT = "reports/gates.json"
MAX_FORGET_ROWS = 100  # forget instances listed with thumbnails; the rest are counted
DEFAULT_PGD = {"pgd_eps_rms": 0.07, "pgd_steps": 10}  # when the method has no PGD settings

Progress = Callable[[int, int, str], None]


class ReportError(RuntimeError):
    """The report cannot be built (unknown version, no registry): one line for the user."""


@dataclass
class ReleaseReport:
    """Everything the renderer shows; ``to_dict`` is the JSON view (images left out)."""

    model: str
    version: int
    summary: dict[str, Any]
    gates: dict[str, Any] | None
    forget: list[dict[str, Any]]
    forget_total: int
    earlier: list[dict[str, Any]]
    per_class: dict[str, Any]
    distributions: dict[str, Any]
    adversarial: list[dict[str, Any]]
    adversarial_settings: dict[str, Any]
    lineage: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        def strip(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return [{k: v for k, v in r.items() if not isinstance(v, np.ndarray)} for r in rows]

        return {
            "model": self.model, "version": self.version, "summary": self.summary,
            "gates": self.gates, "forget": strip(self.forget), "forget_total": self.forget_total,
            "earlier": self.earlier, "per_class": self.per_class,
            "mia": {k: v for k, v in self.distributions.items() if k != "scores"},
            "adversarial": strip(self.adversarial),
            "adversarial_settings": self.adversarial_settings, "lineage": self.lineage,
            "notes": self.notes,
        }


def lineage_chain(versions: dict[int, dict[str, Any]], version: int) -> list[dict[str, Any]]:
    """``version`` and its ancestors (newest first) from ``describe_version`` dicts."""
    chain, seen = [], set()
    current: int | None = version
    while current is not None and current in versions and current not in seen:
        seen.add(current)
        v = versions[current]
        chain.append({"version": current, "aliases": v["aliases"],
                      "batch_id": v["lineage"].get("batch_id"),
                      "method": v["lineage"].get("method"),
                      "status": v["lineage"].get("status"),
                      "test_acc": v["metrics"].get("test_acc")})
        parent = v["lineage"].get("parent_version", "none")
        current = int(parent) if str(parent).isdigit() else None
    return chain


# -- I/O: gather one version's inputs ---------------------------------------------------------


def open_registry(paths: Paths, cfg: PipelineParams):
    """An MLflow client for the state folder, without creating a store where there is none."""
    if paths.tracking_uri == paths.default_tracking_uri and not (paths.mlruns / "mlflow.db").exists():
        raise ReportError(f"no releases in {paths.home} yet: run `unlearn pretrain` first")
    return registry.connect(paths, cfg)


def _run_json(client, run_id: str, artifact: str) -> dict[str, Any] | None:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(run_id, artifact, tmp)
        except Exception:  # noqa: BLE001  (absent artifact: the base model has no gates)
            return None
        return json.loads(Path(local).read_text())


def _manifest_rows(paths: Paths, client, run_id: str, batch_id: str) -> list[dict[str, Any]]:
    """A batch's accepted manifest: the local copy, else the one logged with the run."""
    from .release import read_rows

    local = paths.manifest(batch_id)
    if local.is_file():
        return read_rows(local)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, f"manifests/{batch_id}.csv", tmp)
        except Exception:  # noqa: BLE001
            raise ReportError(f"the manifest of batch {batch_id} is neither in {paths.deletions} "
                              "nor logged with the version's run") from None
        return read_rows(Path(path))


def _pgd_settings(cfg: PipelineParams) -> tuple[float, int]:
    from unlearning.methods import make_config

    try:
        method_cfg = make_config(cfg.unlearn.method, dict(cfg.unlearn.params))
    except (KeyError, ValueError):
        method_cfg = None
    eps_rms = float(getattr(method_cfg, "pgd_eps_rms", DEFAULT_PGD["pgd_eps_rms"]))
    steps = int(getattr(method_cfg, "pgd_steps", DEFAULT_PGD["pgd_steps"]))
    return eps_rms, steps


def _batches(value: str | None) -> list[str]:
    return [b for b in (value or "").split(",") if b and b != "none"]


def collect_report(paths: Paths, cfg: PipelineParams, version: int, *,
                   adversarial_count: int = 4, progress: Progress | None = None) -> ReleaseReport:
    """Gather and compute everything the report of ``version`` shows.

    Raises ReportError (unknown version, no registry) with a one-line reason.
    """
    import torch

    from .ledger import Ledger, ledger_present
    from .release import build_forget_set, dataset_of

    total = 6
    tick = progress or (lambda done, total, message="": None)
    tick(0, total, "registry")
    client = open_registry(paths, cfg)
    name = cfg.registry.model_name
    try:
        mv = registry.version_info(client, name, version)
    except registry.RegistryError as e:
        raise ReportError(str(e)) from None
    versions = {v["version"]: v for v in registry.list_versions(client, name)}
    info = versions[version]
    run = client.get_run(mv.run_id)
    lineage = info["lineage"]
    parent_tag = str(lineage.get("parent_version", "none"))
    parent_version = int(parent_tag) if parent_tag.isdigit() else None
    batches = _batches(lineage.get("batch_id"))
    notes: list[str] = []

    earlier_batches: list[str] = []
    promotions: list[dict[str, Any]] = []
    if ledger_present(paths.ledger):
        with Ledger(paths.ledger) as ledger:
            if parent_version is not None:
                earlier_batches = ledger.covered_batches(parent_version)
            promotions = [p for p in ledger.promotions()
                          if version in (p["version"], p["previous"])]
    elif parent_version is not None:
        notes.append("no request ledger in this state folder: earlier deletions not checked")

    tick(1, total, "checkpoints")
    device = cfg.runtime.torch_device()  # the report's model work runs there too
    model = _load(paths, client, name, version, device)
    parent = _load(paths, client, name, parent_version, device) \
        if parent_version is not None else None
    data = dataset_of(cfg)
    if lineage.get("dataset") and lineage["dataset"] != data.name:
        raise ReportError(f"version {version} was trained on {lineage['dataset']!r} but "
                          f"params.yaml names dataset {data.name!r}")

    tick(2, total, "forget set")
    requests = [r for b in batches for r in _manifest_rows(paths, client, mv.run_id, b)]
    def forget_set_of(rows: list[dict[str, Any]]):  # as-if-unseen levels: from the parent
        return build_forget_set(data, rows, parent)

    forget = forget_set_of(requests) if requests else None
    rows = forget_rows(parent, model, forget, requests) if forget is not None else []
    earlier_rows = {b: _manifest_rows(paths, client, mv.run_id, b) for b in earlier_batches}
    earlier = []
    for b, b_rows in earlier_rows.items():
        fs = forget_set_of(b_rows)
        met = fs.satisfied_by(model)
        earlier.append({"batch_id": b, "instances": len(fs), "objective_met": int(met.sum())})

    tick(3, total, "held-out accuracy per class")
    per_class = class_accuracy_table(parent, model, data.test_x, data.test_y, data.class_names)

    tick(4, total, "confidence distributions")
    deleted = {r["instance_id"] for r in requests}
    deleted |= {r["instance_id"] for b_rows in earlier_rows.values() for r in b_rows}
    n = cfg.evaluate.mia_max_per_side
    g = torch.Generator().manual_seed(0)
    keep = torch.tensor([i for i in range(data.num_train) if i not in deleted], dtype=torch.long)
    keep = keep[torch.randperm(len(keep), generator=g)[:n]]
    held = torch.randperm(len(data.test_x), generator=g)[:n]
    sets = {"retain sample": (data.train_x[keep], data.train_y[keep]),
            "held-out": (data.test_x[held], data.test_y[held])}
    if forget is not None:
        sets = {"forget": (forget.x, forget.y), **sets}
    distributions = score_distributions(parent, model, sets)

    tick(5, total, "adversarial examples")
    eps_rms, steps = _pgd_settings(cfg)
    adversarial, adv_settings = ([], {"count": 0})
    if forget is not None and parent is not None:
        adversarial, adv_settings = adversarial_examples(
            parent, model, forget, requests, data.num_classes, adversarial_count, eps_rms,
            steps, seed=cfg.unlearn.seed + version)

    metrics = {k: v for k, v in run.data.metrics.items()}
    summary = {
        "model": name, "version": version, "aliases": info["aliases"],
        "status": lineage.get("status", "unknown"), "gates_passed": info["gates_passed"],
        "created": info["created"], "run_id": mv.run_id, "run_name": run.info.run_name,
        "parent_version": parent_version, "batches": batches,
        "objective": lineage.get("objective"), "method": lineage.get("method"),
        "dataset": data.name, "metrics": metrics,
        "model_uri": f"models:/{name}/{version}", "tracking_uri": paths.tracking_uri,
    }
    lineage_data = {
        "tags": {k: lineage[k] for k in registry.LINEAGE_TAGS if k in lineage},
        "chain": lineage_chain(versions, version), "promotions": promotions,
        "earlier_batches": earlier_batches,
    }
    tick(6, total, "done")
    return ReleaseReport(
        model=name, version=version, summary=summary,
        gates=_run_json(client, mv.run_id, GATES_ARTIFACT), forget=rows[:MAX_FORGET_ROWS],
        forget_total=len(rows), earlier=earlier, per_class=per_class,
        distributions=distributions, adversarial=adversarial,
        adversarial_settings=adv_settings, lineage=lineage_data, notes=notes)


def _load(paths: Paths, client, name: str, version: int, device=None):
    from unlearning.models import CheckpointError, load_checkpoint

    try:
        fetched = registry.fetch_version(paths, client, name, version)
        model, _ = load_checkpoint(fetched["path"], fetched["weights_sha256"], device=device)
    except (registry.RegistryError, CheckpointError) as e:
        raise ReportError(f"cannot load version {version}: {e}") from None
    model.eval()
    return model


def log_report(paths: Paths, cfg: PipelineParams, run_id: str, html_file: Path) -> str:
    """Attach the page to the version's run as ``report/release-report.html``; its URI."""
    import shutil

    client = registry.connect(paths, cfg)
    with tempfile.TemporaryDirectory() as tmp:
        named = Path(tmp) / REPORT_ARTIFACT_NAME
        shutil.copyfile(html_file, named)
        client.log_artifact(run_id, str(named), artifact_path=REPORT_ARTIFACT_DIR)
    return f"runs:/{run_id}/{REPORT_ARTIFACT_DIR}/{REPORT_ARTIFACT_NAME}"
