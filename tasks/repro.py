"""The reproducible path: DVC stage entry points and the rebuild behind ``unlearn verify``.

Both rebuild releases file to file with the functions the Prefect tasks wrap
(``release.pretrain_model``, ``release.rebuild_release`` -> ``release.unlearn_batch``,
``release.evaluate_candidate``): there is no second implementation. Neither writes to the
registry or the ledger.

DVC stages (``dvc.yaml``; run in the project root, which is the state folder)::

    python -m tasks.repro base       data/dataset + params -> artifacts/base/model.pt
    python -m tasks.repro releases   data/ + base -> artifacts/releases/v<N>/<batch>/model.pt
                                     and artifacts/releases/hashes.json (version -> sha256)
    python -m tasks.repro evaluate   releases -> artifacts/evaluation/, artifacts/metrics.json

Every release listed in ``data/releases.json`` is rebuilt from its parent, in version order
(a parent is always registered before its children), from scratch: the chain starts at the
base model, not at the registry's weights.

``verify`` instead anchors each release at its parent's *registered* weights (checked against
the parent's ``weights_sha256``), so a divergence is pinned to the one step where it happens.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import consolidation, datastore, escalation, release
from .adopt import read_base, rebuild_adopted
from .params import EXACT_RETRAIN, ParamsError, PipelineParams, load_params
from .paths import OFFLINE_ENV, Paths

BASE = Path("artifacts/base")
RELEASES = Path("artifacts/releases")
HASHES = RELEASES / "hashes.json"
EVALUATION = Path("artifacts/evaluation")
METRICS = Path("artifacts/metrics.json")
TIMING_KEYS = ("unlearn_seconds", "seconds")


class ReproError(RuntimeError):
    """A stage cannot run from what is in data/ (the message names the file)."""


class VerifyInputError(ValueError):
    """verify cannot start: unknown version, missing input files (exit 2, nothing changed)."""


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _fresh(folder: Path) -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def _setup(home: Path) -> tuple[Paths, PipelineParams, PipelineParams]:
    """Paths, params.yaml (the file DVC tracks, at the project root), and the config the
    dataset is loaded with (``data/dataset`` checked against its records)."""
    paths = Paths(home)
    cfg = load_params(home / "params.yaml")
    cfg.runtime.apply()
    return paths, cfg, datastore.tracked_dataset(paths, cfg)


def _covered(plan: list[dict[str, Any]]) -> dict[int, list[str]]:
    """Batches held by each release of the plan (its ancestors' and its own), in order."""
    out: dict[int, list[str]] = {}
    for entry in sorted(plan, key=lambda e: e["version"]):
        parent = entry["parent"]
        if parent is not None and parent not in out:
            raise ReproError(f"data/releases.json: version {entry['version']} names parent "
                             f"{parent}, which is not listed before it")
        out[entry["version"]] = (out[parent] if parent is not None else []) + entry["batches"]
    return out


def _recent(plan: list[dict[str, Any]], covered: dict[int, list[str]]) -> dict[int, list[str]]:
    """Batches each release of the plan unlearned since the last exact model of its lineage
    (``consolidation.unlearned_since_exact``), which the next unlearning release keeps
    forgotten as the pipeline did."""
    by_version = {e["version"]: e for e in plan}
    out: dict[int, list[str]] = {}
    for version in by_version:
        found = consolidation.unlearned_since_exact(by_version.get, version)
        out[version] = found[1] if found is not None else covered[version]
    return out


def _recent_before_last(load: PipelineParams, entry: dict[str, Any],
                        recent: list[str]) -> list[str]:
    """What the last step of a release kept forgotten besides its own batch, from ``recent``
    of its parent: each earlier step adds its batch, an exact step starts over."""
    attempts = ([escalation.Attempt.from_record(s) for s in entry["steps"]]
                if entry.get("steps") else [_attempt(load, entry)] * len(entry["batches"]))
    out = list(recent)
    for batch_id, attempt in zip(entry["batches"][:-1], attempts[:-1], strict=True):
        out = [] if attempt.exact else out + [batch_id]
    return out


# -- DVC stages -------------------------------------------------------------------------------


def stage_base(home: Path) -> dict[str, Any]:
    """The base model from data/dataset and params.yaml (``dataset``, ``pretrain``)."""
    paths, _, load = _setup(home)
    out = _fresh(home / BASE)
    if read_base(paths).get("kind") == "adopt":  # `unlearn adopt`: the user's weights
        trained = rebuild_adopted(paths, load, out / "model.pt")
    else:
        trained = release.pretrain_model(load, out / "model.pt")
    summary = {k: trained[k] for k in ("weights_sha256", "train_acc", "test_acc", "spec")}
    _write_json(out / "pretrain.json", summary)
    return summary


def stage_releases(home: Path) -> dict[str, Any]:
    """Every release of data/releases.json, each from its parent, in version order."""
    paths, cfg, load = _setup(home)
    plan = sorted(datastore.read_release_order(paths), key=lambda e: e["version"])
    covered = _covered(plan)
    recent = _recent(plan, covered)
    base_sha = json.loads((home / BASE / "pretrain.json").read_text())["weights_sha256"]
    base = {"path": str(home / BASE / "model.pt"), "weights_sha256": base_sha}
    out = _fresh(home / RELEASES)
    built: dict[int, dict[str, Any]] = {}
    hashes: dict[str, dict[str, Any]] = {}
    for entry in plan:
        version, parent, batches = entry["version"], entry["parent"], entry["batches"]
        if parent is None:
            built[version] = base
        else:
            result = _rebuild(paths, load, entry, built[parent], covered[parent],
                              recent[parent], out / f"v{version}")
            built[version] = {"path": result["path"], "weights_sha256": result["weights_sha256"]}
        hashes[str(version)] = {
            "parent": parent, "batches": batches,
            "weights_sha256": built[version]["weights_sha256"],
            "path": str(Path(built[version]["path"]).relative_to(home)),
        }
        print(f"v{version}: {built[version]['weights_sha256']}", file=sys.stderr, flush=True)
    _write_json(home / HASHES, {"params_sha256": cfg.sha256(), "releases": hashes})
    return hashes


def _attempt(load: PipelineParams, entry: dict[str, Any]) -> escalation.Attempt:
    """How the pipeline built a release of the plan: a consolidation is an exact retrain; an
    escalated release names its attempt; any other used the primary method."""
    if consolidation.is_consolidation(entry):
        return escalation.Attempt(EXACT_RETRAIN)
    if entry.get("method"):
        return escalation.Attempt.from_record(entry)
    return escalation.primary(load)


def _last_step(folder: Path, entry: dict[str, Any]) -> Path:
    """Where a rebuilt release's checkpoint and unlearn.json are: the folder of its last
    batch (``release.rebuild_release``'s layout), ``consolidation/`` for a consolidation."""
    return folder / (entry["batches"][-1] if entry["batches"] else "consolidation")


def _rebuild(paths: Paths, load: PipelineParams, entry: dict[str, Any], parent: dict[str, Any],
             earlier: list[str], recent: list[str], folder: Path) -> dict[str, Any]:
    """One release of the plan, built as the pipeline built it (``_attempt``; a replay the
    escalation policy completed: an attempt per batch). ``earlier``: every batch the parent
    holds; ``recent``: those it unlearned since the last exact model."""
    batches, attempt = entry["batches"], _attempt(load, entry)
    if entry.get("steps"):
        attempts = [escalation.Attempt.from_record(s) for s in entry["steps"]]
        return escalation.rebuild_steps(paths, load, parent, batches, attempts, earlier,
                                        recent, folder)
    if attempt.exact:
        return escalation.retrain_exact(paths, load, parent, earlier + batches,
                                        _last_step(folder, entry) / "model.pt")
    return release.rebuild_release(paths, escalation.attempt_params(load, attempt), parent,
                                   batches, recent, folder, held=earlier)


def stage_evaluate(home: Path) -> dict[str, Any]:
    """Release metrics (``unlearning.metrics``) and gates of every rebuilt release -> artifacts/metrics.json."""
    from .gates import check_gates

    paths, cfg, load = _setup(home)
    plan = sorted(datastore.read_release_order(paths), key=lambda e: e["version"])
    covered = _covered(plan)
    recent = _recent(plan, covered)
    hashes = json.loads((home / HASHES).read_text())["releases"]
    out = _fresh(home / EVALUATION)
    metrics: dict[str, dict[str, float]] = {}
    for entry in plan:
        version, parent, batches = entry["version"], entry["parent"], entry["batches"]
        if parent is None:
            base = json.loads((home / BASE / "pretrain.json").read_text())
            metrics[f"v{version}"] = {"train_acc": round(base["train_acc"], 4),
                                      "test_acc": round(base["test_acc"], 4)}
            continue
        folder = home / RELEASES / f"v{version}"
        last = _last_step(folder, entry)
        summary = json.loads((last / "unlearn.json").read_text())
        candidate = {**summary, "path": str(last / "model.pt")}
        exact = _attempt(load, entry).exact and not entry.get("steps")
        if len(batches) > 1:  # a replay: the last step began at the one before
            before = folder / batches[-2]
            start = {"path": str(before / "model.pt"),
                     "weights_sha256": json.loads((before / "unlearn.json").read_text())[
                         "weights_sha256"]}
        else:
            start = {"path": str(home / hashes[str(parent)]["path"]),
                     "weights_sha256": hashes[str(parent)]["weights_sha256"]}
        held = covered[version]  # a consolidation: its parent's batches, the newest evaluated
        kept = (held[:-1] if consolidation.is_consolidation(entry)
                else _recent_before_last(load, entry, recent[parent]))
        found = release.evaluate_candidate(paths, load, start, candidate, held[-1], kept,
                                           held[:-1],
                                           metrics_path=out / f"v{version}" / "metrics.json")
        gates = (escalation.exact_gates(found, cfg.gates) if exact
                 else check_gates(found, cfg.gates).to_dict())
        _write_json(out / f"v{version}" / "gates.json", gates)
        numeric = {k: round(float(v), 4) for k, v in found.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and k not in TIMING_KEYS}
        metrics[f"v{version}"] = {**numeric, "gates_passed": int(gates["passed"])}
    _write_json(home / METRICS, metrics)
    return metrics


STAGES: dict[str, Callable[[Path], Any]] = {
    "base": stage_base, "releases": stage_releases, "evaluate": stage_evaluate,
}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] not in STAGES:
        print(f"usage: python -m tasks.repro {{{','.join(STAGES)}}}", file=sys.stderr)
        return 2
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    try:
        STAGES[args[0]](Path.cwd())  # DVC runs stages in the project root
    except (ReproError, datastore.DataTrackingError, ParamsError, OSError, KeyError) as e:
        print(f"tasks.repro {args[0]}: error: {e}", file=sys.stderr)
        return 1
    return 0


# -- verify -----------------------------------------------------------------------------------


def lineage_of(version: dict[str, Any]) -> tuple[int | None, list[str]]:
    """(parent version, batches applied) from a registry version's lineage tags."""
    tags = version["lineage"]
    parent = tags.get("parent_version", "none")
    batch = tags.get("batch_id", "none")
    return (None if parent in ("", "none") else int(parent),
            [] if batch in ("", "none") else batch.split(","))


def _data_findings(paths: Paths, rev: str, files: list[str],
                   listings: dict[str, dict[str, str] | None]) -> tuple[list[str], list[str]]:
    """Files (relative to data/) that differ from data revision ``rev``: (findings, notes)."""
    if not rev or rev == "none":
        return [], ["no data_rev recorded: files not compared"]
    if rev not in listings:
        listings[rev] = datastore.data_listing(paths, rev)
    listing = listings[rev]
    if listing is None:
        note = f"data_rev {rev} is not in the local DVC cache (`dvc fetch` gets it)"
        return [], [note + ": files not compared"]
    findings = []
    for rel in files:
        path = paths.data / rel
        if rel not in listing:
            findings.append(f"data/{rel} is not part of data_rev {rev}")
        elif datastore.md5(path) != listing[rel]:
            findings.append(f"data/{rel} changed since data_rev {rev} (md5 now "
                            f"{datastore.md5(path)[:12]}, recorded {listing[rel][:12]})")
    return findings, []


def _batch_named(findings: list[str], fallback: list[str]) -> str:
    for finding in findings:
        if finding.startswith("data/deletions/"):
            return finding.split("/")[2].split(" ")[0].removesuffix(".csv")
    return ",".join(fallback) or "none"


def verify(paths: Paths, cfg: PipelineParams, client, versions: list[dict[str, Any]],
           targets: list[int], say: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Rebuild ``targets`` from their recorded lineage; compare with the registry's hashes.

    Each release is rebuilt from its parent's registered weights (checked against the
    parent's ``weights_sha256``); the base from ``params.yaml`` and ``data/dataset``. Data
    files are compared with the release's ``data_rev`` (the DVC listing of data/ then), so a
    changed batch manifest is named even when it happens not to change the weights.
    Raises VerifyInputError before doing anything when an input is missing.
    """
    from unlearning.devices import DeviceError, describe_device
    from unlearning.models import CheckpointError

    from . import registry

    name = cfg.registry.model_name
    by_version = {v["version"]: v for v in versions}
    lineage = {v: lineage_of(d) for v, d in by_version.items()}

    def covered(version: int | None) -> list[str]:
        out: list[str] = []
        while version is not None:
            parent, batches = lineage[version]
            out = batches + out
            version = parent
        return out

    def recent(version: int) -> list[str]:
        """Batches ``version`` unlearned since the last exact model, from the lineage tags."""
        def release_of(v: int) -> dict[str, Any] | None:
            if v not in lineage:
                return None
            tags = by_version[v]["lineage"]
            method = EXACT_RETRAIN if escalation.exact_tags(tags) else tags.get("method")
            return {"parent": lineage[v][0], "batches": lineage[v][1], "method": method}

        found = consolidation.unlearned_since_exact(release_of, version)
        return found[1] if found is not None else covered(version)

    meta = datastore.read_dataset_meta(paths)
    if meta is None:
        raise VerifyInputError("data/dataset/dataset.json is missing: restore data/ with "
                               "`dvc checkout data` (or `dvc pull`)")
    dataset_files = [f"dataset/{f}" for f in sorted(meta.get("files", {}))]
    dataset_files.append(f"dataset/{datastore.DATASET_META}")
    needs: dict[int, list[str]] = {}
    for version in targets:
        if version not in by_version:
            raise VerifyInputError(f"{name} has no version {version}")
        parent, batches = lineage[version]
        if parent is not None and parent not in by_version:
            raise VerifyInputError(f"version {version} names parent {parent}, which {name} "
                                   "does not have")
        needs[version] = dataset_files + [f"deletions/{b}.csv"
                                          for b in covered(parent) + batches]
        if parent is None and by_version[version]["lineage"].get("method") == "adopt":
            needs[version] += ["base/model.pt", "base/source.json"]
        for rel in needs[version]:
            if not (paths.data / rel).is_file():
                raise VerifyInputError(f"data/{rel} is missing (version {version} needs it): "
                                       "restore it with `dvc checkout data` (or `dvc pull`)")

    try:
        load, dataset_problem = datastore.tracked_dataset(paths, cfg), None
    except datastore.DataTrackingError as e:
        load, dataset_problem = cfg, str(e)
    try:
        device_now = describe_device(cfg.runtime.torch_device())
    except DeviceError as e:
        raise VerifyInputError(str(e)) from None
    current = {"params_sha256": cfg.sha256(), "code_rev": release.code_rev(),
               "data_rev": release.data_rev(paths.home), "device": device_now}
    plan = {e["version"]: e for e in datastore.read_release_order(paths)}
    listings: dict[str, dict[str, str] | None] = {}
    results = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="unlearn-verify-") as tmp:
        for version in sorted(targets):
            t0 = time.perf_counter()
            tags = by_version[version]["lineage"]
            parent, batches = lineage[version]
            recorded = tags.get("weights_sha256", "")
            say(f"version {version}: rebuilding "
                + (f"{', '.join(batches)} from version {parent}" if parent is not None
                   else "the base model"))
            findings, notes = _data_findings(paths, tags.get("data_rev", "none"),
                                             needs[version], listings)
            if dataset_problem:
                findings.insert(0, dataset_problem)
            if tags.get("params_sha256") != current["params_sha256"]:
                notes.append(f"params.yaml differs from the parameters recorded "
                             f"(params_sha256 {tags.get('params_sha256', '?')[:12]}, now "
                             f"{current['params_sha256'][:12]})")
            if tags.get("code_rev") != current["code_rev"]:
                notes.append(f"code_rev {tags.get('code_rev')} recorded, now "
                             f"{current['code_rev']}")
            entry = plan.get(version)
            if entry is None:
                notes.append("not listed in data/releases.json (dvc repro does not rebuild it)")
            elif (entry["parent"], entry["batches"]) != (parent, batches):
                findings.append(f"data/releases.json says version {version} = version "
                                f"{entry['parent']} + {','.join(entry['batches']) or 'none'}")
            try:
                registry.fetch_version(paths, client, name, version)
            except (CheckpointError, registry.RegistryError) as e:
                findings.append(f"the registry's stored weights of version {version} do not "
                                f"match its weights_sha256 ({e})")
            served = registry.served_check(client, name, version)  # what consumers load
            if served["ok"] is False:
                findings.append(served["reason"])
            elif served["ok"] is None:
                notes.append(served["reason"])
            # float results are bit-reproducible on the same device only (an adopted base
            # is a copy of the user's weights: the same anywhere)
            adopted = parent is None and tags.get("method") == "adopt"
            built_on = tags.get("device", "cpu")  # releases before devices were CPU-only
            same_device = adopted or built_on == device_now
            if not same_device:
                notes.append(f"built on {built_on}, rebuilt on {device_now}: weights are "
                             "reproducible bit for bit on the same device only")
            rebuilt = None
            try:
                out = Path(tmp) / f"v{version}"
                if adopted:
                    rebuilt = rebuild_adopted(paths, load, out / "model.pt")["weights_sha256"]
                elif parent is None:
                    rebuilt = release.pretrain_model(load, out / "model.pt")["weights_sha256"]
                else:
                    anchor = registry.fetch_version(paths, client, name, parent)
                    attempt = escalation.attempt_of(load, tags)  # the policy's entry it used
                    steps = escalation.replay_steps(load, tags, batches)
                    if steps:  # a replay completed by the escalation policy
                        rebuilt = escalation.rebuild_steps(
                            paths, load, anchor, batches, steps, covered(parent),
                            recent(parent), out)["weights_sha256"]
                    elif attempt.exact:
                        rebuilt = escalation.retrain_exact(
                            paths, load, anchor, covered(parent) + batches,
                            out / "model.pt")["weights_sha256"]
                    else:
                        rebuilt = release.rebuild_release(
                            paths, escalation.attempt_params(load, attempt), anchor, batches,
                            recent(parent), out, held=covered(parent))["weights_sha256"]
            except (CheckpointError, registry.RegistryError) as e:
                findings.append(f"cannot rebuild from version {parent}: {e}")
            match = rebuilt == recorded
            results.append({
                "version": version, "parent": parent, "batches": batches,
                "recorded": recorded, "rebuilt": rebuilt, "match": match,
                "ok": match and not findings, "findings": findings, "notes": notes,
                "device": built_on, "rebuilt_on": device_now, "same_device": same_device,
                "served": {k: served[k] for k in ("ok", "served_sha256", "recorded", "changed")},
                "data_rev": tags.get("data_rev"), "params_sha256": tags.get("params_sha256"),
                "code_rev": tags.get("code_rev"), "seconds": time.perf_counter() - t0,
            })
            say(f"version {version}: " + (
                f"reproduced, weights_sha256 {recorded[:12]}" if results[-1]["ok"] else
                f"NOT COMPARABLE: built on {built_on}, rebuilt on {device_now}"
                if not match and not same_device and not findings else
                f"DIVERGED: rebuilt {str(rebuilt)[:12]}, registry {recorded[:12]}"
                + "".join(f"; {f}" for f in findings)))
    bad = next((r for r in results if not r["ok"]), None)
    diverged = None
    if bad is not None:
        where = (f"version {bad['version']} (batch {_batch_named(bad['findings'], bad['batches'])}"
                 + (f", from version {bad['parent']})" if bad["parent"] is not None
                    else ", the base model)"))
        hashes = ("rebuilt weights_sha256 equals the registry's" if bad["match"] else
                  f"rebuilt weights_sha256 {str(bad['rebuilt'])[:12]} != registry "
                  f"{bad['recorded'][:12]}")
        diverged = {
            "version": bad["version"], "parent": bad["parent"],
            "batch_id": _batch_named(bad["findings"], bad["batches"]),
            "recorded": bad["recorded"], "rebuilt": bad["rebuilt"],
            "reason": f"{where} diverged: {hashes}"
                      + "".join(f"; {f}" for f in bad["findings"])
                      + "".join(f"; {n}" for n in bad["notes"] if "params" in n),
        }
        if not bad["same_device"] and not bad["match"] and not bad["findings"]:
            diverged["reason"] = (
                f"{where} cannot be compared here: it was built on {bad['device']} and "
                f"rebuilt on {bad['rebuilt_on']}; weights are reproducible bit for bit on the "
                "same device (GPU model, driver, torch build) only, so this proves nothing "
                "either way: verify on that device (runtime.device in params.yaml)")
    return {"status": "ok" if bad is None else "mismatch", "model": name,
            "home": str(paths.home), **current, "dataset_problem": dataset_problem,
            "verified": [r["version"] for r in results if r["ok"]],
            "releases": results, "diverged": diverged,
            "seconds": time.perf_counter() - start}


if __name__ == "__main__":
    sys.exit(main())
