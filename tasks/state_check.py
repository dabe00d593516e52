"""Three records of committed deletions, cross-checked before a command trusts them.

Every committed deletion is written to three places, each able to stand in for a lost one:

- the ledger (``artifacts/ledger.db``): batches, requests, releases, promotions;
- the registry: each version's lineage tags (``parent_version``, ``batch_id``,
  ``request_ids``, ``gates_passed``) and the ``champion`` alias;
- ``data/`` under DVC: ``data/deletions/<batch>.csv`` (every accepted manifest) and
  ``data/releases.json`` (every release: version, parent, batches).

``check_state`` reads the three cheaply (one ledger open, one registry search, a directory
listing and the small manifests) and lists what disagrees: a record missing, empty, damaged or
behind the others, lineage tags that differ from the ledger and data, a champion alias that
lacks a committed deletion, a manifest that changed. With ``served=True`` it also downloads
the champion's logged MLflow model and compares it with the ``served_sha256`` recorded when it
was registered. Commands that would change the state (submit, run, promote, rollback,
pretrain, adopt) refuse while anything is listed; ``unlearn repair`` (``tasks.repair``)
rebuilds what can be rebuilt.

States a killed command leaves behind are not damage: a version registered for a batch the
ledger still calls pending, a ledger release ``data/releases.json`` does not list yet, a
champion alias that moved before the ledger recorded the promotion. The next ``unlearn run``
(or the retried command) finishes them.

``new_base_refusal`` is the one check for every way of registering a new base model
(``pretrain``, ``adopt``): a base model that did not come from the champion cannot be known to
hold the committed deletions, so it is refused while there are any.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .faults import fault
from .ledger import Batch, Ledger, LedgerError, ledger_present, ledger_url
from .params import PipelineParams
from .paths import Paths

SEQ = re.compile(r"^b(\d+)-")
REPAIR = "run `unlearn repair`"
ROW_FIELDS = ("request_id", "instance_id", "objective", "new_label")


@dataclass(frozen=True)
class Problem:
    store: str   # ledger | registry | data | champion | served
    kind: str    # missing | empty | damaged | behind | differs | changed
    line: str

    def to_dict(self) -> dict[str, str]:
        return {"store": self.store, "kind": self.kind, "line": self.line}


@dataclass
class Stores:
    """What each record says, read once."""

    ledger: str = "ok"                      # ok | missing | empty | damaged
    ledger_error: str | None = None
    batches: dict[str, Batch] = field(default_factory=dict)
    requests: dict[str, list[tuple]] = field(default_factory=dict)  # batch -> rows, in order
    releases: dict[int, dict[str, Any]] = field(default_factory=dict)
    promotions: list[dict[str, Any]] = field(default_factory=list)
    registry: str = "ok"                    # ok | missing | empty | damaged
    registry_error: str | None = None
    versions: dict[int, dict[str, Any]] = field(default_factory=dict)  # registry.list_versions
    champion: int | None = None
    client: Any = None
    manifests: dict[str, Path] = field(default_factory=dict)  # data/deletions/<batch>.csv
    order: list[dict[str, Any]] = field(default_factory=list)  # data/releases.json
    order_error: str | None = None

    def lineage(self, version: int) -> tuple[int | None, list[str]]:
        """(parent, batches) from a registry version's lineage tags."""
        tags = self.versions[version]["lineage"]
        parent, batch = tags.get("parent_version", "none"), tags.get("batch_id", "none")
        try:
            p = None if parent in ("", "none") else int(parent)
        except ValueError:
            p = None
        return p, ([] if batch in ("", "none") else batch.split(","))

    def registry_chain(self, version: int | None) -> tuple[list[int], list[str]]:
        """The versions from ``version`` back to its base (registry tags), and the batches
        they applied, oldest first."""
        chain: list[int] = []
        covered: list[str] = []
        while version is not None and version in self.versions and version not in chain:
            chain.append(version)
            parent, batches = self.lineage(version)
            covered = batches + covered
            version = parent
        return chain, covered

    def ledger_covered(self, version: int | None) -> list[str]:
        out: list[str] = []
        seen: set[int] = set()
        while version is not None and version in self.releases and version not in seen:
            seen.add(version)
            out = self.releases[version]["batches"] + out
            version = self.releases[version]["parent"]
        return out

    def done(self) -> list[Batch]:
        return sorted((b for b in self.batches.values() if b.state == "done"),
                      key=lambda b: b.seq)

    def committed_in_registry(self) -> list[str]:
        return self.registry_chain(self.champion)[1]


@dataclass
class Report:
    stores: Stores
    problems: list[Problem]

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def line(self) -> str:
        if not self.problems:
            return "the ledger, the registry and data/ agree"
        more = len(self.problems) - 1
        tail = f" (and {more} more problem(s): `unlearn repair --json` lists them)" if more else ""
        return self.problems[0].line + tail

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "problems": [p.to_dict() for p in self.problems]}


# -- reading the three records ------------------------------------------------------------------


def _rel(paths: Paths, path: Path) -> str:
    try:
        return str(path.relative_to(paths.home))
    except ValueError:
        return str(path)


def read_ledger(paths: Paths, stores: Stores) -> None:
    path = paths.ledger
    if ledger_url() is not None:  # PostgreSQL: missing until its tables exist
        if not ledger_present(path):
            stores.ledger = "missing"
            return
    elif not path.exists():
        stores.ledger = "missing"
        return
    elif path.stat().st_size == 0:
        stores.ledger = "empty"
        return
    try:
        with Ledger(path) as ledger:
            stores.batches = {b.batch_id: b for b in ledger.batches()}
            for r in ledger.requests():
                stores.requests.setdefault(r["batch_id"], []).append(
                    tuple(r[k] for k in ROW_FIELDS))
            stores.releases = {int(r["version"]): r for r in ledger.releases()}
            stores.promotions = ledger.promotions()
    except LedgerError as e:
        stores.ledger, stores.ledger_error = "damaged", str(e)
        return
    if not stores.batches and not stores.releases and not stores.promotions:
        stores.ledger = "empty"


def read_registry(paths: Paths, cfg: PipelineParams, stores: Stores,
                  snapshot: bool = False) -> None:
    """``snapshot``: a listing may read the registry's snapshot (``registry.read_versions``);
    it then has no client (``stores.client`` stays None: no served check, no repair)."""
    db = paths.registry_db
    if db is not None and not db.exists():  # never let MLflow create an empty one here
        stores.registry = "missing"
        return
    from . import registry

    client = None
    try:
        if snapshot:
            versions = registry.read_versions(paths, cfg)
        else:
            client = registry.connect(paths, cfg)
            versions = registry.list_versions(client, cfg.registry.model_name)
    except Exception as e:  # noqa: BLE001  (an unreadable store: say so, do not crash)
        stores.registry = "damaged"
        stores.registry_error = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        return
    stores.client = client
    stores.versions = {v["version"]: v for v in versions}
    stores.champion = next((v["version"] for v in versions if registry.CHAMPION in v["aliases"]),
                           None)
    if not versions:
        stores.registry = "empty"


def read_manifests(paths: Paths, stores: Stores) -> None:
    if paths.deletions.is_dir():
        stores.manifests = {p.stem: p for p in sorted(paths.deletions.glob("*.csv"))}


def read_data(paths: Paths, stores: Stores) -> None:
    from .datastore import DataTrackingError, read_release_order

    try:
        stores.order = read_release_order(paths)
    except DataTrackingError as e:
        stores.order_error = str(e)


def read_stores(paths: Paths, cfg: PipelineParams, snapshot: bool = False) -> Stores:
    stores = Stores()
    # data/deletions/ before the ledger: a submit records its batch in the ledger before it
    # moves the manifest there, so every manifest listed is in the ledger read after it,
    # even when submits finish while the records are read (a watcher checks the state
    # while requests keep arriving)
    read_manifests(paths, stores)
    fault("in:read_stores")
    read_ledger(paths, stores)
    read_registry(paths, cfg, stores, snapshot=snapshot)
    read_data(paths, stores)
    return stores


# -- cross-checks -----------------------------------------------------------------------------


def _batches_text(batches: list[str]) -> str:
    return ",".join(batches) or "none"


def _latest(batches: list[str]) -> str:
    return max(batches, key=lambda b: (seq_of(b) or 0, b)) if batches else "none"


def seq_of(batch_id: str) -> int | None:
    m = SEQ.match(batch_id)
    return int(m.group(1)) if m else None


def _evidence_for_ledger(stores: Stores) -> str:
    parts = []
    if stores.versions:
        named = sorted({b for v in stores.versions for b in stores.lineage(v)[1]})
        parts.append(f"the registry holds {len(stores.versions)} version(s) applying "
                     f"{len(named)} batch(es)"
                     + (f" (latest {_latest(named)})" if named else ""))
    if stores.manifests:
        parts.append(f"data/deletions/ holds {len(stores.manifests)} accepted manifest(s) "
                     f"(latest {_latest(list(stores.manifests))})")
    elif stores.order:
        parts.append(f"data/releases.json lists {len(stores.order)} release(s)")
    return " and ".join(parts)


def _evidence_for_registry(stores: Stores) -> str:
    if stores.ledger == "ok" and stores.releases:
        done = [b.batch_id for b in stores.done()]
        last = stores.promotions[-1]["version"] if stores.promotions else None
        return (f"the ledger records {len(stores.releases)} release(s)"
                + (f" (champion version {last})" if last is not None else "")
                + f" and {len(done)} committed batch(es)"
                + (f" (latest {done[-1]})" if done else ""))
    if stores.order:
        return f"data/releases.json lists {len(stores.order)} release(s)"
    return ""


def _store_problems(paths: Paths, cfg: PipelineParams, stores: Stores) -> list[Problem]:
    out = []
    rel = _rel(paths, paths.ledger)
    if stores.ledger == "damaged":
        out.append(Problem("ledger", "damaged", str(stores.ledger_error)))
    elif stores.ledger in ("missing", "empty"):
        evidence = _evidence_for_ledger(stores)
        if evidence:
            out.append(Problem("ledger", stores.ledger, (
                f"the ledger {rel} is {stores.ledger}, but {evidence}: {REPAIR} to rebuild "
                "it from them; until then no deletion is accepted, promoted or trained on")))
    if stores.registry != "ok":
        evidence = _evidence_for_registry(stores)
        db = paths.registry_db
        where = _rel(paths, db) if db is not None else paths.tracking_uri
        state = {"missing": f"the registry {where} is missing",
                 "empty": f"the registry {where} has no versions of {cfg.registry.model_name}",
                 "damaged": f"the registry {where} cannot be read ({stores.registry_error})"}[
            stores.registry]
        if evidence or stores.registry == "damaged":
            out.append(Problem("registry", stores.registry, (
                f"{state}, but {evidence or 'it held the releases'}: restore mlruns/ from a "
                "backup (`unlearn repair` says what it cannot rebuild); until then no "
                "deletion is accepted, promoted or trained on")))
    return out


def _ledger_vs_registry(stores: Stores) -> list[Problem]:
    out = []
    known = stores.batches
    for version in sorted(stores.versions):
        unknown = [b for b in stores.lineage(version)[1] if b not in known]
        if unknown:
            out.append(Problem("ledger", "behind", (
                f"the ledger does not record batch {unknown[0]}, which version {version} of the "
                f"registry applied: {REPAIR} (it restores the batch from the registry and "
                f"data/deletions/)")))
    order = {int(e["version"]): e for e in stores.order if "version" in e}
    for version in sorted(set(stores.versions) & set(stores.releases)):
        tags = stores.lineage(version)
        rel = stores.releases[version]
        ledger = (rel["parent"], list(rel["batches"]))
        if tags == ledger:
            continue
        entry = order.get(version)
        data = (entry.get("parent"), list(entry.get("batches", []))) if entry else None
        if data == ledger:
            out.append(Problem("registry", "differs", (
                f"the registry's lineage tags of version {version} (parent {tags[0] or 'none'}, "
                f"batches {_batches_text(tags[1])}) disagree with the ledger and "
                f"data/releases.json (parent {ledger[0] or 'none'}, batches "
                f"{_batches_text(ledger[1])}): {REPAIR} (it restores the tags)")))
        elif data == tags:
            out.append(Problem("ledger", "differs", (
                f"the ledger's record of version {version} (parent {ledger[0] or 'none'}, "
                f"batches {_batches_text(ledger[1])}) disagrees with the registry and "
                f"data/releases.json: {REPAIR}")))
        else:
            out.append(Problem("registry", "differs", (
                f"the ledger, the registry and data/releases.json disagree on version "
                f"{version}; restore the registry or the ledger from a backup")))
    return out


def short_batches(stores: Stores) -> set[str]:
    """Accepted batches whose request rows in the ledger are fewer or more than its count."""
    return {b.batch_id for b in stores.batches.values() if b.state in ("pending", "done")
            and len(stores.requests.get(b.batch_id, [])) != b.rows}


def _ledger_vs_data(stores: Stores, named_by_registry: set[str]) -> list[Problem]:
    out = []
    for batch_id in stores.manifests:
        if batch_id not in stores.batches and batch_id not in named_by_registry:
            out.append(Problem("ledger", "behind", (
                f"the ledger does not record batch {batch_id}, whose accepted manifest "
                f"data/deletions/{batch_id}.csv is tracked by DVC: {REPAIR}")))
    for b in sorted(stores.batches.values(), key=lambda b: b.seq):
        if b.batch_id not in short_batches(stores):
            continue
        n = len(stores.requests.get(b.batch_id, []))
        out.append(Problem("ledger", "behind", (
            f"the ledger lists {n} of the {b.rows} requests of batch {b.batch_id}"
            if n < b.rows else
            f"the ledger lists {n} requests of batch {b.batch_id}, which has {b.rows}")
            + f" (data/deletions/{b.batch_id}.csv holds them all): {REPAIR}"))
    return out


def _champion_problems(stores: Stores) -> list[Problem]:
    champion = stores.champion
    last = stores.promotions[-1]["version"] if stores.promotions else None
    if champion is None:
        if stores.releases and last is not None:
            return [Problem("champion", "missing", (
                f"the registry has no champion alias, but the ledger's last promotion made "
                f"version {last} champion: {REPAIR}"))]
        return []
    rel = stores.releases.get(champion)
    if rel is None:
        return [Problem("champion", "differs", (
            f"the champion alias points at version {champion}, which the ledger does not "
            f"record as a release: {REPAIR}"))]
    if not rel["passed"]:
        return [Problem("champion", "differs", (
            f"the champion alias points at version {champion}, which failed its gates: "
            f"{REPAIR}"))]
    covered = set(stores.ledger_covered(champion))
    missing = [b for b in stores.done() if b.batch_id not in covered]
    if missing:
        n = sum(b.rows for b in missing)
        best = best_champion(stores)
        return [Problem("champion", "differs", (
            f"the champion alias points at version {champion}, which lacks committed deletion "
            f"batch(es) {', '.join(b.batch_id for b in missing)} ({n} instance(s)): deleted "
            f"data is being served; {REPAIR}"
            + (f" (it points the champion back at version {best})" if best else "")))]
    return []


def best_champion(stores: Stores) -> int | None:
    """The version the champion should be: the last promoted one that passed and holds every
    committed batch, else the newest such version."""
    done = {b.batch_id for b in stores.done()}

    def fits(version: int | None) -> bool:
        rel = stores.releases.get(version) if version is not None else None
        return bool(rel and rel["passed"] and done <= set(stores.ledger_covered(version)))

    for row in reversed(stores.promotions):
        if fits(row["version"]):
            return int(row["version"])
    return next((v for v in sorted(stores.releases, reverse=True) if fits(v)), None)


def manifest_rows(path: Path) -> list[tuple]:
    from .release import read_rows

    return [tuple(r[k] for k in ROW_FIELDS) for r in read_rows(path)]


def _data_problems(paths: Paths, stores: Stores, skip: set[str],
                   thorough: bool) -> list[Problem]:
    """Every accepted manifest must be there; the pending ones and the latest done one (all
    of them when ``thorough``) must hold the ledger's requests, row for row. (``unlearn
    verify`` compares every manifest a release used with its DVC data revision.)"""
    from .release import manifest_problem

    out = []
    done = stores.done()
    latest = done[-1].batch_id if done else None
    for b in sorted(stores.batches.values(), key=lambda b: b.seq):
        if b.state not in ("pending", "done") or b.batch_id in skip:
            continue
        path = paths.manifest(b.batch_id)
        if not thorough and b.state == "done" and b.batch_id != latest and path.is_file() \
                and not path.is_symlink():
            continue  # there; its content is compared by repair and verify
        problem = manifest_problem(paths, b)
        if problem is None:
            want = stores.requests.get(b.batch_id, [])
            try:
                have = manifest_rows(paths.manifest(b.batch_id))
            except (OSError, ValueError, KeyError, TypeError):
                have = []
            if have != want:
                row = next((i + 1 for i, (x, y) in enumerate(zip(have, want)) if x != y),
                           min(len(have), len(want)) + 1)
                problem = (f"the manifest of {b.state} batch {b.batch_id} "
                           f"(data/deletions/{b.batch_id}.csv) changed since it was accepted "
                           f"(row {row} differs from the ledger's requests): restore data/ with "
                           "`dvc checkout data` or run `unlearn repair`")
        if problem:
            out.append(Problem("data", "changed", problem))
    if stores.order_error:
        out.append(Problem("data", "damaged", f"{stores.order_error}: {REPAIR}"))
        return out
    newest = max((int(e.get("version", 0)) for e in stores.order), default=0)
    for e in stores.order:
        version = int(e.get("version", 0))
        rel = stores.releases.get(version)
        if rel is None:
            if version not in stores.versions:
                out.append(Problem("data", "differs", (
                    f"data/releases.json lists version {version}, which neither the ledger nor "
                    f"the registry records: {REPAIR} (it rewrites the file from the ledger)")))
            continue
        if (e.get("parent"), list(e.get("batches", []))) != (rel["parent"], rel["batches"]):
            out.append(Problem("data", "differs", (
                f"data/releases.json says version {version} = version {e.get('parent')} + "
                f"{_batches_text(list(e.get('batches', [])))}, the ledger says version "
                f"{rel['parent']} + {_batches_text(rel['batches'])}: {REPAIR}")))
    listed = {int(e.get("version", 0)) for e in stores.order}
    lacking = [v for v in sorted(stores.releases) if v not in listed and v < newest]
    if lacking:  # behind at the end is a run in progress; a gap is not
        out.append(Problem("data", "behind", (
            f"data/releases.json lacks version {lacking[0]}, which the ledger records: "
            f"{REPAIR} (it rewrites the file from the ledger)")))
    return out


def served_problem(stores: Stores, cfg: PipelineParams) -> Problem | None:
    """The champion's logged MLflow model against its recorded ``served_sha256``."""
    if stores.registry != "ok" or stores.champion is None or stores.client is None:
        return None
    from . import registry

    found = registry.served_check(stores.client, cfg.registry.model_name, stores.champion)
    if found["ok"] is False:
        return Problem("served", "changed", (
            f"{found['reason']}: consumers would load other weights than the ones registered; "
            "restore mlruns/ from a backup"))
    return None


def find_problems(paths: Paths, cfg: PipelineParams, stores: Stores,
                  served: bool = False, thorough: bool = False) -> list[Problem]:
    problems = _store_problems(paths, cfg, stores)
    if stores.ledger == "ok":
        named: set[str] = set()
        if stores.registry == "ok":
            problems += _ledger_vs_registry(stores)
            named = {b for v in stores.versions for b in stores.lineage(v)[1]}
        problems += _ledger_vs_data(stores, named)
        if stores.registry == "ok":
            problems += _champion_problems(stores)
        problems += _data_problems(paths, stores, short_batches(stores), thorough)
    if served and not problems:
        found = served_problem(stores, cfg)
        if found is not None:
            problems.append(found)
    return problems


def check_state(paths: Paths, cfg: PipelineParams, served: bool = False,
                heal: bool = True, thorough: bool = False, snapshot: bool = False) -> Report:
    """Read the three records and list what disagrees (``Report.line``: one line).

    ``served``: also check the champion's logged model against its recorded fingerprint (a
    download). ``thorough``: compare every accepted manifest with the ledger's requests (by
    default only the pending ones and the latest done one are read: counts, names and the
    latest batch keep the check cheap on a long history). ``heal``: first finish a submit that
    was killed after the ledger accepted its batch (its manifest is moved into
    data/deletions/). ``snapshot``: for listings (see ``read_registry``); not with ``served``."""
    if heal and ledger_present(paths.ledger) \
            and any(paths.incoming.glob("*.csv")):  # (submit imports pandas: only if needed)
        from .submit import finish_interrupted_submits

        with contextlib.suppress(LedgerError):  # reported below
            finish_interrupted_submits(paths, cfg)
    stores = read_stores(paths, cfg, snapshot=snapshot and not served)
    return Report(stores, find_problems(paths, cfg, stores, served=served,
                                        thorough=thorough))


def new_base_refusal(paths: Paths, cfg: PipelineParams, what: str) -> str | None:
    """Why a new base model (``pretrain``, ``adopt``) must not be registered here, or None.

    A base model that did not come from the champion by unlearning cannot be known to hold
    the committed deletions: trained on the whole training split it contains them, and an
    external model may have seen them. So it is refused while any record (the ledger, the
    registry's lineage, data/deletions/) names a committed deletion, or while the records
    disagree (a lost record could be hiding them)."""
    report = check_state(paths, cfg, served=True)
    if report.problems:
        return report.line
    stores = report.stores
    done = [b.batch_id for b in stores.done()]
    done += [b for b in stores.committed_in_registry() if b not in done]
    if not done:
        return None
    n = sum(stores.batches[b].rows for b in done if b in stores.batches)
    source = ("trained on the whole training split" if what == "pretrain"
              else "from outside this pipeline")
    return (f"the state records {len(done)} committed deletion batch(es) ({', '.join(done)}; "
            f"{n} instance(s)); a new base model {source} would contain them and serving it "
            f"would bring deleted data back, so {what} refuses. Unlearn further batches on top "
            "of the champion, or start a new state folder (UNLEARN_HOME) for a new model")
