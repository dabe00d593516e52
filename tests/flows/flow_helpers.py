"""Helpers for the flow tests: run the CLI in-process and capture what it prints."""

from __future__ import annotations

import contextlib
import io
import json
from typing import Any

from flows.cli import main


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


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""
