"""Crash safety with fault injection: a real ``unlearn run`` process is SIGKILLed at each
step of a batch (``UNLEARN_FAULT``, tasks/faults.py), then the next ``unlearn run`` must
finish the batch: never lost, never half-applied, never registered twice.

After each kill: the batch is pending (nothing the ledger calls done is missing from the
champion), at most one model version exists for it, and the champion is either the old
version or that one. After the resume: the batch is done with that one version, which is
champion, recorded in the ledger (release, promotion) and in data/releases.json, with no
``candidate`` alias left behind and no MLflow run of the batch left RUNNING.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from flow_helpers import Home, cli, cli_json, pretrained_home

from tasks.paths import Paths

pytestmark = pytest.mark.flow

# (fault point, a version exists after the kill, the champion alias moved to it)
POINTS = [
    ("in:unlearn", False, False),
    ("after:start_run", False, False),
    ("after:register_version", True, False),
    ("after:record_release", True, False),
    ("after:candidate_alias", True, False),
    ("after:champion_alias", True, True),
    ("in:record_batch", True, True),
]
FAST = "after:register_version"  # the duplicate-version case: runs in the default suite


@pytest.fixture(scope="module")
def home(tmp_path_factory, prefect_server, write_params):
    """Version 1 in a fresh state folder; each test submits its own batch on top."""
    return pretrained_home(tmp_path_factory.mktemp("crash"), write_params, first_id=100)


def unlearn(home: Home, *args: str, fault: str | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """The console script in its own process, against the session's Prefect server."""
    exe = shutil.which("unlearn", path=os.path.dirname(sys.executable))
    env = {**os.environ, "UNLEARN_HOME": str(home.paths.home), "PREFECT_API_URL": home.api_url,
           "OMP_NUM_THREADS": "1"}
    env.pop("UNLEARN_FAULT", None)
    if fault:
        env["UNLEARN_FAULT"] = fault
    return subprocess.run([exe, *args], capture_output=True, text=True, env=env,
                          timeout=timeout, check=False)


def registry(paths: Paths) -> tuple[dict[int, dict[str, str]], dict[str, int]]:
    """Every version's tags, and the aliases."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=paths.default_tracking_uri,
                          registry_uri=paths.default_tracking_uri)
    versions = {int(v.version): dict(v.tags)
                for v in client.search_model_versions("name = 'forget-classifier'")}
    aliases = {a: int(v) for a, v in client.get_registered_model("forget-classifier")
               .aliases.items()}
    return versions, aliases


def ledger_batch(paths: Paths, batch_id: str) -> tuple[str, int | None]:
    db = sqlite3.connect(paths.ledger)
    try:
        state, version = db.execute("SELECT state, version FROM batches WHERE batch_id=?",
                                    (batch_id,)).fetchone()
        return state, version
    finally:
        db.close()


def running_runs(paths: Paths, batch_id: str) -> list[str]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=paths.default_tracking_uri)
    exp = client.get_experiment_by_name("unlearning")
    return [r.info.run_id for r in client.search_runs(
        [exp.experiment_id], f"tags.batch_id = '{batch_id}' and attributes.status = 'RUNNING'")]


def kill_and_resume(home: Home, point: str, registered: bool, champion_moved: bool,
                    monkeypatch) -> dict:
    paths = home.paths
    monkeypatch.setenv("UNLEARN_HOME", str(paths.home))
    rc, out, err = cli("submit", str(home.manifest()))
    assert rc == 0, err
    batch_id = out.split(":")[0]
    versions0, aliases0 = registry(paths)
    old_champion = aliases0["champion"]

    killed = unlearn(home, "run", fault=point)
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-3000:])

    # after the kill: pending, at most one version for the batch, champion old or new
    state, _ = ledger_batch(paths, batch_id)
    assert state == "pending", f"{point}: the batch is {state} after the kill"
    versions1, aliases1 = registry(paths)
    mine = [v for v, tags in versions1.items() if tags.get("batch_id") == batch_id]
    assert len(mine) == (1 if registered else 0), (point, mine)
    assert len(versions1) == len(versions0) + len(mine)
    expected_champion = mine[0] if champion_moved else old_champion
    assert aliases1["champion"] == expected_champion, (point, aliases1)

    # the next run finishes it, without a second version
    rc, result = cli_json("run")
    assert rc == 0 and result["status"] == "ok", result
    versions2, aliases2 = registry(paths)
    mine2 = [v for v, tags in versions2.items() if tags.get("batch_id") == batch_id]
    assert len(mine2) == 1, f"{point}: versions {mine2} for one batch"
    version = mine2[0]
    if registered:
        assert mine2 == mine  # the interrupted run's version was adopted, not re-registered
        assert len(versions2) == len(versions1)
    else:
        assert len(versions2) == len(versions0) + 1
    state, done_version = ledger_batch(paths, batch_id)
    assert (state, done_version) == ("done", version)
    assert aliases2 == {"champion": version}, aliases2  # no stale candidate alias
    assert versions2[version]["parent_version"] == str(old_champion)
    assert versions2[version]["gates_passed"] == "true"
    if champion_moved:
        assert result["reconciled"] == [batch_id] and result["batches"] == []
    else:
        (applied,) = result["batches"]
        assert applied["batch_id"] == batch_id and applied["version"] == version
        assert applied["resumed"] is registered
    _, listing = cli_json("releases")
    assert listing["promotions"][-1]["version"] == version
    order = json.loads((paths.data / "releases.json").read_text())
    assert version in [r["version"] for r in (order["releases"] if isinstance(order, dict)
                                              else order)]
    assert running_runs(paths, batch_id) == []
    return {"batch_id": batch_id, "version": version}


@pytest.mark.parametrize("point, registered, champion_moved", [
    pytest.param(*p, id=p[0], marks=() if p[0] == FAST else pytest.mark.slow) for p in POINTS])
def test_kill_at_each_step_then_resume(home, point, registered, champion_moved, monkeypatch):
    kill_and_resume(home, point, registered, champion_moved, monkeypatch)


@pytest.mark.slow
def test_every_release_still_rebuilds_after_the_crashes(home, monkeypatch):
    """Runs after the kills: the releases they left behind carry intact lineage (verify
    rebuilds the latest from its parent's weights and its manifest, bit for bit)."""
    monkeypatch.setenv("UNLEARN_HOME", str(home.paths.home))
    rc, out, err = cli("verify")
    assert rc == 0, out + err


def _servers_of(home: Path) -> list[int]:
    """Live Prefect server processes started for the state folder ``home``."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes()
            env = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if b"uvicorn" in cmd and f"UNLEARN_HOME={home}".encode() in env:
            found.append(int(proc.name))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_killed_run_leaves_no_prefect_server_behind(tmp_path, write_params):
    """Without PREFECT_API_URL, ``unlearn`` starts Prefect's temporary server; SIGKILLed,
    it must not leave that server running (it used to: an orphan uvicorn per crash)."""
    import time

    write_params(tmp_path)
    exe = shutil.which("unlearn", path=os.path.dirname(sys.executable))
    env = {**os.environ, "UNLEARN_HOME": str(tmp_path), "UNLEARN_FAULT": "after:lock",
           "PREFECT_HOME": str(tmp_path / ".prefect"), "OMP_NUM_THREADS": "1"}
    env.pop("PREFECT_API_URL", None)
    log = tmp_path / "run.log"  # a file, not a pipe: an orphan would hold a pipe open
    with open(log, "w") as out:
        done = subprocess.run([exe, "run"], stdout=out, stderr=subprocess.STDOUT, env=env,
                              timeout=600, check=False)
    assert done.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    deadline = time.monotonic() + 30
    while (left := _servers_of(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in left:  # do not leak them past this test either way
        os.kill(pid, signal.SIGKILL)
    assert not left, f"orphaned Prefect server process(es) {left}"


def _ledger_batches(paths: Paths) -> dict[str, str]:
    db = sqlite3.connect(paths.ledger)
    try:
        return dict(db.execute("SELECT batch_id, state FROM batches").fetchall())
    finally:
        db.close()


def _tracked_deletions(paths: Paths) -> set[str]:
    """Batch ids whose manifest data.dvc records (DVC's listing of data/)."""
    from tasks.datastore import data_listing
    from tasks.release import data_rev

    listing = data_listing(paths, data_rev(paths.home)) or {}
    return {Path(rel).stem for rel in listing if rel.startswith("deletions/")}


def test_a_submit_killed_before_the_ledger_write_is_healed_by_its_retry(home, monkeypatch):
    """Killed after staging the accepted manifest but before the ledger row: the client got
    no answer, nothing is pending, and nothing the ledger does not know is in data/ (where
    DVC would track it); its retry records the batch once, under the same id."""
    paths = home.paths
    manifest = home.manifest()
    killed = unlearn(home, "submit", str(manifest), fault="after:write_manifest")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    known = _ledger_batches(paths)
    assert {p.stem for p in paths.deletions.glob("*.csv")} <= set(known)  # no orphan in data/
    (staged,) = [p.stem for p in (paths.artifacts / "incoming").glob("*.csv")]
    assert staged not in known
    monkeypatch.setenv("UNLEARN_HOME", str(paths.home))
    rc, out, err = cli("submit", str(manifest))
    assert rc == 0, err
    assert out.split(":")[0] == staged  # same sequence number, same digest, same id
    assert list((paths.artifacts / "incoming").glob("*.csv")) == []
    rc, out, err = cli("submit", str(manifest))
    assert rc == 0 and "already submitted" in out
    rc, listing = cli_json("requests")
    assert [b["batch_id"] for b in listing["batches"]].count(staged) == 1
    assert staged in _tracked_deletions(paths)
    assert rc == 0 and cli("run")[0] == 0  # and the module's state stays usable


def test_a_submit_killed_after_the_ledger_write_is_finished_by_the_next_command(home,
                                                                                monkeypatch):
    """Killed after the ledger accepted the batch, before its manifest reached data/: the
    next command moves it there (and into data.dvc); a retry is "already submitted", the
    next batch takes the next sequence number, and the batch runs."""
    paths = home.paths
    manifest = home.manifest()
    killed = unlearn(home, "submit", str(manifest), fault="after:record_submit")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    pending = [b for b, state in _ledger_batches(paths).items() if state == "pending"]
    assert len(pending) == 1
    (batch_id,) = pending
    assert not paths.manifest(batch_id).exists()
    monkeypatch.setenv("UNLEARN_HOME", str(paths.home))
    rc, _ = cli_json("requests")  # any command that reads the state finishes it
    assert rc == 0 and paths.manifest(batch_id).is_file()
    assert batch_id in _tracked_deletions(paths)
    assert list((paths.artifacts / "incoming").glob("*.csv")) == []
    rc, out, err = cli("submit", str(manifest))
    assert rc == 0 and out.startswith(f"{batch_id}: already submitted"), out + err
    rc, out, err = cli("submit", str(home.manifest()))
    assert rc == 0, err
    seqs = sorted(int(b[1:5]) for b in _ledger_batches(paths))
    assert len(seqs) == len(set(seqs)) and out.startswith(f"b{seqs[-1]:04d}-")
    rc, result = cli_json("run")
    assert rc == 0 and batch_id in [b["batch_id"] for b in result["batches"]], result


@pytest.mark.parametrize("point, retry", [
    pytest.param("after:register_version", ("--to", "TARGET", "--reapply"),
                 id="after:register_version"),
    pytest.param("after:champion_alias", ("--reapply",), id="after:champion_alias",
                 marks=pytest.mark.slow),
])
def test_a_killed_rollback_reapply_resumes_without_a_second_version(home, point, retry,
                                                                    monkeypatch):
    """``rollback --to T --reapply`` killed after registering the replayed version (or after
    moving the champion to it): retried (for the second, without --to: the interrupted
    rollback is what it finishes), it ends with that one version, never a copy."""
    paths = home.paths
    monkeypatch.setenv("UNLEARN_HOME", str(paths.home))
    target = registry(paths)[1]["champion"]  # it will lack the two batches committed next
    for _ in range(2):  # (one missing batch replayed onto it would be the release itself)
        rc, out, err = cli("submit", str(home.manifest()))
        assert rc == 0, err
    assert cli("run")[0] == 0
    versions0, aliases0 = registry(paths)
    champion = aliases0["champion"]
    assert champion != target
    retry = tuple(str(target) if a == "TARGET" else a for a in retry)
    killed = unlearn(home, "rollback", "--to", str(target), "--reapply", fault=point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    versions1, aliases1 = registry(paths)
    new = sorted(set(versions1) - set(versions0))
    assert len(new) == 1 and versions1[new[0]]["parent_version"] == str(target), new
    assert aliases1["champion"] == (new[0] if point == "after:champion_alias" else champion)

    rc, out, err = cli("rollback", *retry)
    assert rc == 0, out + err
    versions2, aliases2 = registry(paths)
    assert sorted(versions2) == sorted(versions1), "the retry registered another version"
    assert aliases2 == {"champion": new[0]}, aliases2
    _, listing = cli_json("releases")
    last = listing["promotions"][-1]
    assert (last["version"], last["previous"], last["action"]) == \
        (new[0], champion, "rollback-reapply")
    assert not (paths.artifacts / "rollback.json").exists()
    assert running_runs(paths, versions2[new[0]]["batch_id"]) == []
    rc, out, err = cli("rollback", "--to", str(target), "--reapply")  # again: nothing new
    assert rc == 0 and sorted(registry(paths)[0]) == sorted(versions1), out + err
