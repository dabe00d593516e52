"""``unlearn ui``: the MLflow UI and the Prefect UI as real servers on 127.0.0.1, stopped
cleanly by a signal even when started the way a script's ``&`` starts it (SIGINT ignored).

The server tests are slow (two servers importing their stacks on two cores); the argument
checks are not.
"""

from __future__ import annotations

import os
import signal
import socket
import time
import urllib.request
from pathlib import Path

import pytest
from flow_helpers import cli
from ui_helpers import UiProcess, free_port

from flows.cli.ui import port_free


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def sigint_ignored(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    mask = int(next(line.split()[1] for line in status.splitlines()
                    if line.startswith("SigIgn:")), 16)
    return bool(mask & (1 << (signal.SIGINT - 1)))


def get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.read().decode(errors="replace")


def test_busy_port_is_a_usage_error(home):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        rc, out, err = cli("ui", "--mlflow-port", str(busy), "--only", "mlflow")
    assert rc == 2 and out == ""
    assert err.strip().splitlines() == [
        f"unlearn ui: error: port {busy} on 127.0.0.1 is in use; choose another with --mlflow-port"]
    rc, _, err = cli("ui", "--mlflow-port", "4300", "--prefect-port", "4300")
    assert rc == 2 and "must differ" in err


@pytest.mark.slow
def test_both_servers_start_and_stop_on_sigint(home, tmp_path):
    ports = free_port(), free_port()
    ui = UiProcess(home.home, tmp_path / "prefect", "--mlflow-port", str(ports[0]),
                   "--prefect-port", str(ports[1]))
    try:
        assert ui.urls["mlflow"] == f"http://127.0.0.1:{ports[0]}"
        assert ui.urls["prefect"] == f"http://127.0.0.1:{ports[1]}"
        assert get(f"{ui.urls['mlflow']}/health") == (200, "OK")
        status, body = get(f"{ui.urls['prefect_api']}/health")
        assert status == 200 and body.strip() == "true"
        status, body = get(ui.urls["prefect"])  # the Prefect UI's page
        assert status == 200 and "<html" in body.lower()
        status, body = get(ui.urls["mlflow"])  # the MLflow UI's page
        assert status == 200 and "<html" in body.lower()
        groups = children(ui.proc.pid)
        assert len(groups) == 2
        for pid in (ui.proc.pid, *groups):  # started with SIGINT ignored, yet all take it
            assert not sigint_ignored(pid), pid
    finally:
        start = time.monotonic()
        rc = ui.stop(signal.SIGINT)  # ignored-at-start SIGINT still stops it (Ctrl-C)
    assert rc == 0, ui.stderr()
    assert time.monotonic() - start < 60
    assert "stopping MLflow UI and Prefect UI" in ui.stderr()
    assert all(group_gone(g) for g in groups)  # the servers' workers too
    assert port_free(ports[0]) and port_free(ports[1])


@pytest.mark.slow
def test_a_dying_server_stops_the_command(home, tmp_path):
    port = free_port()
    ui = UiProcess(home.home, tmp_path / "prefect", "--only", "mlflow", "--mlflow-port",
                   str(port))
    try:
        (server,) = children(ui.proc.pid)
        os.killpg(server, signal.SIGKILL)
        rc = ui.proc.wait(timeout=60)
    finally:
        ui.stop()
    assert rc == 1
    assert "MLflow UI stopped unexpectedly" in ui.stderr()
    assert group_gone(server) and port_free(port)
