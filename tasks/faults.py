"""Fault injection for the crash tests: ``UNLEARN_FAULT`` names points where the process
kills itself (SIGKILL: no cleanup, no atexit, no finally) or waits.

``UNLEARN_FAULT="after:register_version"`` kills the process right after the model version
is registered; several points are comma-separated; ``POINT=wait`` instead blocks at the point
(writing ``$UNLEARN_FAULT_GATE.reached``) until the file ``$UNLEARN_FAULT_GATE`` is removed,
so a test can hold a process mid-run. Unset (always, outside tests), ``fault`` is one
environment lookup.

The points, in the order one batch passes them (``rollback --reapply`` passes the same ones
from ``after:start_run`` on, for the one version it registers):

``in:unlearn``               the unlearning loop has run; the candidate is not saved yet
``after:start_run``          the release's MLflow run is open; nothing registered
``after:register_version``   the model version exists; the ledger and the aliases do not know it
``after:record_release``     the ledger records the release; no alias, batch still pending
``after:candidate_alias``    ``candidate`` points at it; ``champion`` has not moved
``after:champion_alias``     ``champion`` moved; ``candidate`` not cleared, batch still pending
``in:record_batch``          inside the ledger transaction that marks the batch done (rolled back)
``in:attempt-N``             attempt N of the escalation policy is accepted by the ledger;
                             nothing trained or registered for it yet (N >= 1)
``in:consolidate``           a consolidation is due: nothing trained or registered for it yet
                             (then it passes the release points from ``after:start_run`` on)
``after:lock``               ``unlearn run`` holds the pipeline lock, before any batch
``after:write_manifest``     ``unlearn submit`` staged artifacts/incoming/<batch>.csv; the
                             ledger does not know the batch yet
``after:record_submit``      the ledger records the batch as pending; its manifest is still
                             staged (the next command moves it into data/deletions/)
``in:read_stores``           a state check has listed data/deletions/ and has not read the
                             ledger yet (every command that checks the records passes it)
``before:list_pending``      ``unlearn run`` has checked the records and has not listed the
                             pending batches yet
``after:watch_pass``         ``unlearn run --watch`` finished a pass; its line is not in the
                             pass log yet (``tasks.watcher``)
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

ENV, GATE_ENV = "UNLEARN_FAULT", "UNLEARN_FAULT_GATE"
MAX_WAIT_S = 600.0


def fault(point: str) -> None:
    """Kill this process (or wait) if ``UNLEARN_FAULT`` names ``point``; else nothing."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    for entry in spec.split(","):
        name, _, action = entry.strip().partition("=")
        if name != point:
            continue
        if action in ("", "kill"):
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "wait":
            _wait()


def _wait() -> None:
    gate = os.environ.get(GATE_ENV)
    if not gate:
        return
    Path(gate + ".reached").write_text(str(os.getpid()))
    deadline = time.monotonic() + MAX_WAIT_S
    while Path(gate).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
