"""The pipeline on the services a team runs (``stack/stack.py``): the MLflow tracking server
on PostgreSQL with artifacts on S3, the ledger in PostgreSQL, a DVC remote on S3, a Prefect
work pool with workers. Every command runs as a real process; slow (about 4 minutes)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from service_helpers import BIN, ROOT, ServiceHome

pytestmark = [pytest.mark.slow, pytest.mark.services]


def git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *args],
                   cwd=cwd, check=True, capture_output=True)


def dvc(h: ServiceHome, cwd: Path, *args: str) -> str:
    res = subprocess.run([str(BIN / "dvc"), *args], cwd=cwd, env=h.env,
                         capture_output=True, check=False,
                         text=True, timeout=300)
    assert res.returncode == 0, f"dvc {' '.join(args)}: {res.stderr.strip()[-1500:]}"
    return res.stdout


def registry_versions(h: ServiceHome) -> list[dict]:
    return h.json("releases")["versions"]


def released_once(h: ServiceHome) -> None:
    """Each done batch has exactly one passing version in the registry, the ledger names
    that version, and the champion alias is the ledger's last promotion."""
    versions = registry_versions(h)
    batches = h.ledger_rows("SELECT batch_id, state, version FROM batches ORDER BY seq")
    for batch_id, state, version in batches:
        assert state == "done", batches
        passing = [v["version"] for v in versions if v["lineage"].get("batch_id") == batch_id
                   and v["gates_passed"]]
        assert passing == [version], (batch_id, passing, version)
    champion = next(v["version"] for v in versions if "champion" in v["aliases"])
    (last,) = h.ledger_rows("SELECT version FROM promotions ORDER BY seq DESC LIMIT 1")
    assert last[0] == champion == max(v for _, _, v in batches)


def champion_over_http(h: ServiceHome, stack, version: int) -> None:
    """A plain MLflow client, HTTP only (no S3 credentials: the server serves the
    artifacts), loads the champion by alias and predicts digits."""
    plain = {k: v for k, v in os.environ.items()
             if not k.startswith(("AWS_", "UNLEARN_", "MLFLOW_S3"))}
    plain["MLFLOW_TRACKING_URI"] = stack.env["MLFLOW_TRACKING_URI"]
    code = textwrap.dedent(f"""
        import mlflow, mlflow.pytorch, torch
        from sklearn.datasets import load_digits
        model = mlflow.pytorch.load_model("models:/{h.model}@champion")
        d = load_digits()
        x = torch.tensor(d.images[-200:] / 16.0, dtype=torch.float32).unsqueeze(1)
        acc = (model(x).argmax(1).numpy() == d.target[-200:]).mean()
        v = mlflow.MlflowClient().get_model_version_by_alias("{h.model}", "champion")
        print(v.version, acc)
    """)
    res = subprocess.run([sys.executable, "-c", code], env=plain,
                         capture_output=True, check=False, text=True,
                         cwd="/", timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    got, acc = res.stdout.split()[-2:]
    assert got == str(version) and float(acc) > 0.8, res.stdout


def clone_reproduces(h: ServiceHome, stack, releases: int) -> None:
    """``data/`` pushed to the S3 remote; a fresh clone pulls it and ``unlearn verify --all``
    there (the registry and the ledger are the shared services) rebuilds every release."""
    remote = f"{stack.env['UNLEARN_DVC_REMOTE_URL']}/{h.home.name}"
    dvc(h, h.home, "remote", "add", "-d", "-f", "s3", remote)
    dvc(h, h.home, "remote", "modify", "s3", "endpointurl", stack.env["AWS_ENDPOINT_URL"])
    dvc(h, h.home, "push")
    git(h.home, "add", "-A")
    git(h.home, "commit", "-q", "-m", "state")
    clone = h.home.parent / f"{h.home.name}-clone"
    git(h.home.parent, "clone", "-q", str(h.home), str(clone))
    assert not (clone / "data").exists()
    dvc(h, clone, "pull", "data.dvc")  # (the dvc.yaml stages have not run: no outputs)
    assert (clone / "data" / "releases.json").is_file()
    res = h.unlearn("verify", "--all", UNLEARN_HOME=str(clone))
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"{releases} release(s) reproduced" in res.stdout, res.stdout


def test_pipeline_on_tracking_server_postgres_ledger_and_s3(service_home, stack):
    """Every command, as a real process, against the tracking server and the PostgreSQL
    ledger."""
    h = service_home("main")

    h.ok("pretrain")
    assert not (h.home / "mlruns").exists()  # nothing in the local store: all on the server
    assert not (h.home / "artifacts" / "ledger.db").exists()  # the ledger is PostgreSQL's
    h.ok("submit", str(h.manifest("b1", [("r1", 3), ("r2", 10)])))
    t0 = time.monotonic()
    out = h.ok("run")
    batch_s = time.monotonic() - t0
    assert "-> version 2" in out, out
    print(f"\none batch through the stack: `unlearn run` {batch_s:.1f} s")

    refused = h.unlearn("rollback")
    assert refused.returncode == 1 and "predates committed deletion" in refused.stderr
    # batch 1 replayed onto version 1: the champion moves and still holds every deletion
    assert champion_in(h.ok("rollback", "--to", "1", "--reapply")) >= 2
    h.ok("submit", str(h.manifest("b2", [("r3", 20), ("r4", 33)])))
    last = champion_in(h.ok("run"))
    assert f"champion: version {last}" in h.ok("promote", str(last))

    listing = h.json("releases")
    assert listing["champion"] == last
    assert [v["version"] for v in listing["versions"]] == list(range(1, last + 1))
    requests = h.json("requests")
    assert not requests["open"] and len(requests["requests"]) == 4
    h.ok("audit", "r1")
    h.ok("report", str(last), "--output", str(h.home / "last.html"))
    assert (h.home / "last.html").stat().st_size > 10_000
    assert f"{last} release(s) reproduced" in h.ok("verify", "--all")
    batches = h.ledger_rows("SELECT state FROM batches")
    assert batches == [("done",), ("done",)], batches
    (promoted,) = h.ledger_rows("SELECT version FROM promotions ORDER BY seq DESC LIMIT 1")
    assert promoted[0] == last  # the ledger and the champion alias agree

    # the PostgreSQL ledger lost: commands refuse until `unlearn repair` rebuilds it from the
    # registry and data/, with each batch's state and the champion's promotions
    import psycopg

    with psycopg.connect(h.env["UNLEARN_LEDGER_URL"], autocommit=True) as conn:
        conn.execute("DROP TABLE batches, requests, releases, promotions")
    refused = h.unlearn("run")
    assert refused.returncode == 1 and "unlearn repair" in refused.stderr, refused.stderr
    h.ok("repair")
    repaired = h.json("requests")
    assert not repaired["open"]
    assert sorted((r["request_id"], r["status"]) for r in repaired["requests"]) == sorted(
        (r["request_id"], r["status"]) for r in requests["requests"])
    assert h.ledger_rows("SELECT state FROM batches") == [("done",), ("done",)]
    assert h.json("releases")["champion"] == last
    h.ok("run")  # the pipeline accepts the rebuilt ledger


def champion_in(out: str) -> int:
    """The version a command's ``champion: version N`` line names."""
    found = re.findall(r"^champion: version (\d+)", out, re.MULTILINE)
    assert found, out
    return int(found[-1])


WORKER_ENV = {"PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_WORKER_PREFETCH_SECONDS": "2"}


def start_worker(h: ServiceHome, pool: str, name: str, folder: Path,
                 **extra: str) -> subprocess.Popen:
    """``prefect worker start`` in its own folder and session (a host of its own)."""
    folder.mkdir(parents=True, exist_ok=True)
    log = open(folder / "worker.log", "wb")  # noqa: SIM115
    env = {**h.env, **WORKER_ENV, "PREFECT_HOME": str(folder / ".prefect"), **extra}
    # --limit 1: one flow run at a time per worker (two hosts still race each other)
    proc = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", pool,
                             "--name", name, "--limit", "1"], cwd=folder, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    return proc


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_for(check, timeout: float, what: str, logs: list[Path]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(1)
    tails = "".join(f"\n--- {p} ---\n{p.read_text(errors='replace')[-3000:]}"
                    for p in logs if p.exists())
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{tails}")


def test_workers_release_each_batch_once_and_survive_a_killed_worker(service_home, stack,
                                                                    tmp_path):
    """An interval deployment on a process work pool; worker 1 takes the first run and dies
    (SIGKILL, with its flow run) while the batch is in MLflow; workers 2 and 3, in folders of
    their own, race on the same pending batches (extra runs started at once) and release
    each batch exactly once. Then a plain MLflow client loads the champion over HTTP, and a
    fresh clone that pulled data/ from the S3 remote reproduces every release."""
    h = service_home("workers", model="forget-classifier")  # the name consumers load
    git(h.home, "init", "-q")  # (a repository to clone, below)
    (h.home / ".gitignore").write_text("/artifacts/\n/*.csv\n")
    h.ok("pretrain")
    h.ok("submit", str(h.manifest("w1", [("w-r1", 5), ("w-r2", 12)])))
    h.ok("submit", str(h.manifest("w2", [("w-r3", 21), ("w-r4", 40)])))
    pool = "unlearning-test"
    deploy = textwrap.dedent(f"""
        import asyncio
        from prefect import flow
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import WorkPoolCreate

        async def pool():
            async with get_client() as client:
                await client.create_work_pool(WorkPoolCreate(name={pool!r}, type="process"))

        asyncio.run(pool())
        f = flow.from_source(source={str(ROOT)!r},
                             entrypoint="flows/pipeline.py:process_deletions_flow")
        print(f.deploy(name="every-5s", work_pool_name={pool!r}, interval=5,
                       parameters={{"home": {str(h.home)!r}}}, print_next_steps=False))
    """)
    res = subprocess.run([sys.executable, "-c", deploy], env=h.env,
                         capture_output=True, check=False,
                         text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]

    gate = tmp_path / "gate"
    gate.write_text("")
    w1 = start_worker(h, pool, "host-1", tmp_path / "host-1", UNLEARN_FAULT="after:start_run=wait",
                      UNLEARN_FAULT_GATE=str(gate))
    workers = [w1]
    logs = [tmp_path / f"host-{i}" / "worker.log" for i in (1, 2, 3)]
    try:
        reached = Path(f"{gate}.reached")
        wait_for(reached.exists, 240, "worker 1 to start a batch", logs)
        kill_group(w1)  # the host dies: the worker and its flow run
        try:  # (the flow run, wherever its process group)
            os.kill(int(reached.read_text()), signal.SIGKILL)
        except ProcessLookupError:
            pass
        time.sleep(1)
        states = h.ledger_rows("SELECT state FROM batches ORDER BY seq")
        assert states == [("pending",), ("pending",)], states
        gate.unlink()

        workers += [start_worker(h, pool, f"host-{i}", tmp_path / f"host-{i}") for i in (2, 3)]
        race = textwrap.dedent("""
            from prefect.deployments import run_deployment
            for _ in range(2):
                run_deployment("process-deletions/every-5s", timeout=0)
        """)
        res = subprocess.run([sys.executable, "-c", race], env=h.env,
                             capture_output=True, check=False,
                             text=True, timeout=300, cwd=tmp_path)
        assert res.returncode == 0, res.stderr[-2000:]

        def all_done() -> bool:
            return h.ledger_rows("SELECT count(*) FROM batches WHERE state='done'")[0][0] == 2

        wait_for(all_done, 420, "workers 2 and 3 to release both batches", logs)
    finally:
        for w in workers:
            kill_group(w, signal.SIGTERM)
    released_once(h)
    assert len(registry_versions(h)) == 3  # the killed run registered nothing
    champion_over_http(h, stack, 3)
    clone_reproduces(h, stack, 3)


def test_pipeline_lock_holds_across_hosts_without_a_shared_filesystem(stack, tmp_path,
                                                                       monkeypatch):
    """Two state folders (two hosts' disks: two lock files) on one PostgreSQL ledger: while
    one pipeline command holds the lock, the other is refused, and told who holds it; the
    lock goes with the holder's connection."""
    from tasks.locks import pipeline_lock, pipeline_lock_holder
    from tasks.paths import Paths

    monkeypatch.setenv("UNLEARN_LEDGER_URL", stack.database("ledger_lock"))
    host_a, host_b = Paths(tmp_path / "a"), Paths(tmp_path / "b")
    with pipeline_lock(host_a) as got_a:
        assert got_a
        with pipeline_lock(host_b) as got_b:
            assert not got_b
        assert pipeline_lock_holder(host_b).startswith(f"process {os.getpid()} on ")
    with pipeline_lock(host_b) as got_b:
        assert got_b
