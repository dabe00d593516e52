"""Fixtures of the browser and UI tests: a browser (the tests FAIL without /usr/bin/chromium:
they are part of the suite CI runs, and `.ci/run` installs it), a small release state, and a
folder for screenshots (printed at the end of the run; set UNLEARN_SCREENSHOT_DIR to choose
it)."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

# the flow tests' helpers (cli in-process, the small release state) and this folder's
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "flows"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ui_helpers import CHROMIUM, SHOTS, Browser


@pytest.fixture(scope="session")
def chromium_available() -> None:
    """A missing browser fails the browser tests (never skips them): one line, how to fix."""
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(f"{CHROMIUM} not found: install Debian's headless browser with "
                    "`sudo apt-get install -y chromium` (or set CHROMIUM=/path/to/chromium)",
                    pytrace=False)
    try:
        import websockets.sync.client  # noqa: F401  (installed with prefect)
    except ImportError:
        pytest.fail("the websockets package (DevTools client) is missing: "
                    "`.venv/bin/pip install -e '.[dev]'` (it comes with prefect)", pytrace=False)


@pytest.fixture
def browser(chromium_available, tmp_path):
    b = Browser(Path(tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp_path)))
    try:
        yield b
    finally:
        b.close()


@pytest.fixture(scope="session")
def screenshot_dir(tmp_path_factory) -> Path:
    chosen = os.environ.get("UNLEARN_SCREENSHOT_DIR")
    folder = Path(chosen) if chosen else tmp_path_factory.mktemp("browser-screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def pytest_terminal_summary(terminalreporter):
    if SHOTS:
        terminalreporter.write_sep("-", "browser screenshots")
        for shot in SHOTS:
            terminalreporter.write_line(str(shot))


@pytest.fixture(scope="module")
def release_home(tmp_path_factory, prefect_server, write_params) -> Path:
    """A state folder with version 1 (pretrain) and version 2 (one batch)."""
    from release_state import build_release_state

    root = tmp_path_factory.mktemp("ui-state")
    write_params(root)
    build_release_state(root)
    return root
