"""A scheduled run through a real ``prefect server start`` on 127.0.0.1 and ``unlearn serve``.

Marked slow: a server start, a serve process and a flow-run subprocess each import the whole
stack. The server starts while version 1 is pretrained, and the server's scheduler and the
runner poll every 2 s (instead of 60 s and 10 s), so the test waits for work, not for timers.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from flow_helpers import cli, cli_json

from tasks.ledger import Ledger

pytestmark = [pytest.mark.slow, pytest.mark.flow]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: process exited with {proc.returncode}")
        result = check()
        if result:
            return result
        time.sleep(2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def kill_leftovers(home: Path) -> None:
    """SIGKILL every process still working on ``home`` (its UNLEARN_HOME): a flow run that
    the runner had just started in a subprocess of its own outlives the runner."""
    import psutil

    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            if proc.environ().get("UNLEARN_HOME") == str(home):
                proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue


def test_interval_schedule_processes_pending_batch(home, prefect_server, tmp_path_factory):
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path_factory.mktemp("prefect-server")),
           "UNLEARN_HOME": str(home.home),
           "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
           "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    env.pop("PREFECT_API_URL", None)
    logs = home.home / "logs"
    logs.mkdir()
    with open(logs / "server.log", "w") as server_log, open(logs / "serve.log", "w") as serve_log:
        batch_id = run_scheduled(home, env, port, server_log, serve_log)

    with Ledger(home.ledger) as ledger:
        (batch,) = ledger.batches()
    assert (batch.batch_id, batch.state, batch.version) == (batch_id, "done", 2)
    rc, listing = cli_json("releases")
    assert rc == 0 and listing["champion"] == 2, listing
    assert listing["versions"][-1]["lineage"]["batch_id"] == batch_id


def run_scheduled(home, env: dict, port: int, server_log, serve_log) -> str:
    """``prefect server start`` (starting while version 1 is pretrained and a batch submitted
    in this process) + ``unlearn serve --interval 5`` until the batch is done; its id."""
    api = f"http://127.0.0.1:{port}/api"
    server = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=server_log, stderr=subprocess.STDOUT)
    serve = None
    try:
        assert cli("pretrain", "--epochs", "4")[0] == 0
        manifest = home.home / "erase.csv"
        manifest.write_text("request_id,instance_id,objective,new_label\nr1,3,misclassify,\n")
        rc, out, err = cli("submit", str(manifest))
        assert rc == 0, err
        batch_id = out.split(":")[0]
        with Ledger(home.ledger) as ledger:
            assert [(b.batch_id, b.state) for b in ledger.batches()] == [(batch_id, "pending")]

        wait_for(lambda: healthy(api), 180, "prefect server", server)
        serve = subprocess.Popen([str(BIN / "unlearn"), "serve", "--interval", "5"],
                                 env={**env, "PREFECT_API_URL": api},
                                 stdout=serve_log, stderr=subprocess.STDOUT)

        def batch_done():
            with Ledger(home.ledger) as ledger:
                return ledger.batches()[0].state == "done"

        wait_for(batch_done, 300, "the scheduled run to apply the batch", serve)
        return batch_id
    except AssertionError as e:
        tails = "".join(f"\n--- {Path(f.name).name} (end) ---\n{Path(f.name).read_text()[-2000:]}"
                        for f in (server_log, serve_log))
        raise AssertionError(f"{e}{tails}") from None
    finally:
        for proc in (serve, server):
            if proc is not None:
                stop(proc)
        kill_leftovers(home.home)
