"""``unlearn audit REQUEST_ID|INSTANCE_ID``: what became of a deletion request, and whether
the current champion still honours it (a live check on the champion's weights).

Exit codes: 0 the request(s) found and every done deletion holds in the champion; 1 a done
deletion does not hold now (or the champion does not descend from the release that applied
it); 2 unknown id (nothing is changed).
"""

from __future__ import annotations

import argparse
from typing import Any

from .errors import EXIT_FAILED, EXIT_OK, Failure, UsageError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("audit", help="trace a deletion request (or every request for an "
                                     "instance id) to its release, and check the champion "
                                     "still honours it")
    p.add_argument("ident", metavar="REQUEST_ID|INSTANCE_ID",
                   help="a request id from a manifest, an instance key (an image's path "
                        "in its folder, or its index-file id) or an integer instance id")
    p.add_argument("--json", action="store_true", help="print the audit as one JSON object")
    p.set_defaults(handler=cmd_audit)


def cmd_audit(args: argparse.Namespace) -> int:
    from .output import emit
    from .runtime import context, refuse_if_damaged

    paths, cfg = context()
    refuse_if_damaged(paths, cfg)  # the ledger it reads must agree with the other records
    from tasks.audit import AuditError, audit
    from tasks.registry import RegistryError
    from unlearning.models import CheckpointError

    try:
        result = audit(paths, cfg, args.ident)
    except AuditError as e:
        raise UsageError(str(e)) from None
    except (RegistryError, CheckpointError) as e:
        raise Failure(f"cannot load the champion for the live check: {e}") from None
    _add_attempts(paths, result)
    if args.json:
        emit(result)
        return EXIT_OK if result["ok"] else EXIT_FAILED
    print(render(result))
    served = result.get("served") or {}
    if served.get("ok") is False:
        raise Failure(f"{served['reason']}: the champion's deletions cannot be vouched for "
                      "in what consumers load")
    if not result["ok"]:
        raise Failure("a deletion does not hold in the current champion "
                      f"(version {result['champion']})")
    return EXIT_OK


def _add_attempts(paths, result: dict[str, Any]) -> None:
    """Each request's release attempts (version, method, gate failures with their values)."""
    from tasks.ledger import Ledger
    from tasks.obligations import attempts_of, status_of

    with Ledger(paths.ledger) as ledger:
        for r in result["requests"]:
            batch = ledger.batch(r["batch_id"])
            r["attempts"] = attempts_of(batch) if batch else []
            r["status"] = status_of(batch) if batch else None


def _attempt_lines(r: dict[str, Any]) -> list[str]:
    lines = []
    for a in r.get("attempts") or []:
        head = (f"  attempt {a['attempt']}: version {a['version']} ({a['method']}"
                + (f", escalated from version {a['escalated_from']}" if a.get("escalated_from")
                   else "") + "): " + ("passed" if a["passed"] else "FAILED"))
        lines.append(head)
        if not a["passed"]:
            lines += [f"    {f.get('detail') or f['gate']}" for f in a.get("failures") or []]
    return lines


def render(result: dict[str, Any]) -> str:
    """The human block: one paragraph per request."""
    champ = result["champion"]
    head = (f"audit {result['query']}: {len(result['requests'])} request(s); model "
            f"{result['model']}, champion version {champ if champ is not None else '-'}")
    lines = [head]
    for r in result["requests"]:
        target = f" -> new label {r['new_label']}" if r["objective"] == "relabel" else ""
        lines.append("")
        key = f" ({r['instance_key']})" if r.get("instance_key") else ""
        lines.append(f"request {r['request_id']}  instance {r['instance_id']}{key}  "
                     f"{r['objective']}{target}")
        lines.append(f"  requested  {r['requested']}  (batch {r['batch_id']})")
        state = r["batch_state"]
        if r.get("reason"):
            state += f": {r['reason']}"
        if r.get("kept_version"):
            state += f" (version {r['kept_version']} kept for audit, never served)"
        lines.append(f"  state      {state}" + (f"  [{r['status']}]" if r.get("status") else ""))
        lines += _attempt_lines(r)
        rel = r["release"]
        if rel is None:
            lines.append("  removed by -  (not applied to any release)")
            continue
        m = rel["metrics"]
        shown = ", ".join(f"{k} {m[k]:.2f}" for k in ("objective_rate", "test_acc",
                                                         "test_drop", "mia_efficacy") if k in m)
        first = r.get("applied_by")
        again = f", replaying version {first}'s deletion" if first not in (None, rel["version"]) \
            else ""
        lines.append(f"  removed by version {rel['version']} ({rel['created']}, "
                     f"gates {'passed' if rel['gates_passed'] else 'failed'}{again}): "
                     f"{shown or '-'}")
        lines.append("  lineage    champion "
                     + ("descends from" if r["in_champion_lineage"] else "does NOT descend from")
                     + f" version {rel['version']}")
        live = r["live"]
        if live is not None:
            verdict = "HOLDS" if live["holds"] else "DOES NOT HOLD"
            lines.append(f"  live check {verdict}: champion predicts {live['prediction']} "
                         f"({live['rule']})")
    served = result.get("served")
    if served is not None:
        lines.append("")
        lines.append("served model " + ("matches its fingerprint from registration "
                                        f"({str(served['served_sha256'])[:12]})"
                                        if served["ok"] else
                                        f"CHANGED: {served['reason']}" if served["ok"] is False
                                        else f"not checked: {served['reason']}"))
    lines.append("")
    lines.append("result: " + ("ok" if result["ok"] else "FAILED"))
    return "\n".join(lines)
