"""The services tier: the stack of ``stack/stack.py`` (PostgreSQL, moto's S3 endpoint,
``mlflow server`` on PostgreSQL with S3 artifacts, ``prefect server start``), started once per
session in a temporary folder and stopped at the end, with a check that nothing it started
is left running. Every ``unlearn`` command runs as a real process pointed at it by the
stack's environment, as ``. .stack.env`` does for a user. A stack that cannot start fails
the tests (PostgreSQL missing: `apt-get install -y postgresql`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from service_helpers import STACK, ServiceHome, StackHandle, read_env_file, running


@pytest.fixture(scope="session")
def stack():
    # PostgreSQL runs as an unprivileged user: its folder must be reachable by it
    folder = Path(tempfile.mkdtemp(prefix="unlearn-stack-", dir="/tmp"))
    folder.chmod(0o755)
    env_file = folder / "stack.env"
    t0 = time.monotonic()
    res = subprocess.run([*STACK, "up", "--dir", str(folder), "--env-file", str(env_file)],
                         capture_output=True, check=False, text=True, timeout=600)
    startup = time.monotonic() - t0
    handle = StackHandle(folder, {}, startup)
    try:
        assert res.returncode == 0, f"stack.py up failed: {res.stderr.strip() or res.stdout}"
        handle.env = read_env_file(env_file)
        print(f"\nservice stack up in {startup:.1f} s ({folder})")
        yield handle
    finally:
        pids = handle.state().get("services", {}) if (folder / "pids.json").exists() else {}
        down = subprocess.run([*STACK, "down", "--dir", str(folder)],
                              capture_output=True, check=False,
                              text=True, timeout=300)
        left = [f"{name} {info['pid']}" for name, info in pids.items()
                if running(info["pid"])]
        if down.returncode == 0 and not left:
            shutil.rmtree(folder, ignore_errors=True)
        assert down.returncode == 0, f"stack.py down: {down.stderr}"
        assert not left, f"still running after stack.py down: {left}"


@pytest.fixture
def service_home(stack, tmp_path_factory, write_params):
    """``service_home(name, model=...)``: a state folder on the stack (see ServiceHome)."""

    def make(name: str, model: str | None = None) -> ServiceHome:
        home = tmp_path_factory.mktemp(name)
        model = model or f"forget-{name}"
        write_params(home, registry={"model_name": model, "experiment": f"unlearning-{name}"},
                     pretrain={"epochs": 4})  # (verify rebuilds with params.yaml's recipe)
        env = {**os.environ, **stack.env, "UNLEARN_HOME": str(home),
               "UNLEARN_LEDGER_URL": stack.database(f"ledger_{name}".replace("-", "_")),
               "PREFECT_LOGGING_LEVEL": "WARNING"}
        return ServiceHome(home, env, model)

    return make
