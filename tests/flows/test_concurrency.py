"""Concurrency and idempotency, with real processes against one state folder.

- two ``unlearn run`` at once: the second is refused with one clear line naming the holder
  (exit 1, nothing changed) while the first finishes the batch;
- a run killed while holding the pipeline lock leaves no stale lock: ``flock`` locks die
  with their process, so the next run proceeds at once;
- concurrent ``unlearn submit`` clients with distinct manifests are all recorded, each
  exactly once (no lost request, no duplicate, distinct sequence numbers);
- the same manifest submitted by several clients at once becomes one batch; the others are
  told it is already submitted (exit 0, nothing recorded);
- a submit that finishes while a run reads the records is not taken for a lost ledger
  record: the run goes on and releases it;
- a run that lists the pending batches while a submit is between its ledger record and its
  manifest move waits for that submit instead of taking the manifest for missing.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flow_helpers import Home, cli, cli_json, pretrained_home

from tasks.locks import lock_is_held
from tasks.paths import Paths

pytestmark = pytest.mark.flow


@pytest.fixture(scope="module")
def home(tmp_path_factory, prefect_server, write_params):
    return pretrained_home(tmp_path_factory.mktemp("concurrency"), write_params, first_id=200)


def start(home: Home, *args: str, **extra_env: str) -> subprocess.Popen:
    """``unlearn ARGS`` in its own process, against the session's Prefect server."""
    exe = shutil.which("unlearn", path=os.path.dirname(sys.executable))
    env = {**os.environ, "UNLEARN_HOME": str(home.paths.home), "PREFECT_API_URL": home.api_url,
           "OMP_NUM_THREADS": "1", **extra_env}
    for key in ("UNLEARN_FAULT", "UNLEARN_FAULT_GATE"):
        if key not in extra_env:
            env.pop(key, None)
    return subprocess.Popen([exe, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} early: {proc.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.2)


def ledger_rows(paths: Paths) -> tuple[list[tuple], list[tuple]]:
    db = sqlite3.connect(paths.ledger)
    try:
        batches = db.execute("SELECT batch_id, seq, state, rows FROM batches ORDER BY seq")
        requests = db.execute("SELECT batch_id, request_id, instance_id FROM requests")
        return batches.fetchall(), requests.fetchall()
    finally:
        db.close()


def versions(paths: Paths) -> list[int]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=paths.default_tracking_uri,
                          registry_uri=paths.default_tracking_uri)
    return sorted(int(v.version) for v in client.search_model_versions(
        "name = 'forget-classifier'"))


def test_a_second_run_is_refused_while_the_first_holds_the_lock(home, tmp_path, monkeypatch):
    monkeypatch.setenv("UNLEARN_HOME", str(home.paths.home))
    rc, out, err = cli("submit", str(home.manifest()))
    assert rc == 0, err
    batch_id = out.split(":")[0]
    before = versions(home.paths)
    gate = tmp_path / "gate"
    gate.touch()
    first = start(home, "run", UNLEARN_FAULT="after:lock=wait", UNLEARN_FAULT_GATE=str(gate))
    try:
        wait_for(Path(f"{gate}.reached"), first)  # it holds the lock now, and waits
        assert lock_is_held(home.paths.lock)
        rc, out, err = finish(start(home, "run"))
        assert rc == 1, out + err
        errors = [line for line in err.splitlines() if line.startswith("unlearn run: ")]
        assert errors == [(
            f"unlearn run: failed: another pipeline command is running (process {first.pid} "
            f"holds {home.paths.lock}); nothing was changed: try again when it has finished")]
        assert "Traceback" not in err
        assert versions(home.paths) == before  # the refused run changed nothing
    finally:
        gate.unlink(missing_ok=True)
    rc, out, err = finish(first)
    assert rc == 0, out + err
    assert f"{batch_id}: done -> version" in out
    assert versions(home.paths) == before + [before[-1] + 1]
    assert not lock_is_held(home.paths.lock)


def test_a_killed_lock_holder_leaves_no_stale_lock(home, monkeypatch):
    monkeypatch.setenv("UNLEARN_HOME", str(home.paths.home))
    rc, out, err = cli("submit", str(home.manifest()))
    assert rc == 0, err
    batch_id = out.split(":")[0]
    rc, _, err = finish(start(home, "run", UNLEARN_FAULT="after:lock"))
    assert rc == -signal.SIGKILL, err[-3000:]
    assert home.paths.lock.exists()  # the file stays (it names the dead holder) ...
    assert not lock_is_held(home.paths.lock)  # ... but the kernel released the lock
    started = time.monotonic()
    rc, result = cli_json("run")
    assert rc == 0 and result["status"] == "ok", result
    assert [b["batch_id"] for b in result["batches"]] == [batch_id]
    assert time.monotonic() - started < 300  # proceeded, no waiting for a lock timeout


def test_a_submit_during_the_state_check_is_not_a_lost_record(home, tmp_path, monkeypatch):
    """A watcher checks the records while requests keep arriving: a batch accepted between
    the check's reads of data/deletions/ and of the ledger must not read as a manifest the
    ledger lost (that ended ``run --watch`` with "run `unlearn repair`")."""
    monkeypatch.setenv("UNLEARN_HOME", str(home.paths.home))
    rc, out, err = cli("submit", str(home.manifest(2, tag="before-check")))
    assert rc == 0, err
    first_id = out.split(":")[0]
    gate = tmp_path / "gate"
    gate.touch()
    run = start(home, "run", UNLEARN_FAULT="in:read_stores=wait", UNLEARN_FAULT_GATE=str(gate))
    try:
        wait_for(Path(f"{gate}.reached"), run)  # one record read, the other not yet
        rc, out, err = finish(start(home, "submit", str(home.manifest(2, tag="during-check"))))
        assert rc == 0, out + err
        second_id = out.split(":")[0]
        assert home.paths.manifest(second_id).is_file()
    finally:
        gate.unlink(missing_ok=True)
    rc, out, err = finish(run)
    assert rc == 0, out + err[-3000:]
    assert "unlearn repair" not in err
    assert f"{first_id}: done -> version" in out
    assert f"{second_id}: done -> version" in out  # read from the ledger after the wait


def test_a_submit_between_its_record_and_its_manifest_move_waits_for_the_run(home, tmp_path):
    """A run lists the pending batches while a submit has recorded its batch and not yet moved
    the manifest into data/deletions/: the run waits for the submit (the submit lock) instead
    of failing on a manifest it takes for missing, then releases both batches."""
    rc, out, err = finish(start(home, "submit", str(home.manifest(2, tag="before-list"))))
    assert rc == 0, out + err
    first_id = out.split(":")[0]
    run_gate, submit_gate = tmp_path / "run-gate", tmp_path / "submit-gate"
    run_gate.touch()
    submit_gate.touch()
    run = start(home, "run", UNLEARN_FAULT="before:list_pending=wait",
                UNLEARN_FAULT_GATE=str(run_gate))
    submit = None
    try:
        wait_for(Path(f"{run_gate}.reached"), run)  # the records checked, nothing listed
        submit = start(home, "submit", str(home.manifest(2, tag="during-list")),
                       UNLEARN_FAULT="after:record_submit=wait",
                       UNLEARN_FAULT_GATE=str(submit_gate))
        wait_for(Path(f"{submit_gate}.reached"), submit)  # recorded, manifest still staged
        run_gate.unlink()
        time.sleep(5)  # the run lists now: it must wait for the submit, not fail
        assert run.poll() is None, finish(run)
    finally:
        run_gate.unlink(missing_ok=True)
        submit_gate.unlink(missing_ok=True)
    rc, out, err = finish(submit)
    assert rc == 0, out + err
    second_id = out.split(":")[0]
    rc, out, err = finish(run)
    assert rc == 0, out + err[-3000:]
    assert f"{first_id}: done -> version" in out
    assert f"{second_id}: done -> version" in out


@pytest.mark.parametrize("clients", [
    pytest.param(4, id="4-clients"),
    # 10 processes on 2 cores still race for the ledger; each costs ~10 s of CPU (a whole
    # `unlearn` start), so 20 took 3+ minutes of CI
    pytest.param(10, id="10-clients", marks=pytest.mark.slow),
])
def test_concurrent_submits_are_each_recorded_exactly_once(home, clients):
    batches0, requests0 = ledger_rows(home.paths)
    manifests = [home.manifest(3, tag=f"s{clients}x{i}") for i in range(clients)]
    procs = [start(home, "submit", str(m)) for m in manifests]
    results = [finish(p) for p in procs]
    for (rc, out, err), m in zip(results, manifests):
        assert rc == 0, f"{m.name}: {out}{err[-3000:]}"
        assert "accepted, 3 request(s) pending" in out
        assert "Traceback" not in err
    batches, requests = ledger_rows(home.paths)
    new = [b for b in batches if b not in batches0]
    assert len(new) == clients and all(b[2] == "pending" for b in new)
    assert len({b[1] for b in batches}) == len(batches)  # distinct sequence numbers
    want = sorted(line.split(",")[0] for m in manifests
                  for line in m.read_text().splitlines()[1:])
    got = sorted(r[1] for r in requests if r not in requests0)
    assert got == want  # every request exactly once: none lost, none doubled
    ids = {out.split(":")[0] for _, out, _ in results}
    assert ids == {b[0] for b in new}
    for batch_id in ids:  # each accepted manifest is in data/ for the pipeline and DVC
        assert home.paths.manifest(batch_id).is_file()


def test_the_same_manifest_submitted_at_once_is_one_batch(home):
    batches0, _ = ledger_rows(home.paths)
    manifest = home.manifest(2, tag="same")
    procs = [start(home, "submit", str(manifest)) for _ in range(3)]
    results = [finish(p) for p in procs]
    assert [r[0] for r in results] == [0, 0, 0], [r[2][-2000:] for r in results]
    outs = sorted(r[1].strip() for r in results)
    accepted = [o for o in outs if "accepted" in o]
    again = [o for o in outs if "already submitted (pending, 2 request(s)); nothing recorded"
             in o]
    assert len(accepted) == 1 and len(again) == 2, outs
    batch_id = accepted[0].split(":")[0]
    assert all(o.startswith(f"{batch_id}: ") for o in again)
    batches, _ = ledger_rows(home.paths)
    assert [b[0] for b in batches if b not in batches0] == [batch_id]
