"""``unlearn`` subcommands of the release pipeline: pretrain, submit, run, serve, releases,
requests, promote, rollback, demo.

Handlers import the heavy stack (torch, prefect, mlflow, great_expectations) themselves, after
``configure_environment`` has pointed Prefect at the project's home and switched telemetry
off, so ``unlearn --help`` stays fast and ``~/.prefect`` is never touched by surprise.
Without a server, each command runs its flow on Prefect's temporary local server (about
10 s to start in a fresh process). Prefect logs at WARNING unless PREFECT_LOGGING_LEVEL says
otherwise.

Schedules need a real Prefect server (the temporary one cannot schedule)::

    PREFECT_HOME=$PWD/.prefect prefect server start --host 127.0.0.1 --port 4200 &
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    unlearn serve --cron "0 3 * * *"      # or --interval 3600; runs until Ctrl-C / SIGTERM

Under a worker instead of ``serve`` (runs survive the shell; several hosts can share a pool)::

    prefect work-pool create unlearning --type process
    prefect --no-prompt deploy flows/pipeline.py:process_deletions_flow -n nightly \\
        -p unlearning --cron "0 3 * * *" --param home="$PWD"
    prefect worker start --pool unlearning
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from flows.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, Failure, UsageError, version_number


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="train the base model; register version 1 as champion")
    p.add_argument("--dataset", help="dataset name (default: params.yaml dataset.name)")
    p.add_argument("--model", help="architecture: small-cnn or resnet18 (default: params.yaml)")
    p.add_argument("--epochs", type=int, help="training epochs (default: params.yaml)")
    p.add_argument("--seed", type=int, help="training seed (default: params.yaml)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=cmd_pretrain)

    p = sub.add_parser("submit", help="validate a deletion manifest and queue it as a batch")
    p.add_argument("file", help="CSV or JSON-lines manifest: request_id, instance_id, "
                                "objective (misclassify|relabel), new_label (relabel only)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=cmd_submit)

    p = sub.add_parser("run", help="process every pending batch now (a Prefect flow run)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=cmd_run)

    p = sub.add_parser("serve", help="process pending batches on a schedule (Prefect "
                                     "deployment; needs `prefect server start`)")
    when = p.add_mutually_exclusive_group(required=True)
    when.add_argument("--cron", help='cron expression, e.g. "0 3 * * *"')
    when.add_argument("--interval", type=int, help="seconds between runs")
    p.add_argument("--name", default="scheduled", help="deployment name (default: scheduled)")
    p.set_defaults(handler=cmd_serve)

    p = sub.add_parser("releases", help="list model versions with lineage, metrics, aliases")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(handler=cmd_releases)

    p = sub.add_parser("requests", help="list deletion batches and requests with their state")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(handler=cmd_requests)

    p = sub.add_parser("promote", help="make VERSION the champion (guarded)")
    p.add_argument("version", type=version_number)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=cmd_promote)

    p = sub.add_parser("rollback", help="point the champion back; refused if that would "
                                        "resurrect deleted data, unless --reapply")
    p.add_argument("--to", type=version_number, help="target version (default: the previous champion)")
    p.add_argument("--reapply", action="store_true",
                   help="replay the deletions the target lacks and register the result")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=cmd_rollback)

    p = sub.add_parser("demo", help="end to end on digits: pretrain, three batches (one "
                                    "invalid), promotions, the rollback guard")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=cmd_demo)


# -- helpers ----------------------------------------------------------------------------------


def context(check_ledger: bool = True):
    """Resolve the state folder, prepare the environment, load params.yaml."""
    from tasks.params import ParamsError, load_params
    from tasks.paths import Paths, configure_environment, find_home

    paths = Paths(find_home())
    configure_environment(paths)
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    try:
        cfg = load_params(paths.params_file)
    except ParamsError as e:
        raise UsageError(str(e)) from None
    if check_ledger and paths.ledger.exists():  # a damaged ledger stops here, before a flow
        from tasks.ledger import Ledger, LedgerError

        try:
            Ledger(paths.ledger).close()
        except LedgerError as e:
            raise Failure(str(e)) from None
    return paths, cfg


def require_dataset(cfg) -> None:
    """Load the dataset now (cached for the flows), so a missing one is a usage error."""
    from tasks.release import dataset_of
    from unlearning.data import DatasetError

    try:
        dataset_of(cfg)
    except DatasetError as e:
        raise UsageError(str(e)) from None


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


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}"
    if isinstance(v, (list, tuple)):
        return ",".join(str(x) for x in v) or "-"
    return str(v)


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


def run_flow(flow_fn, **kwargs: Any) -> dict[str, Any]:
    """Call a flow; an unexpected error becomes a one-line failure (Prefect logged the
    traceback; the ledger left every unfinished batch pending)."""
    temporary_server_dies_with_us()
    try:
        return flow_fn(**kwargs)
    except (UsageError, Failure):
        raise
    except Exception as e:  # noqa: BLE001  (any crash: one line; Prefect logged it)
        raise Failure(f"{e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                      "(nothing half-applied: unfinished batches stay pending)") from None


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


# -- commands ---------------------------------------------------------------------------------


def cmd_pretrain(args: argparse.Namespace) -> int:
    paths, cfg = context()
    from tasks.params import ParamsError

    try:
        cfg = cfg.with_overrides("dataset", name=args.dataset)
        cfg = cfg.with_overrides("pretrain", arch=args.model, epochs=args.epochs, seed=args.seed)
    except ParamsError as e:
        raise UsageError(str(e)) from None
    require_dataset(cfg)
    from flows.pipeline import pretrain_flow

    say(f"pretraining {cfg.pretrain.arch} on {cfg.dataset.name} for {cfg.pretrain.epochs} "
        f"epochs (state: {paths.home})")
    result = run_flow(pretrain_flow, home=str(paths.home), dataset=args.dataset,
                      arch=args.model, epochs=args.epochs, seed=args.seed)
    return finish(result, args.json, f"version {result.get('version')} is champion: test "
                  f"accuracy {result.get('test_acc', 0):.2f}% ({result.get('seconds', 0):.1f} s)")


def cmd_submit(args: argparse.Namespace) -> int:
    from pathlib import Path

    paths, cfg = context()
    from tasks import registry
    from tasks.submit import submit_manifest
    from tasks.validation import ManifestError

    manifest = Path(args.file)
    require_dataset(cfg)
    try:  # (tasks.registry, not flows.pipeline: a submit need not import Prefect)
        result = submit_manifest(paths, cfg, manifest, registry.input_shape(paths, cfg))
    except ManifestError as e:
        raise UsageError(str(e)) from None
    if result["duplicate"]:  # the same requests again: nothing recorded, the same answer
        if args.json:
            emit(result)
        else:
            print(f"{result['batch_id']}: already submitted ({result['state']}, "
                  f"{result['rows']} request(s)); nothing recorded")
        return EXIT_OK
    try:
        registry.log_validation(paths, cfg, result["batch_id"], Path(result["report"]),
                                Path(result["manifest"]),
                                {"success": result["state"] == "pending",
                                 "rows": result["rows"], "failures": result["failures"]})
    except Exception as e:  # noqa: BLE001  (the batch is recorded; the run only copies its report)
        say(f"warning: could not log the validation to MLflow: {e}")
    if args.json:
        emit(result)
        return EXIT_OK if result["state"] == "pending" else EXIT_FAILED
    if result["state"] != "pending":
        raise Failure(f"batch {result['batch_id']} rejected: {result['reason']}")
    print(f"{result['batch_id']}: accepted, {result['rows']} request(s) pending "
          "(run `unlearn run` or wait for the schedule)")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    paths, cfg = context()
    require_dataset(cfg)
    from flows.pipeline import process_deletions_flow

    say(f"processing pending batches (state: {paths.home})")
    result = run_flow(process_deletions_flow, home=str(paths.home))
    rejected = [b for b in result.get("batches", []) if b["state"] == "rejected"]
    if args.json:
        emit(result)
    elif result.get("status") != "ok":
        raise Failure(result.get("reason", "failed"))
    else:
        for b in result["batches"]:
            print(_batch_line(b))
        if not result["batches"]:
            print("no pending batches")
        print(f"champion: version {result['champion']}")
    return EXIT_FAILED if rejected or result.get("status") != "ok" else EXIT_OK


def _batch_line(b: dict[str, Any]) -> str:
    if b["state"] == "done":
        m = b["metrics"]
        return (f"{b['batch_id']}: done -> version {b['version']} (objective "
                f"{m['objective_rate']:.0f}%, test {m['test_acc']:.2f}% drop "
                f"{m['test_drop']:.2f}, {b['seconds']:.1f} s)")
    where = f" (version {b['version']} kept for audit)" if b.get("version") else ""
    return f"{b['batch_id']}: rejected{where}: {b['reason']}"


def cmd_serve(args: argparse.Namespace) -> int:
    paths, _ = context()
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise UsageError(
            "serve needs a Prefect server (the temporary one cannot schedule): run "
            "`prefect server start` and set PREFECT_API_URL=http://127.0.0.1:4200/api")
    from flows.pipeline import process_deletions_flow

    schedule = {"cron": args.cron} if args.cron else {"interval": args.interval}
    if args.interval is not None and args.interval < 1:
        raise UsageError("--interval must be at least 1 second")
    say(f"serving process-deletions/{args.name} ({schedule}) against {PREFECT_API_URL.value()}"
        f"; state: {paths.home}; Ctrl-C stops")
    process_deletions_flow.serve(name=args.name, parameters={"home": str(paths.home)},
                                 tags=["unlearning"], **schedule)
    return EXIT_OK


def cmd_releases(args: argparse.Namespace) -> int:
    paths, cfg = context()
    from tasks import registry
    from tasks.ledger import Ledger

    versions: list[dict[str, Any]] = []
    if paths.tracking_uri != paths.default_tracking_uri or (paths.mlruns / "mlflow.db").exists():
        client = registry.connect(paths, cfg)
        versions = registry.list_versions(client, cfg.registry.model_name)
    promotions = []
    if paths.ledger.exists():
        with Ledger(paths.ledger) as ledger:
            promotions = ledger.promotions()
    champion = next((v["version"] for v in versions if "champion" in v["aliases"]), None)
    if args.json:
        emit({"model": cfg.registry.model_name, "champion": champion, "versions": versions,
              "promotions": promotions})
        return EXIT_OK
    rows = [{"version": v["version"], "aliases": v["aliases"],
             "status": v["lineage"].get("status"), "parent": v["lineage"].get("parent_version"),
             "batch": v["lineage"].get("batch_id"), "objective": v["lineage"].get("objective"),
             "test_acc": v["metrics"].get("test_acc"), "drop": v["metrics"].get("test_drop"),
             "obj_rate": v["metrics"].get("objective_rate"),
             "weights": v["lineage"].get("weights_sha256", "")[:12]} for v in versions]
    print(f"model {cfg.registry.model_name} (champion: {champion or '-'})")
    print(table(rows, ["version", "aliases", "status", "parent", "batch", "objective",
                       "test_acc", "drop", "obj_rate", "weights"]))
    return EXIT_OK


def cmd_requests(args: argparse.Namespace) -> int:
    paths, _ = context()
    from tasks.ledger import Ledger

    batches: list[dict[str, Any]] = []
    requests: list[dict[str, Any]] = []
    if paths.ledger.exists():
        with Ledger(paths.ledger) as ledger:
            batches = [b.to_dict() for b in ledger.batches()]
            requests = ledger.requests()
    if args.json:
        emit({"batches": batches, "requests": requests})
        return EXIT_OK
    print(table(batches, ["batch_id", "state", "rows", "version", "reason"]))
    print()
    print(table(requests, ["batch_id", "row", "request_id", "instance_id", "objective",
                           "new_label", "state", "version"]))
    return EXIT_OK


def cmd_promote(args: argparse.Namespace) -> int:
    paths, _ = context()
    from flows.pipeline import promote_flow

    result = run_flow(promote_flow, version=args.version, home=str(paths.home))
    return finish(result, args.json, f"champion: version {result.get('champion')} "
                                     f"(was {result.get('previous')})")


def cmd_rollback(args: argparse.Namespace) -> int:
    paths, _ = context()
    from flows.pipeline import rollback_flow

    result = run_flow(rollback_flow, to=args.to, reapply=args.reapply, home=str(paths.home))
    line = f"champion: version {result.get('champion')} (was {result.get('previous')})"
    if result.get("replayed"):
        line += f"; replayed {', '.join(result['replayed'])} onto version {result['target']}"
    return finish(result, args.json, line)


def cmd_demo(args: argparse.Namespace) -> int:
    paths, cfg = context(check_ledger=False)  # demo names a foreign state itself
    require_dataset(cfg)
    from flows.demo import run_demo

    # the story goes to stdout as it happens; with --json, to stderr and the result to stdout
    tell = say if args.json else lambda line: print(line, flush=True)
    result = run_flow(run_demo, paths=paths, cfg=cfg, say=tell)
    if args.json:
        emit(result)
    return EXIT_OK if result["ok"] else EXIT_FAILED
