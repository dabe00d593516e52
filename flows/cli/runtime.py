"""Where a command runs: the state folder and its params.yaml, the dataset, and Prefect.

Handlers import the heavy stack (torch, prefect, mlflow, great_expectations) themselves, after
``configure_environment`` has pointed Prefect at the project's home and switched telemetry
off, so ``unlearn --help`` stays fast and ``~/.prefect`` is never touched by surprise.
Without a server, each command runs its flow on Prefect's temporary local server (about
10 s to start in a fresh process). Prefect logs at WARNING unless PREFECT_LOGGING_LEVEL says
otherwise.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from .errors import Failure, UsageError


def context(check_ledger: bool = True, read_only: bool = False):
    """Resolve the state folder, prepare the environment, load params.yaml.

    ``read_only``: a listing, which runs no method, trains nothing and loads no data, so the
    names and parameters that need the registries are left unchecked and torch is not
    imported (an interactive command answers in about a second).
    """
    from tasks.params import ParamsError, load_params
    from tasks.paths import Paths, configure_environment, find_home

    paths = Paths(find_home())
    configure_environment(paths)
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    try:
        cfg = load_params(paths.params_file, check_registries=not read_only)
    except ParamsError as e:
        raise UsageError(str(e)) from None
    if check_ledger:
        # a damaged or unreachable ledger stops here, before a flow (an emptied one is left
        # as it is: the state check says so; opening it would write a fresh schema into it)
        from tasks.ledger import Ledger, LedgerError, ledger_present

        try:
            if ledger_present(paths.ledger):
                Ledger(paths.ledger).close()
        except LedgerError as e:
            raise Failure(str(e)) from None
    return paths, cfg

def require_dataset(cfg) -> None:
    """Load the dataset now (cached for the flows) and resolve ``runtime.device``, so a
    missing dataset or a GPU that is not there is a usage error."""
    from tasks.release import dataset_of
    from unlearning.datasets import DatasetError
    from unlearning.devices import DeviceError

    try:
        dataset_of(cfg)
        cfg.runtime.torch_device()
    except (DatasetError, DeviceError) as e:
        raise UsageError(str(e)) from None

def temporary_server_dies_with_us() -> None:
    """Without PREFECT_API_URL, start Prefect's temporary server now, from this thread, so
    that the kernel stops it when this process dies, even by SIGKILL (Linux
    ``PR_SET_PDEATHSIG``). Prefect would start the same server lazily, and a killed
    ``unlearn`` would leave it running for ever. Elsewhere (or with a server): nothing."""
    if not sys.platform.startswith("linux"):
        return
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return
    import ctypes
    import functools
    import signal
    import subprocess
    import types

    import prefect.server.api.server as prefect_server

    server = prefect_server.SubprocessASGIServer()  # the one Prefect's clients look up
    if server.running:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()

    def die_with_parent() -> None:  # runs in the child, before it execs the server
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the line above
            os._exit(0)

    real = prefect_server.subprocess
    prefect_server.subprocess = types.SimpleNamespace(**{
        **vars(subprocess), "Popen": functools.partial(subprocess.Popen,
                                                       preexec_fn=die_with_parent)})
    try:
        server.start()
    finally:
        prefect_server.subprocess = real

_EARLY: dict[str, Any] = {}  # the background start of the temporary server: ready, error


def start_prefect_early() -> None:
    """Start Prefect's temporary server (``temporary_server_dies_with_us``) in a background
    thread while the command goes on loading the stack, the dataset and checking the state:
    the server's start-up (seconds, in its own process) overlaps that work instead of
    preceding the flow. ``run_flow`` waits for it. The starting thread then stays alive for
    the life of the process, because ``PR_SET_PDEATHSIG`` fires when the *thread* that
    started the child exits. With PREFECT_API_URL set (or off Linux): nothing."""
    if _EARLY or not sys.platform.startswith("linux"):
        return
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return
    import threading

    # imported here, before the thread: never two threads importing one package at once
    import prefect.server.api.server  # noqa: F401

    ready = threading.Event()

    def start_and_stay() -> None:
        try:
            temporary_server_dies_with_us()
        except Exception as e:  # noqa: BLE001  (run_flow tries again and reports it)
            _EARLY["error"] = e
        finally:
            ready.set()
        threading.Event().wait()  # the server is stopped when this process ends

    _EARLY["ready"] = ready
    threading.Thread(target=start_and_stay, name="prefect-temporary-server",
                     daemon=True).start()


def load_release_stack(suites: bool = True) -> None:
    """Import what a batch's release steps use (MLflow's PyTorch flavour and torch.export's
    tracer for the registration's pt2 model, DVC for the data tracking and, with ``suites``,
    Great Expectations for a validation whose inputs changed since the submit, scikit-learn
    for the evaluation, and MLflow's map of the installed packages) before the flow starts:
    in a fresh process this fills the wait for Prefect's temporary server (the server starts
    in a process of its own, on the other core), and a long-lived ``run --watch`` pays it
    once, before the first batch, instead of inside it. A one-shot run leaves Great Expectations out (about 4.6 s): a batch unchanged since its submit reuses
    the submit's answer, and one that changed imports it when its suites run."""
    import contextlib

    import dvc.repo  # noqa: F401
    import mlflow.pytorch  # noqa: F401

    if suites:
        import great_expectations  # noqa: F401

    # the evaluation's membership attack
    import sklearn.metrics
    import sklearn.svm  # noqa: F401

    with contextlib.suppress(ImportError):  # what torch.export.export loads on first use
        import torch.export._trace  # noqa: F401
    # MLflow checks the logged model's pip requirements against the installed packages with a
    # map of every distribution's files, built on first use (about 1.8 s here) and kept for
    # the process; a private function, so an MLflow that lacks it only loses this head start
    with contextlib.suppress(Exception):
        from mlflow.utils.requirements_utils import _init_packages_to_modules_map

        _init_packages_to_modules_map()


def _await_prefect() -> None:
    """The temporary server is up (or the API is elsewhere) before a flow runs."""
    ready = _EARLY.get("ready")
    if ready is not None:
        ready.wait()
        if "error" not in _EARLY:
            return
    temporary_server_dies_with_us()


class _NoPrefectErrors:
    """A console-handler filter: Prefect's ERROR records (a task or flow run failed, with the
    traceback) stay off the terminal; the command prints the one-line error instead. The run
    keeps its logs in Prefect (the API handler is not filtered)."""

    def filter(self, record) -> bool:
        return not (record.name.startswith("prefect") and record.levelno >= logging.ERROR)


_QUIET = _NoPrefectErrors()


def quiet_prefect_errors() -> None:
    """Keep Prefect's failure tracebacks off stderr (``UNLEARN_DEBUG=1`` keeps them): every
    error a command hits is one line, printed by ``flows.cli.main``."""
    if os.environ.get("UNLEARN_DEBUG"):
        return
    import prefect  # noqa: F401  (configures logging: the console handler exists after this)

    for handler in logging.getLogger().handlers:
        if handler.__class__.__name__ == "PrefectConsoleHandler" and _QUIET not in handler.filters:
            handler.addFilter(_QUIET)


def run_flow(flow_fn, **kwargs: Any) -> dict[str, Any]:
    """Call a flow; an unexpected error becomes a one-line failure (Prefect keeps the
    traceback in the run's logs; the ledger left every unfinished batch pending)."""
    quiet_prefect_errors()
    _await_prefect()
    try:
        with _no_heartbeats_on_a_temporary_server():
            return flow_fn(**kwargs)
    except (UsageError, Failure):
        raise
    except Exception as e:  # noqa: BLE001  (any crash: one line; Prefect logged it)
        from tasks.outage import outage

        down = outage(e)  # a service gone (tracking server, PostgreSQL): said as such
        what = down or f"{e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        after = "; retry when it is back" if down else ""
        raise Failure(f"{what} (nothing half-applied: unfinished batches stay "
                      f"pending{after})") from None

def _no_heartbeats_on_a_temporary_server():
    """Flow-run heartbeats let a lasting server mark a run whose process died as crashed.
    Prefect's temporary server dies with this process, so nobody would read them there,
    and the heartbeat thread, which sleeps in one-second steps, holds the end of every
    flow run for up to a second. Off on the temporary server; as configured on a real one."""
    import contextlib

    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        temporary_settings,
    )

    if PREFECT_API_URL.value():
        return contextlib.nullcontext()
    return temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})


def refuse_if_damaged(paths, cfg, served: bool = False, snapshot: bool = False) -> None:
    """Commands that would change the state (and those whose answer comes from the ledger)
    stop here, on one line, while the ledger, the registry and data/ disagree
    (``tasks.state_check``); ``served`` also checks the champion's logged model;
    ``snapshot``: a listing may read the registry's snapshot (``registry.read_versions``)."""
    from tasks.state_check import check_state

    report = check_state(paths, cfg, served=served, snapshot=snapshot)
    if report.problems:
        raise Failure(report.line)

def state_problem(paths, cfg, snapshot: bool = False) -> str | None:
    """The one line saying how the ledger, the registry and data/ disagree, or None: for
    commands that go on regardless (``releases``, ``verify``) and exit 1 at the end.
    ``snapshot``: a listing may read the registry's snapshot (``registry.read_versions``)."""
    from tasks.state_check import check_state

    report = check_state(paths, cfg, snapshot=snapshot)
    return report.line if report.problems else None

def warn_if_damaged(paths, cfg) -> bool:
    """``releases`` goes on after one warning line on stderr; True when the state is damaged
    (the command then exits 1). A listing: it reads the registry's snapshot."""
    problem = state_problem(paths, cfg, snapshot=True)
    if problem:
        print(f"warning: {problem}", file=sys.stderr, flush=True)
    return problem is not None
