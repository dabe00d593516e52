"""What commands print: progress lines on stderr, JSON and tables on stdout, and a flow's
result turned into an exit code."""

from __future__ import annotations

import json
import sys
from typing import Any

from .errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, Failure, UsageError


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)

def emit(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))

def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    if not rows:
        return "(none)"
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)

MAX_CELL = 120  # a table cell is cut to this many characters (the JSON output keeps it all)


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}"
    if isinstance(v, (list, tuple)):
        return _shown(",".join(str(x) for x in v[:50]) or "-")
    return _shown(str(v))

def _shown(text: str) -> str:
    """Printable (control, format and separator characters escaped: a stored value never
    drives the terminal) and at most MAX_CELL characters."""
    text = text[: MAX_CELL * 8]
    if not text.isprintable():
        text = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)
    return text if len(text) <= MAX_CELL else text[: MAX_CELL - 1] + "…"

def finish(result: dict[str, Any], as_json: bool, ok_line: str) -> int:
    """Print a flow's result; a refusal or failure becomes exit 1 with its reason."""
    if as_json:
        emit(result)
        status = result.get("status")
        return EXIT_OK if status == "ok" else EXIT_USAGE if status == "invalid" else EXIT_FAILED
    if result.get("status") == "invalid":
        raise UsageError(result["reason"])
    if result.get("status") == "refused":
        raise Failure(f"refused: {result.get('reason')}")
    if result.get("status") != "ok":
        raise Failure(str(result.get("reason")))
    print(ok_line)
    return EXIT_OK
