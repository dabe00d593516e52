"""Services going away in the middle of a run: the MLflow tracking server, then PostgreSQL
(the ledger's and the tracking server's database), each killed (SIGKILL) while ``unlearn
run`` holds a batch in MLflow, then restarted. The run fails on one line, the batch stays
pending with nothing registered for it, and the next run releases it exactly once."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from service_helpers import BIN, ServiceHome
from test_stack import released_once

pytestmark = [pytest.mark.slow, pytest.mark.services]

# a dead server is reported after one retry, not after MLflow's default backoff (minutes)
FAST_FAIL = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
             "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


def run_and_kill(h: ServiceHome, stack, service: str, gate: Path) -> subprocess.CompletedProcess:
    """``unlearn run`` held after its release's MLflow run opened; ``service`` killed; the run
    let go. Returns the finished run."""
    gate.write_text("")
    reached = Path(f"{gate}.reached")
    reached.unlink(missing_ok=True)
    env = {**h.env, **FAST_FAIL, "UNLEARN_FAULT": "after:start_run=wait",
           "UNLEARN_FAULT_GATE": str(gate)}
    proc = subprocess.Popen([str(BIN / "unlearn"), "run"], env=env, cwd=h.home,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not reached.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run never reached its MLflow run"
        time.sleep(0.5)
    stack.command("kill", service)
    gate.unlink()
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def batch_versions(h: ServiceHome, batch_id: str) -> list[int]:
    return [v["version"] for v in h.json("releases")["versions"]
            if v["lineage"].get("batch_id") == batch_id]


def test_tracking_server_and_postgres_die_mid_run(service_home, stack, tmp_path):
    h = service_home("faults")
    h.ok("pretrain")
    submitted = h.json("submit", str(h.manifest("f1", [("f-r1", 7), ("f-r2", 14)])))
    batch_id = submitted["batch_id"]

    for service in ("mlflow", "postgres"):
        res = run_and_kill(h, stack, service, tmp_path / f"gate-{service}")
        assert res.returncode == 1, (service, res.returncode, res.stderr[-2000:])
        last = res.stderr.strip().splitlines()[-1]
        assert last.startswith("unlearn run: failed: the MLflow tracking server http://"), last
        assert ("connection refused" if service == "mlflow" else "HTTP 503") in last, last
        assert "stay pending; retry when it is back" in last, last
        print(f"\n{service} killed mid-run: {last}")
        stack.command("restart", service)
        assert h.ledger_rows("SELECT state FROM batches") == [("pending",)], service
        assert batch_versions(h, batch_id) == [], service  # nothing half-registered

    out = h.ok("run")
    assert f"{batch_id}: done -> version 2" in out, out
    released_once(h)
    assert batch_versions(h, batch_id) == [2]
