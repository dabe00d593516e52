"""``unlearn demo``: the whole release story on ``digits`` in one command.

pretrain (version 1, champion) -> submit three batches: privacy erasure (as-if-unseen,
CSV), label fixes (relabel, JSON lines) and an invalid one that validation rejects ->
process the pending batches (versions 2 and 3, each promoted after its gates) -> a rollback
to version 1, which the guard refuses.

Re-runnable: the demo starts from a clean state folder. It clears the state it finds only
if an earlier demo created it (marker ``artifacts/.demo``) or there is none; it refuses to
touch any other pipeline state. Prefect's own database (``.prefect/``) is kept.
"""

from __future__ import annotations

import csv
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flows.cli.errors import UsageError
from tasks.params import PipelineParams
from tasks.paths import Paths

MARKER = ".demo"


class DemoError(UsageError):
    """The state folder holds state the demo did not create (exit 2, nothing touched)."""


def _clear(folder: Path, keep: tuple[str, ...] = (".gitkeep",)) -> None:
    if not folder.is_dir():
        return
    for child in folder.iterdir():
        if child.name in keep:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _has_state(folder: Path) -> bool:
    return folder.is_dir() and any(c.name != ".gitkeep" for c in folder.iterdir())


def reset_state(paths: Paths) -> None:
    """Empty the demo's state (or refuse, if it is not the demo's)."""
    if paths.tracking_uri != paths.default_tracking_uri:
        raise DemoError("the demo uses the project's local MLflow store; unset "
                        "MLFLOW_TRACKING_URI (or point UNLEARN_HOME at an empty folder)")
    folders = (paths.artifacts, paths.mlruns, paths.deletions)
    if any(_has_state(f) for f in folders) and not (paths.artifacts / MARKER).exists():
        raise DemoError(f"{paths.home} holds pipeline state the demo did not create; run the "
                        "demo in an empty folder, e.g. UNLEARN_HOME=$(mktemp -d) unlearn demo")
    for folder in folders:
        _clear(folder)
    paths.releases_file.unlink(missing_ok=True)  # the release order of the cleared registry
    paths.artifacts.mkdir(parents=True, exist_ok=True)
    (paths.artifacts / MARKER).write_text("state created by `unlearn demo`; it may reset it\n")


def write_manifests(folder: Path, num_train: int, labels: list[int],
                    num_classes: int) -> dict[str, Path]:
    """Three manifests: erasure (as-if-unseen, CSV), relabel (JSONL), an invalid one (CSV)."""
    from unlearning.datasets import sample_forget_ids

    folder.mkdir(parents=True, exist_ok=True)
    ids = sample_forget_ids(num_train, 13, seed=7)
    erase, relabel = ids[:8], ids[8:]

    def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["request_id", "instance_id", "objective",
                                              "new_label"], lineterminator="\n")
            w.writeheader()
            w.writerows(rows)
        return path

    erasure = write_csv(folder / "erase.csv", [
        {"request_id": f"gdpr-{n:03d}", "instance_id": i, "objective": "as-if-unseen",
         "new_label": ""} for n, i in enumerate(erase, start=1)])
    relabel_path = folder / "fix-labels.jsonl"
    relabel_path.write_text("".join(
        json.dumps({"request_id": f"fix-{n:03d}", "instance_id": i, "objective": "relabel",
                    "new_label": (labels[i] + 1) % num_classes}) + "\n"
        for n, i in enumerate(relabel, start=1)))
    free = next(i for i in range(num_train) if i not in ids)
    invalid = write_csv(folder / "invalid.csv", [
        {"request_id": "bad-001", "instance_id": num_train + 5, "objective": "misclassify",
         "new_label": ""},  # not a training instance
        {"request_id": "bad-002", "instance_id": erase[0], "objective": "misclassify",
         "new_label": ""},  # already queued for deletion by the first batch
        {"request_id": "bad-003", "instance_id": free, "objective": "relabel",
         "new_label": labels[free]},  # "relabel" to the label it already has
    ])
    return {"erasure": erasure, "relabel": relabel_path, "invalid": invalid}


def run_demo(paths: Paths, cfg: PipelineParams, say: Callable[[str], None]) -> dict[str, Any]:
    """Run the story; return what happened (and a human-readable ``story``)."""
    from flows.pipeline import input_shape, pretrain_flow, process_deletions_flow, rollback_flow
    from tasks import registry
    from tasks.ledger import Ledger
    from tasks.release import dataset_of
    from tasks.submit import submit_manifest

    start = time.perf_counter()
    story: list[str] = []

    def step(line: str) -> None:
        story.append(line)
        say(line)

    reset_state(paths)
    step(f"[1/5] pretrain {cfg.pretrain.arch} on {cfg.dataset.name} (state: {paths.home})")
    pre = pretrain_flow(home=str(paths.home))
    if pre["status"] != "ok":
        raise DemoError(f"pretrain {pre['status']}: {pre.get('reason')}")
    step(f"      version {pre['version']} is champion, test accuracy {pre['test_acc']:.2f}%")

    data = dataset_of(cfg)
    files = write_manifests(paths.artifacts / "demo", data.num_train, data.train_y.tolist(),
                            data.num_classes)
    step("[2/5] submit three deletion batches")
    submitted = {}
    for kind, path in files.items():
        result = submit_manifest(paths, cfg, path, input_shape(paths, cfg))
        registry.log_validation(paths, cfg, result["batch_id"], Path(result["report"]),
                                Path(result["manifest"]),
                                {"success": result["state"] == "pending", "rows": result["rows"],
                                 "failures": result["failures"]})
        submitted[kind] = result
        step(f"      {kind}: {result['batch_id']} {result['state']}"
             + (f" ({result['reason']})" if result["reason"] else ""))

    step("[3/5] process pending batches (validate, unlearn, evaluate, gates, register, promote)")
    run = process_deletions_flow(home=str(paths.home))
    for b in run.get("batches", []):
        m = b.get("metrics") or {}
        step(f"      {b['batch_id']}: {b['state']}"
             + (f" -> version {b['version']}" if b.get("version") else "")
             + (f", objective {m['objective_rate']:.0f}%, test drop {m['test_drop']:.2f} "
                f"points, {b['seconds']:.1f} s" if m else "")
             + (f" ({b['reason']})" if b.get("reason") else ""))

    step("[4/5] roll back to version 1 (predates the committed deletions)")
    guard = rollback_flow(to=pre["version"], home=str(paths.home))
    step(f"      {guard['status']}: {guard.get('reason', '')}")

    client = registry.connect(paths, cfg)
    versions = registry.list_versions(client, cfg.registry.model_name)
    champion = registry.alias_version(client, cfg.registry.model_name, registry.CHAMPION)
    with Ledger(paths.ledger) as ledger:
        batches = [b.to_dict() for b in ledger.batches()]
        promotions = ledger.promotions()
    passing = [v["version"] for v in versions if v["gates_passed"]]
    step(f"[5/5] {len(versions)} versions; champion is version {champion}; "
         f"promotions: {' -> '.join(str(p['version']) for p in promotions)}")
    ok = (run.get("status") == "ok" and guard["status"] == "refused"
          and submitted["invalid"]["state"] == "rejected" and len(versions) >= 3
          and champion == max(passing))
    step(f"      load it anywhere: mlflow.pytorch.load_model('models:/"
         f"{cfg.registry.model_name}@champion') (MLFLOW_TRACKING_URI={paths.tracking_uri})")
    return {
        "ok": ok, "home": str(paths.home), "tracking_uri": paths.tracking_uri,
        "model": cfg.registry.model_name, "champion": champion, "versions": versions,
        "submitted": {k: {key: v[key] for key in ("batch_id", "state", "reason", "failures")}
                      for k, v in submitted.items()},
        "processed": [{k: b.get(k) for k in ("batch_id", "state", "version", "reason", "seconds",
                                              "unlearn_seconds", "metrics")}
                      for b in run.get("batches", [])],
        "rollback_guard": guard, "batches": batches, "promotions": promotions,
        "seconds": time.perf_counter() - start, "story": story,
    }
