"""``unlearn`` commands about releases and requests: list them, promote a version, roll the
champion back (guarded against bringing deleted data back)."""

from __future__ import annotations

import argparse
from typing import Any

from .arguments import version_number
from .errors import EXIT_FAILED, EXIT_OK
from .output import emit, finish, table
from .runtime import context, refuse_if_damaged, run_flow, warn_if_damaged


def register(sub: argparse._SubParsersAction) -> None:
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


def cmd_releases(args: argparse.Namespace) -> int:
    paths, cfg = context()
    damaged = warn_if_damaged(paths, cfg)  # the listing still helps to see what is wrong
    from tasks import registry
    from tasks.ledger import Ledger

    versions: list[dict[str, Any]] = []
    if paths.tracking_uri != paths.default_tracking_uri or (paths.mlruns / "mlflow.db").exists():
        client = registry.connect(paths, cfg)
        versions = registry.list_versions(client, cfg.registry.model_name)
    promotions = []
    if paths.ledger.exists() and paths.ledger.stat().st_size > 0:  # (opening writes a schema)
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

def cmd_requests(args: argparse.Namespace) -> int:
    paths, cfg = context()
    refuse_if_damaged(paths, cfg)  # a lost ledger must not read as "no requests"
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
    keyed = ["instance_key"] if any(r.get("instance_key") for r in requests) else []
    print(table(requests, ["batch_id", "row", "request_id", "instance_id", *keyed, "objective",
                           "new_label", "state", "version"]))
    return EXIT_OK

def cmd_promote(args: argparse.Namespace) -> int:
    paths, cfg = context()
    refuse_if_damaged(paths, cfg, served=True)
    from flows.pipeline import promote_flow

    result = run_flow(promote_flow, version=args.version, home=str(paths.home))
    return finish(result, args.json, f"champion: version {result.get('champion')} "
                                     f"(was {result.get('previous')})")

def cmd_rollback(args: argparse.Namespace) -> int:
    paths, cfg = context()
    refuse_if_damaged(paths, cfg, served=True)
    from flows.pipeline import rollback_flow

    result = run_flow(rollback_flow, to=args.to, reapply=args.reapply, home=str(paths.home))
    line = f"champion: version {result.get('champion')} (was {result.get('previous')})"
    if result.get("replayed"):
        line += f"; replayed {', '.join(result['replayed'])} onto version {result['target']}"
    return finish(result, args.json, line)
