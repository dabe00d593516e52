"""A scheduled run through a real ``prefect server start`` on 127.0.0.1 and ``unlearn serve``.

Marked slow: a server start, a serve process and a flow-run subprocess each import the whole
stack; about a minute and a half on two busy cores.
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
from flow_helpers import cli

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


def test_interval_schedule_processes_pending_batch(home, prefect_server, tmp_path_factory):
    assert cli("pretrain", "--epochs", "4")[0] == 0
    manifest = home.home / "erase.csv"
    manifest.write_text("request_id,instance_id,objective,new_label\nr1,3,misclassify,\n")
    assert cli("submit", str(manifest))[0] == 0

    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path_factory.mktemp("prefect-server")),
           "UNLEARN_HOME": str(home.home)}
    env.pop("PREFECT_API_URL", None)
    logs = home.home / "logs"
    logs.mkdir()
    with open(logs / "server.log", "w") as server_log, open(logs / "serve.log", "w") as serve_log:
        run_scheduled(home, env, port, server_log, serve_log)
    rc, out, _ = cli("releases")
    assert rc == 0 and "champion" in out


def run_scheduled(home, env: dict, port: int, server_log, serve_log) -> None:
    """``prefect server start`` + ``unlearn serve --interval 10`` until the batch is done."""
    api = f"http://127.0.0.1:{port}/api"
    server = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=server_log, stderr=subprocess.STDOUT)
    serve = None
    try:
        wait_for(lambda: healthy(api), 180, "prefect server", server)
        serve = subprocess.Popen([str(BIN / "unlearn"), "serve", "--interval", "10"],
                                 env={**env, "PREFECT_API_URL": api},
                                 stdout=serve_log, stderr=subprocess.STDOUT)

        def batch_done():
            with Ledger(home.ledger) as ledger:
                return ledger.batches()[0].state == "done"

        wait_for(batch_done, 300, "the scheduled run to apply the batch", serve)
    finally:
        for proc in (serve, server):
            if proc is not None:
                stop(proc)
