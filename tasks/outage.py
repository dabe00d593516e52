"""A service that went away, said on one line: the MLflow tracking server refusing
connections, timing out or answering 5xx (its database down), PostgreSQL gone under the
ledger. ``outage(e)`` returns that line for an exception raised through MLflow's client or
psycopg, else None (the caller keeps its own message)."""

from __future__ import annotations

import re

_API = re.compile(r"API request to (https?://[^/\s]+)")
_STATUS = re.compile(r"too many (\d{3}) error responses")


def outage(e: BaseException) -> str | None:
    text = str(e)
    api = _API.search(text)
    if api is not None:
        server = api.group(1)
        status = _STATUS.search(text)
        if status is not None:
            why = (f"it answers HTTP {status.group(1)}: its backend store (the database) is "
                   "probably down")
        elif "Connection refused" in text or "NewConnectionError" in text:
            why = "connection refused: the server is down"
        elif "timed out" in text.lower():
            why = "timed out"
        elif "RemoteDisconnected" in text or "Connection aborted" in text:
            why = "the connection was dropped"
        else:
            return None
        return f"the MLflow tracking server {server} cannot serve the request ({why})"
    if e.__class__.__module__.startswith("psycopg") and "connection" in text.lower():
        first = text.strip().splitlines()[0] if text.strip() else e.__class__.__name__
        return f"the ledger's PostgreSQL cannot be reached ({first})"
    return None
