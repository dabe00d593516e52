"""``unlearn repair``: rebuild a lost, emptied, damaged or behind record of the committed
deletions (the ledger, the registry's lineage tags and champion alias, ``data/`` under DVC)
from the other two, and say what was restored (``tasks.repair``).

Exit codes: 0 the three records agree (now, or already: "nothing to repair"); 1 something
cannot be rebuilt from the others (a lost registry, a changed served model): the line says
what and how to restore it, and nothing was changed; or another pipeline command is running.
"""

from __future__ import annotations

import argparse

from .errors import EXIT_FAILED, EXIT_OK, Failure


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("repair", help="rebuild a lost or damaged ledger (or lineage tags, "
                                      "champion alias, data/ manifests) from the other records")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=cmd_repair)


def cmd_repair(args: argparse.Namespace) -> int:
    from .output import emit
    from .runtime import context

    paths, cfg = context(check_ledger=False)  # a damaged ledger is what it is here for
    from tasks.repair import repair

    result = repair(paths, cfg)
    if args.json:
        emit(result)
        return EXIT_OK if result["status"] == "ok" else EXIT_FAILED
    for line in result["restored"]:
        print(f"restored: {line}")
    for line in result.get("lost", []):
        print(f"not restored: {line}")
    if result["status"] != "ok":
        raise Failure(result["reason"])
    if not result["problems_before"]:
        print("nothing to repair: the ledger, the registry and data/ agree")
    else:
        print(f"repaired {len(result['problems_before'])} problem(s): the ledger, the registry "
              "and data/ agree again")
    return EXIT_OK
