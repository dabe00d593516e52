"""``unlearn`` commands about releases and requests: list them, promote a version, roll the
champion back (guarded against bringing deleted data back)."""

from __future__ import annotations

import argparse
from typing import Any

from .arguments import version_number
from .errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from .output import emit, finish, table
from .runtime import (
    context,
    refuse_if_damaged,
    run_flow,
    start_prefect_early,
    warn_if_damaged,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("releases", help="list model versions with lineage, metrics, aliases")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(handler=cmd_releases)

    p = sub.add_parser("requests", help="list deletion batches and requests with their state; "
                                        "open obligations with their age")
    p.add_argument("--overdue", type=days, metavar="DAYS",
                   help="list only the open requests submitted more than DAYS days ago")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(handler=cmd_requests)

    p = sub.add_parser("retry", help="re-queue a batch whose release failed its gates (or, "
                                     "with --method, retry it now with that method)")
    p.add_argument("batch", help="the batch id (`unlearn requests`)")
    p.add_argument("--method", help="retry now with this method alone (e.g. retrain-exact; "
                                    "its params: its unlearn.fallback entry's, else defaults)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=cmd_retry)

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


def cmd_releases(args: argparse.Namespace) -> int:
    paths, cfg = context(read_only=True)
    damaged = warn_if_damaged(paths, cfg)  # the listing still helps to see what is wrong
    from tasks import registry
    from tasks.ledger import Ledger, ledger_present

    versions: list[dict[str, Any]] = []
    if paths.tracking_uri != paths.default_tracking_uri or (paths.mlruns / "mlflow.db").exists():
        versions = registry.read_versions(paths, cfg)
    promotions = []
    if ledger_present(paths.ledger):  # (opening writes a schema)
        with Ledger(paths.ledger) as ledger:
            promotions = ledger.promotions()
    champion = next((v["version"] for v in versions if "champion" in v["aliases"]), None)
    status = EXIT_FAILED if damaged else EXIT_OK
    if args.json:
        emit({"model": cfg.registry.model_name, "champion": champion, "versions": versions,
              "promotions": promotions, "damaged": damaged})
        return status
    rows = [{"version": v["version"], "aliases": v["aliases"],
             "status": v["lineage"].get("status"), "parent": v["lineage"].get("parent_version"),
             "batch": v["lineage"].get("batch_id"), "objective": v["lineage"].get("objective"),
             "test_acc": v["metrics"].get("test_acc"), "drop": v["metrics"].get("test_drop"),
             "obj_rate": v["metrics"].get("objective_rate"),
             "weights": v["lineage"].get("weights_sha256", "")[:12]} for v in versions]
    print(f"model {cfg.registry.model_name} (champion: {champion or '-'})")
    print(table(rows, ["version", "aliases", "status", "parent", "batch", "objective",
                       "test_acc", "drop", "obj_rate", "weights"]))
    return status

def days(text: str) -> float:
    """--overdue DAYS: a finite number of days >= 0."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < 1e6:
        raise argparse.ArgumentTypeError(f"expected a number of days >= 0, got {text[:40]!r}")
    return value


def cmd_requests(args: argparse.Namespace) -> int:
    paths, cfg = context(read_only=True)
    refuse_if_damaged(paths, cfg, snapshot=True)  # a lost ledger must not read as "no requests"
    from tasks.ledger import Ledger, ledger_present
    from tasks.obligations import listing

    found: dict[str, Any] = {"batches": [], "requests": [], "open": []}
    if ledger_present(paths.ledger):
        with Ledger(paths.ledger) as ledger:
            found = listing(ledger, overdue_days=args.overdue)
    if args.json:
        emit({**found, "overdue_days": args.overdue})
        return EXIT_OK
    keyed = ["instance_key"] if any(r.get("instance_key") for r in found["requests"]) else []
    open_rows = [{**r, "age": _age(r["age_days"])} for r in found["open"]]
    if args.overdue is not None:
        print(f"{len(open_rows)} open request(s) older than {args.overdue:g} day(s)")
        if open_rows:
            print(table(open_rows, ["request_id", "batch_id", "objective", "submitted", "age",
                                    "open_because"]))
        return EXIT_OK
    print(table(found["batches"], ["batch_id", "status", "rows", "version", "reason"]))
    print()
    print(table(found["requests"], ["batch_id", "row", "request_id", "instance_id", *keyed,
                                    "objective", "new_label", "status", "version"]))
    print()
    print(f"{len(open_rows)} open request(s)" + (" (oldest first):" if open_rows else ""))
    if open_rows:
        print(table(open_rows, ["request_id", "batch_id", "submitted", "age", "open_because"]))
    return EXIT_OK


def _age(age_days: float) -> str:
    hours = age_days * 24
    return f"{age_days:.1f} d" if hours >= 24 else f"{hours:.1f} h"


def cmd_retry(args: argparse.Namespace) -> int:
    paths, cfg = context()
    start_prefect_early()
    refuse_if_damaged(paths, cfg, served=True)
    from flows.pipeline import retry_flow

    result = run_flow(retry_flow, batch_id=args.batch, method=args.method,
                      home=str(paths.home))
    failed = [b for b in result.get("batches", []) if b["state"] != "done"]
    if args.json:
        emit(result)
        status = result.get("status")
        return (EXIT_USAGE if status == "invalid" else
                EXIT_FAILED if status != "ok" or failed else EXIT_OK)
    if result.get("status") != "ok" or not result.get("batches"):
        return finish(result, False, f"{args.batch}: pending again (the next `unlearn run` "
                                     "applies it with the escalation policy)")
    from .pipeline import _batch_line, consolidation_line

    print(_batch_line(result["batches"][0]))
    for c in result.get("consolidations") or []:
        print(consolidation_line(c))
    print(f"champion: version {result['champion']}")
    return EXIT_FAILED if failed else EXIT_OK

def cmd_promote(args: argparse.Namespace) -> int:
    paths, cfg = context()
    start_prefect_early()
    refuse_if_damaged(paths, cfg, served=True)
    from flows.pipeline import promote_flow

    result = run_flow(promote_flow, version=args.version, home=str(paths.home))
    return finish(result, args.json, f"champion: version {result.get('champion')} "
                                     f"(was {result.get('previous')})")

def cmd_rollback(args: argparse.Namespace) -> int:
    paths, cfg = context()
    start_prefect_early()
    refuse_if_damaged(paths, cfg, served=True)
    from flows.pipeline import rollback_flow

    result = run_flow(rollback_flow, to=args.to, reapply=args.reapply, home=str(paths.home))
    line = f"champion: version {result.get('champion')} (was {result.get('previous')})"
    if result.get("replayed"):
        line += f"; replayed {', '.join(result['replayed'])} onto version {result['target']}"
    return finish(result, args.json, line)
