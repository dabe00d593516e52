"""``unlearn repair``: rebuild a lost, emptied, damaged or behind record of the committed
deletions from the other two (``tasks.state_check`` says which one is wrong).

What it can rebuild, and from what:

- ``data/deletions/<batch>.csv`` missing or changed: the accepted manifest from the DVC cache
  (the object ``data.dvc``, or a release's ``data_rev``, records for it), accepted only if its
  rows equal the ledger's requests (or, without a ledger, the registry's ``request_ids``);
- the ledger missing, empty, damaged (set aside as ``ledger.db.damaged-<time>``) or behind:
  batches and requests from ``data/deletions/`` (each batch's state from the registry: done
  when the champion's lineage applied it, rejected when only failing versions did, else
  pending), batches rejected at submit from ``artifacts/validation/`` and
  ``artifacts/rejected/``, releases from the registry's lineage tags, and the promotions
  along the champion's lineage;
- lineage tags of a version that disagree with both the ledger and ``data/releases.json``;
- a champion alias moved onto a version that lacks a committed deletion: back to the last
  promoted version that holds them all;
- ``data/releases.json``: rewritten from the ledger, and ``dvc add data``.

What it cannot rebuild, and refuses (exit 1, nothing changed): a lost or empty registry (the
model versions, their weights and runs lived there: restore ``mlruns/`` from a backup), a
served model whose files changed, three records that disagree with each other.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from .escalation import attempt_of, replay_steps
from .ledger import Ledger, LedgerError, ledger_present, ledger_url
from .locks import pipeline_lock, pipeline_lock_holder, submit_lock
from .params import PipelineParams
from .paths import Paths
from .state_check import (
    Problem,
    Stores,
    best_champion,
    check_state,
    manifest_rows,
    read_stores,
    seq_of,
    short_batches,
)

NOTE = "rebuilt by `unlearn repair`"


def _unrepairable(problems: list[Problem]) -> list[Problem]:
    return [p for p in problems
            if (p.store == "registry" and p.kind in ("missing", "empty", "damaged"))
            or p.store == "served" or "disagree on version" in p.line]


# -- manifests from the DVC cache -------------------------------------------------------------


def _dvc_objects(paths: Paths, revs: list[str], rel: str) -> list[Path]:
    """Cache objects recorded for ``data/<rel>`` by the data revisions ``revs`` (newest
    first), existing ones only."""
    from .datastore import data_listing

    md5s: list[str] = []
    for rev in revs:
        listing = data_listing(paths, rev) or {}
        if rel in listing and listing[rel] not in md5s:
            md5s.append(listing[rel])
    if not md5s:
        return []
    from dvc.repo import Repo

    with Repo(str(paths.home)) as repo:
        found = [Path(repo.cache.local.oid_to_path(m)) for m in md5s]
    return [p for p in found if p.is_file()]


def _revs(paths: Paths, stores: Stores) -> list[str]:
    from .release import data_rev

    revs = [data_rev(paths.home)]
    for version in sorted(stores.versions, reverse=True):
        rev = stores.versions[version]["lineage"].get("data_rev")
        if rev and rev not in revs:
            revs.append(rev)
    return [r for r in revs if r and r != "none"]


def _registry_request_ids(stores: Stores, batch_id: str) -> list[str] | None:
    """The request ids a single-batch version's ``request_ids`` tag names for ``batch_id``."""
    for version in sorted(stores.versions):
        _, batches = stores.lineage(version)
        if batches == [batch_id]:
            tag = stores.versions[version]["lineage"].get("request_ids")
            if tag is not None:
                return [r for r in tag.split(",") if r]
    return None


def _expected(stores: Stores, batch_id: str):
    """A test for a candidate manifest of ``batch_id``: its rows must be the ledger's
    requests, or (without them) carry the request ids the registry recorded."""
    if stores.ledger == "ok" and batch_id in stores.batches \
            and batch_id not in short_batches(stores):
        want = stores.requests.get(batch_id, [])
        return lambda rows: rows == want
    ids = _registry_request_ids(stores, batch_id)
    if ids is not None:
        return lambda rows: [r[0] for r in rows] == ids
    return None


def restore_manifests(paths: Paths, stores: Stores) -> tuple[list[str], list[str]]:
    """Missing or changed accepted manifests back from the DVC cache: (restored, lost)."""
    wanted: set[str] = set()
    if stores.ledger == "ok":
        wanted |= {b.batch_id for b in stores.batches.values() if b.state in ("pending", "done")}
    wanted |= {b for v in stores.versions for b in stores.lineage(v)[1]}
    wanted |= set(stores.manifests)
    revs = _revs(paths, stores)
    restored, lost = [], []
    for batch_id in sorted(wanted, key=lambda b: (seq_of(b) or 0, b)):
        path = paths.manifest(batch_id)
        ok = _expected(stores, batch_id)
        try:
            current = manifest_rows(path) if path.is_file() else None
        except (OSError, ValueError, KeyError, TypeError):
            current = None
        if current is not None and (ok is None or ok(current)):
            continue
        if ok is None and current is None and batch_id in stores.manifests:
            continue  # unreadable and nothing to check a copy against: reported, not guessed
        for obj in _dvc_objects(paths, revs, f"deletions/{batch_id}.csv"):
            try:
                rows = manifest_rows(obj)
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if ok is None or ok(rows):
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_bytes(obj.read_bytes())
                tmp.replace(path)
                restored.append(f"data/deletions/{batch_id}.csv restored from the DVC cache "
                                f"({'missing' if current is None else 'it had changed'})")
                break
        else:
            lost.append(f"data/deletions/{batch_id}.csv: no copy in the DVC cache matches "
                        "the other records (`dvc pull` fetches the remote's)")
    return restored, lost


# -- the ledger from the registry and data/ ---------------------------------------------------


def _batch_states(stores: Stores) -> dict[str, tuple[str, int | None, str | None]]:
    """What the registry says of each batch it names: (state, version, reason)."""
    chain, covered = stores.registry_chain(stores.champion)
    applied_by: dict[str, int] = {}
    for version in reversed(chain):  # oldest first: the release that applied it
        for b in stores.lineage(version)[1]:
            applied_by.setdefault(b, version)
    out: dict[str, tuple[str, int | None, str | None]] = {}
    for b in covered:
        out[b] = ("done", applied_by.get(b), None)
    for version in sorted(stores.versions):
        v = stores.versions[version]
        for b in stores.lineage(version)[1]:
            if b in out and out[b][0] == "done":
                continue
            if v["gates_passed"]:
                out[b] = ("pending", None, None)  # registered, never promoted: a run resumes it
            elif b not in out:
                reason = "gates: " + (", ".join(v["gate_failures"]) or "failed")
                out[b] = ("rejected", version, reason)
    return out


def _validation_report(paths: Paths, batch_id: str) -> dict[str, Any] | None:
    try:
        return json.loads((paths.artifacts / "validation" / f"{batch_id}.json").read_text())
    except (OSError, ValueError):
        return None


def _rejected_at_submit(paths: Paths, cfg: PipelineParams) -> dict[str, dict[str, Any]]:
    """Batches validation rejected: their report and the manifest kept for the audit trail."""
    from .validation import describe_failures, manifest_bytes, parse_manifest, typed_rows

    out = {}
    folder = paths.artifacts / "validation"
    for report_path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        batch_id = report_path.stem
        report = _validation_report(paths, batch_id)
        if not report or report.get("success") is not False or seq_of(batch_id) is None:
            continue
        kept = sorted((paths.artifacts / "rejected").glob(f"{batch_id}.*"))
        rows: list[dict[str, Any]] = []
        if kept:
            try:
                from .release import dataset_of

                raw = parse_manifest(manifest_bytes(kept[0]), kept[0])
                rows = typed_rows(raw, dataset_of(cfg).key_ids)
            except Exception:  # noqa: BLE001  (a rejected file may be anything: keep the batch)
                rows = []
        out[batch_id] = {
            "rows": rows, "source": str(kept[0]) if kept else "unknown",
            "reason": "validation: " + describe_failures(report.get("failures") or []),
            "report": {"success": False, "failures": report.get("failures") or [],
                       "report": str(report_path)},
            "time": report_path.stat().st_mtime,
        }
    return out


def _attempts(cfg: PipelineParams, stores: Stores, batch_id: str) -> list[dict[str, Any]]:
    """A batch's attempts as ``unlearn requests --json`` and ``unlearn audit`` show them,
    from the lineage tags of the versions its runs registered (tag ``attempt``; replays have
    none): method, params, passed, the failing gates' names. Their values stay in each
    version's run (``gates.json``)."""
    out: list[dict[str, Any]] = []
    for version in sorted(stores.versions):
        v = stores.versions[version]
        tags = v["lineage"]
        if stores.lineage(version)[1] != [batch_id] or "attempt" not in tags:
            continue
        attempt = attempt_of(cfg, tags)
        failures = list(v["gate_failures"])
        out.append({
            "attempt": int(tags["attempt"]) if tags["attempt"].isdigit() else len(out) + 1,
            "version": version, **attempt.record(),
            "exact": attempt.exact, "passed": v["gates_passed"],
            "escalated_from": int(tags["escalated_from"])
            if tags.get("escalated_from", "").isdigit() else None,
            "summary": "passed" if v["gates_passed"] else "failed: " + (", ".join(failures)
                                                                      or "gates"),
            "failures": [{"gate": f} for f in failures], "restored": NOTE})
    return out


def _add_accepted(ledger: Ledger, paths: Paths, batch_id: str, seq: int,
                  state: tuple[str, int | None, str | None],
                  attempts: list[dict[str, Any]]) -> str:
    from .release import read_rows

    path = paths.manifest(batch_id)
    rows = read_rows(path)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    report = {"success": True, "failures": [], "manifest_sha256": sha, "restored": NOTE,
              "report": str(paths.artifacts / "validation" / f"{batch_id}.json")}
    ledger.add_batch(batch_id, seq, "pending", f"{path.relative_to(paths.home)} ({NOTE})", rows,
                     report=report)
    what, version, reason = state
    if what != "pending":
        released = next((a for a in attempts if a["version"] == version), None)
        ledger.set_state(batch_id, what, version=version, reason=reason,
                         report={**report, "state_from": "registry lineage",
                                 "escalation": attempts,
                                 "exact": bool(what == "done" and released
                                               and released["exact"])})
    stamp = _validation_report_time(paths, batch_id) or path.stat().st_mtime
    with ledger.transaction() as db:  # when it was accepted, not when it was rebuilt
        db.execute("UPDATE batches SET submitted=? WHERE batch_id=?", (stamp, batch_id))
    return (f"batch {batch_id} ({what}{f', version {version}' if version else ''}, "
            f"{len(rows)} request(s)) from data/deletions/")


def _validation_report_time(paths: Paths, batch_id: str) -> float | None:
    try:
        return (paths.artifacts / "validation" / f"{batch_id}.json").stat().st_mtime
    except OSError:
        return None


def _set_aside(paths: Paths) -> str | None:
    """Move a damaged or empty ledger file out of the way (kept for inspection)."""
    if ledger_url() is not None or not paths.ledger.exists():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = paths.ledger.with_name(f"{paths.ledger.name}.damaged-{stamp}")
    for suffix in ("", "-wal", "-shm"):
        side = Path(f"{paths.ledger}{suffix}")
        if side.exists():
            os.replace(side, Path(f"{target}{suffix}"))
    return f"the old ledger kept as {target.relative_to(paths.home)}"


def rebuild_ledger(paths: Paths, cfg: PipelineParams, stores: Stores,
                   fresh: bool) -> list[str]:
    """Add to the ledger (a new one when ``fresh``) every batch, request, release and
    promotion the registry and data/ record and it lacks."""
    done: list[str] = []
    if fresh:
        note = _set_aside(paths)
        if note:
            done.append(note)
    states = _batch_states(stores)
    rejected = _rejected_at_submit(paths, cfg)
    with Ledger(paths.ledger) as ledger:
        have = {b.batch_id: b for b in ledger.batches()}
        used = {b.seq for b in have.values()}
        accepted = sorted({p.stem for p in paths.deletions.glob("*.csv")}
                          if paths.deletions.is_dir() else set(), key=lambda b: (seq_of(b) or 0, b))
        for batch_id in accepted:
            if batch_id in have:
                continue
            seq = seq_of(batch_id) or max(used | {0}) + 1
            used.add(seq)
            done.append(_add_accepted(ledger, paths, batch_id, seq,
                                      states.get(batch_id, ("pending", None, None)),
                                      _attempts(cfg, stores, batch_id)))
        for batch_id, r in rejected.items():
            if batch_id in have or batch_id in accepted:
                continue
            seq = seq_of(batch_id) or max(used | {0}) + 1
            if seq in used:
                continue
            used.add(seq)
            ledger.add_batch(batch_id, seq, "rejected", r["source"], r["rows"], reason=r["reason"],
                             report=r["report"])
            with ledger.transaction() as db:
                db.execute("UPDATE batches SET submitted=?, updated=? WHERE batch_id=?",
                           (r["time"], r["time"], batch_id))
            done.append(f"batch {batch_id} (rejected at submit) from artifacts/validation/")
        # requests a damaged ledger lost, from the accepted manifest
        for b in ledger.batches():
            rows = ledger.requests(b.batch_id)
            path = paths.manifest(b.batch_id)
            if b.state in ("pending", "done") and len(rows) != b.rows and path.is_file():
                from .release import read_rows

                fresh_rows = read_rows(path)
                if len(fresh_rows) != b.rows:
                    continue
                with ledger.transaction() as db:
                    db.execute("DELETE FROM requests WHERE batch_id=?", (b.batch_id,))
                    db.executemany(
                        "INSERT INTO requests (batch_id, row, request_id, instance_id, "
                        "objective, new_label) VALUES (?, ?, ?, ?, ?, ?)",
                        [(b.batch_id, i + 1, r["request_id"], r["instance_id"], r["objective"],
                          r["new_label"]) for i, r in enumerate(fresh_rows)])
                    if any(r.get("instance_key") for r in fresh_rows):
                        db.executemany("UPDATE requests SET instance_key=? WHERE batch_id=? "
                                       "AND row=?", [(r.get("instance_key"), b.batch_id, i + 1)
                                                     for i, r in enumerate(fresh_rows)])
                done.append(f"{b.rows - len(rows)} request(s) of batch {b.batch_id} from "
                            f"data/deletions/{b.batch_id}.csv")
        # releases, from the registry's lineage (versions of batches still pending are left
        # to the run that resumes them)
        batch_state = {b.batch_id: b.state for b in ledger.batches()}
        for version in sorted(stores.versions):
            if ledger.release(version) is not None:
                continue
            parent, batches = stores.lineage(version)
            if any(batch_state.get(b) == "pending" for b in batches):
                continue
            built: dict[str, Any] | None = None
            if parent is not None:  # the method and params it was built with, from its tags
                tags = stores.versions[version]["lineage"]
                attempt = attempt_of(cfg, tags)
                built = attempt.record()
                try:
                    steps = replay_steps(cfg, tags, batches)
                except (ValueError, KeyError, TypeError) as e:  # a hand-edited tag
                    steps = None
                    done.append(f"release {version}: its replay_steps tag is unreadable ({e}); "
                                f"recorded with its last method, {attempt.method}, alone")
                if steps:  # a replay the escalation policy completed: one attempt per batch
                    built = {**steps[-1].record(), "steps": [s.record() for s in steps]}
            ledger.add_release(version, parent, batches, stores.versions[version]["gates_passed"],
                               built)
            done.append(f"release {version} (version {parent or 'none'} + "
                        f"{','.join(batches) or 'base'}) from the registry")
        # promotions along the champion's lineage, when the ledger has none
        chain, _ = stores.registry_chain(stores.champion)
        if stores.champion is not None and not ledger.promotions():
            previous = None
            for version in reversed(chain):
                ledger.record_promotion(version, previous, "repaired",
                                        note=f"{NOTE} from the registry lineage")
                previous = version
            done.append(f"promotion history {' -> '.join(str(v) for v in reversed(chain))} "
                        "from the champion's lineage")
    return done


# -- the registry's lineage and the champion --------------------------------------------------


def restore_tags(paths: Paths, cfg: PipelineParams, stores: Stores) -> list[str]:
    """Lineage tags that disagree with the ledger and data/releases.json, set back."""
    from .release import read_rows

    order = {int(e["version"]): e for e in stores.order if "version" in e}
    name = cfg.registry.model_name
    done = []
    for version in sorted(set(stores.versions) & set(stores.releases)):
        rel = stores.releases[version]
        ledger = (rel["parent"], list(rel["batches"]))
        entry = order.get(version)
        if stores.lineage(version) == ledger or entry is None \
                or (entry.get("parent"), list(entry.get("batches", []))) != ledger:
            continue
        rows = [r for b in ledger[1] for r in read_rows(paths.manifest(b))]
        tags = {"parent_version": str(ledger[0]) if ledger[0] is not None else "none",
                "batch_id": ",".join(ledger[1]) or "none",
                "request_ids": ",".join(r["request_id"] for r in rows)}
        for key, value in tags.items():
            stores.client.set_model_version_tag(name, str(version), key, value)
        done.append(f"lineage tags of version {version} (parent {tags['parent_version']}, "
                    f"batches {tags['batch_id']}) from the ledger and data/releases.json")
    return done


def restore_champion(paths: Paths, cfg: PipelineParams, stores: Stores) -> list[str]:
    from . import registry

    best = best_champion(stores)
    champion = stores.champion
    if best is None or best == champion:
        return []
    done = {b.batch_id for b in stores.done()}
    if champion is not None and champion in stores.releases \
            and stores.releases[champion]["passed"] \
            and done <= set(stores.ledger_covered(champion)):
        return []  # the champion holds every deletion: moved outside the pipeline, not wrong
    name = cfg.registry.model_name
    stores.client.set_registered_model_alias(name, registry.CHAMPION, str(best))
    if registry.alias_version(stores.client, name, registry.CANDIDATE) == best:
        stores.client.delete_registered_model_alias(name, registry.CANDIDATE)
    with Ledger(paths.ledger) as ledger:
        ledger.record_promotion(best, champion, "repair",
                                note=f"the champion alias pointed at version {champion}, which "
                                     "lacked committed deletions")
    return [f"champion alias back at version {best} (it pointed at version {champion})"]


# -- the command ------------------------------------------------------------------------------


def _cannot(paths: Paths, stores: Stores, problem: Problem) -> str:
    """What cannot be rebuilt, said plainly (nothing was changed)."""
    if problem.store != "registry" or problem.kind not in ("missing", "empty", "damaged"):
        return f"{problem.line}; nothing was changed"
    versions = sorted(stores.releases) or sorted(int(e["version"]) for e in stores.order
                                                 if "version" in e)
    last = stores.promotions[-1]["version"] if stores.promotions else None
    done = len(stores.done())
    what = (f"version(s) {', '.join(map(str, versions))}" if versions else "its versions")
    return (f"{problem.line.split(', but')[0]} and cannot be rebuilt: {what}"
            + (f" (champion {last})" if last is not None else "")
            + ", their weights, served models and runs lived there and neither the ledger nor "
            "data/ holds them. Restore mlruns/ from a backup; nothing was changed"
            + (f" (the ledger and data/ still record the {done} committed batch(es))"
               if stores.ledger == "ok" else ""))


def repair(paths: Paths, cfg: PipelineParams) -> dict[str, Any]:
    """Check, rebuild what can be rebuilt, check again. ``status``: ok (the records agree
    now), failed (something cannot be rebuilt: ``reason``; nothing was changed then) or
    busy."""
    from .submit import finish_interrupted_submits

    with pipeline_lock(paths, wait=False) as got:
        if not got:
            return {"status": "failed", "busy": True, "restored": [],
                    "reason": f"another pipeline command is running "
                              f"({pipeline_lock_holder(paths)}); nothing was changed: try "
                              "again when it has finished"}
        if ledger_present(paths.ledger):
            with contextlib.suppress(LedgerError):  # a damaged ledger: rebuilt below
                finish_interrupted_submits(paths, cfg)
        with submit_lock(paths):
            before = check_state(paths, cfg, served=True, heal=False, thorough=True)
            result: dict[str, Any] = {
                "status": "ok", "restored": [], "lost": [],
                "problems_before": [p.to_dict() for p in before.problems],
                "problems_after": []}
            if before.ok:
                return {**result, "reason": None}
            blocked = _unrepairable(before.problems)
            if blocked:
                more = (f" ({len(blocked) - 1} more such problem(s))" if len(blocked) > 1
                        else "")
                return {**result, "status": "failed",
                        "reason": _cannot(paths, before.stores, blocked[0]) + more}
            stores = before.stores
            restored, lost = restore_manifests(paths, stores)
            stores = read_stores(paths, cfg)
            restored += rebuild_ledger(paths, cfg, stores, fresh=stores.ledger != "ok")
            stores = read_stores(paths, cfg)
            if stores.registry == "ok" and stores.ledger == "ok":
                restored += restore_tags(paths, cfg, stores)
                stores = read_stores(paths, cfg)
                restored += restore_champion(paths, cfg, stores)
            if ledger_present(paths.ledger):
                from .datastore import DataTrackingError, track

                try:
                    track(paths, cfg)
                    restored.append("data/releases.json from the ledger; data.dvc updated "
                                    "(`dvc add data`)")
                except DataTrackingError as e:
                    lost.append(f"data.dvc not updated: {e}")
            after = check_state(paths, cfg, served=True, heal=False, thorough=True)
    result.update(restored=restored, lost=lost,
                  problems_after=[p.to_dict() for p in after.problems])
    if not after.ok:
        result.update(status="failed", reason="still damaged after the repair: " + after.line)
    return result
