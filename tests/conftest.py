"""Shared test setup: an isolated Prefect home and offline settings, set before anything
imports prefect; a temporary state folder (UNLEARN_HOME) with small parameters per test;
a session-scoped Prefect test server for the flow tests."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml

# Before prefect is imported anywhere: its home (database, result storage) lives in a
# throwaway folder, never ~/.prefect, and nothing calls home.
_PREFECT_HOME = tempfile.mkdtemp(prefix="unlearn-tests-prefect-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
# (a shell that sourced .stack.env points nothing here at the stack: tests/services does that)
for _key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "UNLEARN_HOME", "UNLEARN_PARAMS",
             "UNLEARN_LEDGER_URL"):
    os.environ.pop(_key, None)

# imported only now: the environment above must be in place first
from tasks.paths import OFFLINE_ENV, Paths

os.environ.update(OFFLINE_ENV)

# Small settings: a few seconds of training, short unlearning loops.
TEST_PARAMS = {
    "pretrain": {"epochs": 8},
    "unlearn": {"params": {"max_steps": 400},
                "fallback": [],  # no escalation: a failing release stays failed, and no
                "consolidate_drop": 0.0},  # consolidation (tests/flows/test_escalation.py)
    "evaluate": {"mia_max_per_side": 200},
}


def pytest_addoption(parser):
    parser.addoption(
        "--no-skips", action="store_true",
        help="fail the run when any test was skipped (`make test` and CI: every part of the "
             "suite, the browser and the real servers included, must really run)")


_NO_SKIPS_FAILED: list[str] = []


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_PREFECT_HOME, ignore_errors=True)
    if session.config.getoption("--no-skips", default=False):
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        skipped = reporter.stats.get("skipped", []) if reporter else []
        if skipped:
            _NO_SKIPS_FAILED[:] = [report.nodeid for report in skipped]
            if session.exitstatus == pytest.ExitCode.OK:
                session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if _NO_SKIPS_FAILED:
        terminalreporter.write_sep(
            "=", f"--no-skips: {len(_NO_SKIPS_FAILED)} test(s) skipped, the run fails "
                 "(see the SKIPPED lines: install what they need)", red=True)


def _write_params(home: Path, **sections: dict) -> Path:
    """params.yaml in ``home``: the project's file with TEST_PARAMS and ``sections`` merged."""
    data = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    for overrides in (TEST_PARAMS, sections):
        for section, values in overrides.items():
            for key, value in values.items():
                if isinstance(value, dict):
                    data[section].setdefault(key, {}).update(value)
                else:
                    data[section][key] = value
    path = home / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def write_params():
    """``write_params(home, section={key: value})``: test params.yaml with overrides."""
    return _write_params


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Paths:
    """A fresh state folder with the small test parameters; UNLEARN_HOME points at it."""
    monkeypatch.setenv("UNLEARN_HOME", str(tmp_path))
    _write_params(tmp_path)
    return Paths(tmp_path)


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect server (and database) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def digits_model():
    """A small CNN pre-trained on digits (deterministic, ~10 s), shared by library tests.

    Tests must not modify it: methods work on copies.
    """
    import torch

    from unlearning.datasets import load_dataset
    from unlearning.train import TrainConfig, pretrain

    torch.set_num_threads(1)  # small models run fastest on one thread, and timings stay sane
    ds = load_dataset("digits")
    model, _ = pretrain(ds, "small-cnn", TrainConfig(epochs=30, seed=0))
    model.eval()
    return model, ds
