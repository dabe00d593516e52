"""Importing the pipeline changes nothing on disk or in the environment; ``serve`` refuses
to run without a real Prefect server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def test_imports_create_nothing(tmp_path, tmp_path_factory):
    script = ("import os, flows.pipeline, flows.cli.pipeline, flows.demo, tasks.steps, "
              "tasks.validation, tasks.registry, tasks.submit, tasks.lineage\n"
              "assert 'MLFLOW_TRACKING_URI' not in os.environ\n")
    # prefect itself creates PREFECT_HOME on import: keep that out of the folder we watch
    env = {**os.environ, "PREFECT_HOME": str(tmp_path_factory.mktemp("prefect-home")),
           "HOME": str(tmp_path)}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_serve_needs_a_prefect_server(tmp_path):
    env = {**os.environ, "UNLEARN_HOME": str(tmp_path), "PREFECT_HOME": str(tmp_path / ".p")}
    env.pop("PREFECT_API_URL", None)
    done = subprocess.run([str(BIN / "unlearn"), "serve", "--interval", "60"], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 2
    assert "prefect server start" in done.stderr and len(done.stderr.strip().splitlines()) == 1
