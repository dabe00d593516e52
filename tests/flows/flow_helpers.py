"""Helpers for the flow tests: run the CLI in-process and capture what it prints."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from flows.cli import main
from tasks.paths import Paths

BIN = Path(sys.executable).parent


def cli(*args: str) -> tuple[int, str, str]:
    """``unlearn ARGS`` in this process (the session's Prefect server): rc, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    return rc, out.getvalue(), err.getvalue()


def cli_json(*args: str) -> tuple[int, Any]:
    rc, out, err = cli(*args, "--json")
    assert out.strip(), err
    return rc, json.loads(out)


def dvc(home: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """The real `dvc` CLI in ``home``; the venv's python first on PATH for the stage commands."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "DVC_NO_ANALYTICS": "1"}
    env.pop("UNLEARN_HOME", None)  # the stages use the project root they run in
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=home, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def write_manifest(path: Path, rows: list[tuple[str, int, str, int | None]]) -> Path:
    """A deletion manifest of (request_id, instance_id, objective, new_label) rows."""
    path.write_text("request_id,instance_id,objective,new_label\n" + "".join(
        f"{r},{i},{o},{'' if n is None else n}\n" for r, i, o, n in rows))
    return path


def erase_and_fix(root: Path) -> tuple[Path, Path]:
    """Two digits manifests in ``root``: erase.csv (4 misclassify rows: 11, 222, 333, 444) and
    fix.csv (2 relabel rows: 555 and 666, each to the next class)."""
    from unlearning.datasets import load_digits

    labels = load_digits().train_y.tolist()
    erase = write_manifest(root / "erase.csv", [(f"erase-{i}", i, "misclassify", None)
                                                for i in (11, 222, 333, 444)])
    fix = write_manifest(root / "fix.csv", [(f"fix-{i}", i, "relabel", (labels[i] + 1) % 10)
                                            for i in (555, 666)])
    return erase, fix


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


@dataclass
class Home:
    """A state folder holding version 1, for tests that run ``unlearn`` in real processes;
    ``manifest`` writes a fresh misclassify batch of unused ids each time."""

    paths: Paths
    api_url: str
    next_id: list[int] = field(default_factory=lambda: [100])

    def manifest(self, n: int = 2, tag: str = "c") -> Path:
        ids = range(self.next_id[0], self.next_id[0] + n)
        self.next_id[0] += n
        path = self.paths.home / f"{tag}-{ids[0]}.csv"
        path.write_text("request_id,instance_id,objective,new_label\n"
                        + "".join(f"{tag}-{i},{i},misclassify,\n" for i in ids))
        return path


def pretrained_home(root: Path, write_params, first_id: int) -> Home:
    """Pretrain version 1 (4 epochs) in ``root``, against the session's Prefect server."""
    from prefect.settings import PREFECT_API_URL

    write_params(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("UNLEARN_HOME", str(root))
        assert cli("pretrain", "--epochs", "4")[0] == 0
    return Home(Paths(root), PREFECT_API_URL.value(), [first_id])
