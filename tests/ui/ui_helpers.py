"""Helpers for the browser and UI tests: headless Chromium driven over the DevTools protocol
(the ``websockets`` package that prefect installs), and ``unlearn ui`` as a child process."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
BIN = Path(sys.executable).parent
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars",
                  "--window-size=1280,900", "--remote-debugging-port=0")
SHOTS: list[Path] = []  # every screenshot taken, listed at the end of the run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Browser:
    """One headless Chromium and one page, driven over the DevTools protocol (websockets)."""

    def __init__(self, profile: Path):
        from websockets.sync.client import connect

        self.proc = subprocess.Popen(
            [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        active = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (active.exists() and active.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chromium did not start (exit {self.proc.poll()})")
            time.sleep(0.1)
        port = active.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        self.ws = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30)
        self._id = 0
        self._lock = threading.Lock()

    def call(self, method: str, timeout: float = 60, **params: Any) -> dict[str, Any]:
        with self._lock:
            self._id += 1
            self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
            deadline = time.monotonic() + timeout
            while True:
                message = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
                if message.get("id") == self._id:
                    if "error" in message:
                        raise RuntimeError(f"{method}: {message['error']}")
                    return message["result"]

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete'", 60, f"{url} to load")

    def eval(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = self.eval(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.5)

    def text(self) -> str:
        return self.eval("document.body ? document.body.innerText : ''") or ""

    def screenshot(self, path: Path, full_page: bool = True) -> Path:
        if full_page:
            size = self.call("Page.getLayoutMetrics")["cssContentSize"]
            self.call("Emulation.setDeviceMetricsOverride", width=1280,
                      height=min(int(size["height"]) + 1, 16000), deviceScaleFactor=1,
                      mobile=False)
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        if full_page:
            self.call("Emulation.clearDeviceMetricsOverride")
        path.write_bytes(base64.b64decode(data["data"]))
        SHOTS.append(path)
        return path

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class UiProcess:
    """``unlearn ui`` as a child process, started the way a script's ``&`` starts it (SIGINT
    ignored); ``urls`` is the JSON line it prints once the servers answer."""

    def __init__(self, home: Path, prefect_home: Path, *args: str, timeout: float = 300):
        env = {**os.environ, "UNLEARN_HOME": str(home), "PREFECT_HOME": str(prefect_home)}
        env.pop("PREFECT_API_URL", None)
        self.log = home / f"ui-{time.monotonic_ns()}.err"
        self._err = open(self.log, "w")  # noqa: SIM115  (closed in stop)
        self.proc = subprocess.Popen(
            [str(BIN / "unlearn"), "ui", "--json", *args], env=env, stdout=subprocess.PIPE,
            stderr=self._err, text=True,
            # as a script's `&` starts it; no threads exist in this process at this point
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))  # noqa: PLW1509
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()),
                                  daemon=True)
        reader.start()
        reader.join(timeout)
        if not line or not line[0].strip():
            self.stop(signal.SIGTERM)
            raise AssertionError(f"unlearn ui printed no URLs within {timeout:.0f} s: "
                                 f"{self.log.read_text()[-3000:]}")
        self.urls: dict[str, str] = json.loads(line[0])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 90) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        finally:
            self._err.close()

    def stderr(self) -> str:
        return self.log.read_text()
