"""``unlearn ui``: the MLflow UI and the Prefect UI as real servers on 127.0.0.1.

``unlearn ui`` runs both servers as child processes, each in its own process group, with
SIGINT at its default action even when ``unlearn ui`` itself was started with SIGINT ignored
(a shell starts background jobs that way and children inherit it). Ctrl-C, SIGTERM or
SIGHUP to ``unlearn ui`` stops both groups with SIGTERM, then SIGKILL after a grace period; if one server dies, the
other is stopped too and the command exits 1 with the tail of its log.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import EXIT_OK, Failure, UsageError

HOST = "127.0.0.1"
START_TIMEOUT_S = 240.0  # both servers import their whole stack; slow on 2 busy cores
STOP_GRACE_S = 20.0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ui", help="run the MLflow UI and the Prefect UI on 127.0.0.1 until "
                                  "Ctrl-C")
    p.add_argument("--mlflow-port", type=int, default=5000, help="MLflow UI port (default 5000)")
    p.add_argument("--prefect-port", type=int, default=4200,
                   help="Prefect UI/API port (default 4200)")
    p.add_argument("--only", choices=("mlflow", "prefect"), help="start just one of the two")
    p.add_argument("--json", action="store_true",
                   help="print the URLs as one JSON line once both answer")
    p.set_defaults(handler=cmd_ui)


def port_free(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True

def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200
    except (OSError, ValueError):
        return False

@dataclass
class Server:
    """One UI server: its command, where it answers, and the process once started."""

    name: str
    command: list[str]
    url: str
    health: str
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                self.command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=self.env, process_group=0)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 8) -> str:
        try:
            text = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(line.strip() for line in text[-lines:])

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """SIGTERM the whole process group, wait, then SIGKILL what is left."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # process_group=0: the child leads its own group
        _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and (self.proc.poll() is None or _group_alive(pgid)):
            time.sleep(0.2)
        if self.proc.poll() is None or _group_alive(pgid):
            _signal_group(pgid, signal.SIGKILL)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass

def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

def ui_servers(paths, cfg, mlflow_port: int, prefect_port: int,
               only: str | None = None) -> tuple[list[Server], dict[str, str]]:
    """The servers to start, and the URLs of servers configured elsewhere (not started)."""
    env = {**os.environ}
    env.pop("PREFECT_API_URL", None)
    logs = paths.artifacts / "ui"
    servers: list[Server] = []
    external: dict[str, str] = {}
    name = cfg.registry.model_name
    if only in (None, "mlflow"):
        uri = paths.tracking_uri
        if uri.startswith(("http://", "https://")):
            external["mlflow"] = uri  # a tracking server elsewhere already has its UI
        else:
            url = f"http://{HOST}:{mlflow_port}"
            servers.append(Server(
                "MLflow UI",
                [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                 "--default-artifact-root", paths.artifact_root, "--host", HOST,
                 "--port", str(mlflow_port), "--workers", "1"],
                url, f"{url}/health", logs / "mlflow.log",
                {**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                extra={"model": f"{url}/#/models/{name}"}))
    if only in (None, "prefect"):
        api = os.environ.get("PREFECT_API_URL")
        if api:
            external["prefect"] = api.removesuffix("/").removesuffix("/api")
        else:
            url = f"http://{HOST}:{prefect_port}"
            servers.append(Server(
                "Prefect UI",
                [sys.executable, "-m", "prefect", "server", "start", "--host", HOST,
                 "--port", str(prefect_port)],
                url, f"{url}/api/health", logs / "prefect.log", env,
                extra={"api": f"{url}/api"}))
    return servers, external

def run_servers(servers: list[Server], announce: Callable[[], None], say: Callable[[str], None],
                stop: threading.Event, timeout: float = START_TIMEOUT_S) -> None:
    """Start ``servers``, wait until each answers, ``announce``, run until ``stop`` is set.

    Raises Failure when a server does not come up or dies; every server is stopped on the way
    out, whatever happens.
    """
    try:
        for s in servers:
            s.start()
            say(f"starting {s.name} on {s.url} (log: {s.log})")
        pending = list(servers)
        deadline = time.monotonic() + timeout
        while pending and not stop.is_set():
            for s in list(pending):
                if not s.alive():
                    raise Failure(f"{s.name} exited with code {s.proc.returncode}: "
                                  f"{s.log_tail()}")
                if http_ok(s.health):
                    pending.remove(s)
            if pending and time.monotonic() > deadline:
                raise Failure(f"{', '.join(s.name for s in pending)} did not answer within "
                              f"{timeout:.0f} s (logs: {', '.join(str(s.log) for s in pending)})")
            if pending:
                stop.wait(0.5)
        if stop.is_set():
            return
        announce()
        while not stop.wait(1.0):
            for s in servers:
                if not s.alive():
                    raise Failure(f"{s.name} stopped unexpectedly (code {s.proc.returncode}): "
                                  f"{s.log_tail()}")
    finally:
        running = [s for s in servers if s.proc is not None]
        if running:
            say("stopping " + " and ".join(s.name for s in running))
        threads = [threading.Thread(target=s.stop) for s in running]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

def cmd_ui(args: argparse.Namespace) -> int:
    from .output import say
    from .runtime import context

    paths, cfg = context()
    ports = {"--mlflow-port": args.mlflow_port, "--prefect-port": args.prefect_port}
    for flag, port in ports.items():
        if not 1 <= port <= 65535:
            raise UsageError(f"{flag} must be in 1..65535, got {port}")
    if args.only is None and args.mlflow_port == args.prefect_port:
        raise UsageError("--mlflow-port and --prefect-port must differ")
    servers, external = ui_servers(paths, cfg, args.mlflow_port, args.prefect_port, args.only)
    for s in servers:
        port = int(s.url.rsplit(":", 1)[1])
        if not port_free(port):
            flag = "--mlflow-port" if s.name.startswith("MLflow") else "--prefect-port"
            raise UsageError(f"port {port} on {HOST} is in use; choose another with {flag}")
    if paths.tracking_uri == paths.default_tracking_uri:
        paths.mlruns.mkdir(parents=True, exist_ok=True)  # the UI of an empty store is fine

    stop = threading.Event()

    def on_signal(signum, frame) -> None:
        stop.set()

    # Handled here, so the servers start with the default action for these signals: exec
    # resets a handled signal to SIG_DFL but keeps SIG_IGN, and a script's `&` starts us
    # with SIGINT ignored (a shell starts background jobs so). Installed before any server starts.
    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, on_signal) for sig in handled}

    def announce() -> None:
        urls: dict[str, Any] = {"state": str(paths.home)}
        for s in servers:
            key = "mlflow" if s.name.startswith("MLflow") else "prefect"
            urls[key] = s.url
            urls.update({f"{key}_{k}": v for k, v in s.extra.items()})
        for key, url in external.items():
            urls.setdefault(key, url)
        if args.json:
            print(json.dumps(urls), flush=True)
            return
        if "mlflow" in urls:
            model = urls.get("mlflow_model")
            print(f"MLflow UI:  {urls['mlflow']}" + (f"  (model: {model})" if model else ""),
                  flush=True)
        if "prefect" in urls:
            api = urls.get("prefect_api")
            print(f"Prefect UI: {urls['prefect']}"
                  + (f"  (send runs here: export PREFECT_API_URL={api})" if api else ""),
                  flush=True)
        print("Ctrl-C stops " + ("both" if len(servers) > 1 else "it"), flush=True)

    try:
        if not servers:
            announce()  # everything is configured elsewhere: nothing to run
            return EXIT_OK
        run_servers(servers, announce, say, stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    say("stopped")
    return EXIT_OK
