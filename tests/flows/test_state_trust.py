"""Trustworthy state: committed deletions live in three records (the ledger, the registry's
lineage tags, ``data/`` under DVC), every command checks that they agree, and a damaged or
lost one stops new deletions, promotions and base models until ``unlearn repair`` rebuilds
it; the served MLflow model is checked against the hash recorded when it was registered.

One release state is built per module (version 1, version 2 applying one mixed batch, a
rejected batch and a pending one) and backed up; each row of the table damages one store,
checks the one-line message and the exit code of every command that would change the
state, that nothing changed, and, where a repair exists, that after it the ledger lists what
it listed before, ``unlearn verify --all`` passes and every earlier request's audit passes.
Then the state is restored from the backup for the next row.
"""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from flow_helpers import cli, cli_json
from release_state import MISCLASSIFY_IDS, build_release_state

from tasks.paths import Paths

pytestmark = pytest.mark.flow

ERROR = re.compile(r"^unlearn [a-z]+: (failed|error): ")
PENDING_IDS = (21, 22)


# -- the state --------------------------------------------------------------------------------


@dataclass
class State:
    paths: Paths
    backup: Path
    inputs: Path
    done: str                   # the done batch (version 2)
    pending: str                # the pending batch
    requests: dict[str, Any]    # `unlearn requests --json` before any damage
    releases: dict[str, Any]    # `unlearn releases --json` before any damage
    counter: list[int]

    def restore(self) -> None:
        """Put the whole state folder back as it was built (absolute paths stay valid)."""
        shutil.rmtree(self.paths.home)
        shutil.copytree(self.backup, self.paths.home, symlinks=True)

    def manifest(self, text: str) -> str:
        self.counter[0] += 1
        path = self.inputs / f"{self.counter[0]:03d}.csv"
        path.write_text("request_id,instance_id,objective,new_label\n" + text)
        return str(path)


@pytest.fixture(scope="module")
def state(tmp_path_factory, prefect_server, write_params):
    root = tmp_path_factory.mktemp("trust-home")
    inputs = tmp_path_factory.mktemp("trust-inputs")
    write_params(root, pretrain={"epochs": 4})  # what build_release_state trains: verify rebuilds it
    with pytest.MonkeyPatch.context() as mp:
        # every MLflow call opens the database afresh: the tests delete and restore it
        mp.setenv("MLFLOW_SQLALCHEMYSTORE_POOLCLASS", "NullPool")
        mp.setenv("UNLEARN_HOME", str(root))
        build_release_state(root)
        counter = [0]
        st = State(Paths(root), tmp_path_factory.mktemp("trust-backup") / "home", inputs,
                   "", "", {}, {}, counter)
        rc, out, err = cli("submit", st.manifest("bad-1,999999,misclassify,\n"))
        assert rc == 1, out + err  # rejected by validation: kept in the ledger
        rc, out, err = cli("submit", st.manifest(
            "".join(f"p-{i},{i},misclassify,\n" for i in PENDING_IDS)))
        assert rc == 0, out + err
        st.pending = out.split(":")[0]
        rc, st.requests = cli_json("requests")
        rc2, st.releases = cli_json("releases")
        assert rc == rc2 == 0
        done = [b for b in st.requests["batches"] if b["state"] == "done"]
        assert len(done) == 1 and st.releases["champion"] == 2, st.requests
        st.done = done[0]["batch_id"]
        shutil.copytree(root, st.backup, symlinks=True)
        yield st


@pytest.fixture
def clean(state, monkeypatch):
    monkeypatch.setenv("MLFLOW_SQLALCHEMYSTORE_POOLCLASS", "NullPool")
    monkeypatch.setenv("UNLEARN_HOME", str(state.paths.home))
    state.restore()
    yield state
    state.restore()


# -- snapshots that never open MLflow (it would create a missing database) --------------------


def _rows(path: Path, tables: tuple[str, ...]) -> dict[str, Any]:
    if not path.exists():
        return {"missing": True}
    if path.stat().st_size == 0:
        return {"empty": True}
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return {t: sorted(db.execute(f"SELECT * FROM {t}").fetchall(), key=repr)
                    for t in tables}
        finally:
            db.close()
    except sqlite3.DatabaseError:
        return {"bytes": path.read_bytes()[:64].hex()}


def snapshot(paths: Paths) -> dict[str, Any]:
    data = {str(p.relative_to(paths.data)): p.read_bytes() for p in sorted(paths.data.rglob("*"))
            if p.is_file()}
    return {
        "ledger": _rows(paths.ledger, ("batches", "requests", "releases", "promotions")),
        "registry": _rows(paths.mlruns / "mlflow.db", (
            "model_versions", "model_version_tags", "registered_model_aliases")),
        "data": data,
        "models": sorted(p.name for p in (paths.mlruns / "artifacts" / "models").glob("m-*")),
    }


def one_error(err: str) -> str:
    lines = [line for line in err.splitlines() if ERROR.match(line)]
    assert len(lines) == 1, err
    return lines[0]


# -- damage, one store at a time --------------------------------------------------------------


def _drop_ledger_sidecars(paths: Paths) -> None:
    for side in (Path(f"{paths.ledger}-wal"), Path(f"{paths.ledger}-shm")):
        side.unlink(missing_ok=True)


def ledger_deleted(st: State) -> None:
    _drop_ledger_sidecars(st.paths)
    st.paths.ledger.unlink()


def ledger_emptied(st: State) -> None:
    _drop_ledger_sidecars(st.paths)
    st.paths.ledger.write_bytes(b"")


def ledger_garbage(st: State) -> None:
    _drop_ledger_sidecars(st.paths)
    st.paths.ledger.write_bytes(b"SQLite format 3\x00" + os.urandom(4096))


def ledger_row_removed(st: State) -> None:
    db = sqlite3.connect(st.paths.ledger)
    try:
        db.execute("DELETE FROM requests WHERE batch_id=? AND row=1", (st.done,))
        db.commit()
    finally:
        db.close()


def registry_deleted(st: State) -> None:
    (st.paths.mlruns / "mlflow.db").unlink()


def _registry_sql(st: State, sql: str, args: tuple) -> None:
    db = sqlite3.connect(st.paths.mlruns / "mlflow.db")
    try:
        assert db.execute(sql, args).rowcount == 1
        db.commit()
    finally:
        db.close()


def registry_tags_edited(st: State) -> None:
    """The champion's lineage rewritten: version 2 claims to apply no batch."""
    _registry_sql(st, "UPDATE model_version_tags SET value='none' WHERE version=2 "
                      "AND key='batch_id'", ())


def registry_alias_moved(st: State) -> None:
    """The champion alias pointed back at version 1 by hand (outside the pipeline)."""
    _registry_sql(st, "UPDATE registered_model_aliases SET version=1 WHERE alias='champion'", ())


def data_file_removed(st: State) -> None:
    st.paths.manifest(st.done).unlink()


def data_file_edited(st: State) -> None:
    path = st.paths.manifest(st.done)
    path.write_text(path.read_text().replace(f",{MISCLASSIFY_IDS[0]},", ",12,"))


def served_byte_flipped(st: State) -> None:
    """One byte of the champion's logged MLflow model (what load_model reads) flipped."""
    sources = _rows(st.paths.mlruns / "mlflow.db", ("model_versions",))["model_versions"]
    db = sqlite3.connect(f"file:{st.paths.mlruns / 'mlflow.db'}?mode=ro", uri=True)
    try:
        (source,) = db.execute("SELECT source FROM model_versions WHERE version=2").fetchone()
    finally:
        db.close()
    assert sources and source.startswith("models:/m-")
    target = st.paths.mlruns / "artifacts" / "models" / source.split("/")[-1] / "artifacts" \
        / "data" / "model.pt2"
    blob = bytearray(target.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    target.write_bytes(bytes(blob))


@dataclass
class Case:
    id: str
    damage: Callable[[State], None]
    message: str          # regex in the one-line error
    repairable: bool


CASES = [
    Case("ledger-deleted", ledger_deleted, r"the ledger artifacts/ledger\.db is missing", True),
    Case("ledger-emptied", ledger_emptied, r"the ledger artifacts/ledger\.db is empty", True),
    Case("ledger-garbage", ledger_garbage, r"damaged or not a ledger.*unlearn repair", True),
    Case("ledger-row-removed", ledger_row_removed,
         r"the ledger lists 5 of the 6 requests of batch b0001-\w+", True),
    Case("registry-deleted", registry_deleted, r"the registry mlruns/mlflow\.db is missing",
         False),
    Case("registry-tags-edited", registry_tags_edited,
         r"lineage tags of version 2 \(parent 1, batches none\) disagree with the ledger", True),
    Case("registry-alias-moved", registry_alias_moved,
         r"the champion alias points at version 1, which lacks committed deletion batch",
         True),
    Case("data-file-removed", data_file_removed,
         r"manifest of done batch b0001-\w+ \(data/deletions/b0001-\w+\.csv\) is missing",
         True),
    Case("data-file-edited", data_file_edited,
         r"manifest of done batch b0001-\w+ \(data/deletions/b0001-\w+\.csv\) changed since "
         r"it was accepted", True),
    Case("served-byte-flipped", served_byte_flipped,
         r"the served model of version 2 .*changed since it was registered: data/model\.pt2",
         False),
]


def _requests_view(listing: dict[str, Any]) -> tuple[list, list]:
    batches = [(b["batch_id"], b["seq"], b["state"], b["rows"], b["version"])
               for b in listing["batches"]]
    requests = [(r["batch_id"], r["row"], r["request_id"], r["instance_id"], r["objective"],
                 r["new_label"], r["state"]) for r in listing["requests"]]
    return batches, requests


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_damaged_store_stops_changes_until_repaired(case: Case, clean: State):
    st = clean
    case.damage(st)
    before = snapshot(st.paths)

    # the commands that would change the state refuse, on one line, exit 1
    attempts = [
        ["submit", st.manifest("n-40,40,misclassify,\n")],  # a new deletion
        ["submit", st.manifest(f"again-{MISCLASSIFY_IDS[0]},{MISCLASSIFY_IDS[0]},"
                               "misclassify,\n")],         # an instance deleted earlier
        ["promote", "1"], ["rollback"], ["run"], ["pretrain", "--epochs", "1"],
    ]
    if case.id != "served-byte-flipped":  # the cheap check: the listings say so too
        attempts += [["requests"], ["audit", f"erase-{MISCLASSIFY_IDS[0]}"]]
    for argv in attempts:
        rc, out, err = cli(*argv)
        line = one_error(err)
        assert rc == 1 and re.search(case.message, line), (argv, rc, out, err)
        assert "Traceback" not in out + err
    assert snapshot(st.paths) == before, "a refused command changed the state"

    if case.id == "served-byte-flipped":  # verify and audit look at what is served
        rc, out, err = cli("verify", "2")
        assert rc == 1 and "data/model.pt2" in one_error(err), out + err
        rc, out, err = cli("audit", f"erase-{MISCLASSIFY_IDS[0]}")
        assert rc == 1 and re.search(case.message, one_error(err)), out + err
        from tasks.served import ServedModelError, check_served_model

        uri = f"sqlite:///{st.paths.mlruns / 'mlflow.db'}"
        with pytest.raises(ServedModelError, match=r"data/model\.pt2"):
            check_served_model("models:/forget-classifier@champion", tracking_uri=uri)

    rc, out, err = cli("repair")
    if not case.repairable:
        assert rc == 1 and re.search(case.message, one_error(err)), out + err
        assert snapshot(st.paths) == before, "a refused repair changed the state"
        return
    assert rc == 0, out + err
    assert "restored" in out
    rc, report = cli_json("repair")  # nothing left to do
    assert rc == 0 and report["status"] == "ok" and report["restored"] == [], report

    # the three records agree again, and say what they said before the damage
    rc, listing = cli_json("requests")
    assert rc == 0 and _requests_view(listing) == _requests_view(st.requests)
    rc, releases = cli_json("releases")
    assert rc == 0 and releases["champion"] == st.releases["champion"]
    assert [(v["version"], v["lineage"]) for v in releases["versions"]] == \
        [(v["version"], v["lineage"]) for v in st.releases["versions"]]
    rc, out, err = cli("verify", "--all")
    assert rc == 0, out + err
    for r in st.requests["requests"]:
        rc, out, err = cli("audit", r["request_id"])
        assert rc == 0, (r["request_id"], out, err)
    # and an instance deleted earlier is not accepted as new
    rc, out, err = cli("submit", st.manifest(
        f"again-{MISCLASSIFY_IDS[0]},{MISCLASSIFY_IDS[0]},misclassify,\n"))
    assert rc == 1 and "not_already_deleted" in one_error(err), out + err


def test_repair_json_names_what_it_restored(clean: State):
    ledger_deleted(clean)
    rc, report = cli_json("repair")
    assert rc == 0 and report["status"] == "ok", report
    assert report["problems_before"] and not report["problems_after"]
    restored = " ".join(report["restored"])
    assert clean.done in restored and clean.pending in restored
    assert "release" in restored and "promotion" in restored


def test_a_consistent_state_has_nothing_to_repair(clean: State):
    rc, out, err = cli("repair")
    assert rc == 0 and "nothing to repair" in out, out + err
    rc, out, err = cli("requests")
    assert rc == 0 and err == "", err


def test_pretrain_refuses_on_a_state_with_committed_deletions(clean: State):
    before = snapshot(clean.paths)
    rc, _, err = cli("pretrain", "--epochs", "1")
    line = one_error(err)
    assert rc == 1 and "committed deletion" in line and "contain" in line, err
    assert snapshot(clean.paths) == before


def test_new_base_refusal_is_shared(clean: State):
    """The check pretrain uses, for `adopt` and any other way of registering a new base."""
    from tasks.params import load_params
    from tasks.state_check import new_base_refusal

    cfg = load_params(clean.paths.params_file)
    why = new_base_refusal(clean.paths, cfg, "adopt")
    assert why and "adopt" in why and clean.done in why
    registry_deleted(clean)
    why = new_base_refusal(clean.paths, cfg, "adopt")
    assert why and "mlruns/mlflow.db is missing" in why


def test_served_model_hash_is_recorded_and_checked(clean: State):
    from tasks.served import check_served_model

    uri = f"sqlite:///{clean.paths.mlruns / 'mlflow.db'}"
    ok = check_served_model("models:/forget-classifier@champion", tracking_uri=uri)
    assert ok["version"] == 2 and re.fullmatch(r"[0-9a-f]{64}", ok["served_sha256"])
    assert "data/model.pt2" in ok["files"]
    _, releases = cli_json("releases")
    assert all(v["lineage"].get("served_sha256") for v in releases["versions"])
    rc, result = cli_json("verify", "--all")
    assert rc == 0 and all(r["served"]["ok"] for r in result["releases"]), result
