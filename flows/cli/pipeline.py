"""``unlearn`` commands that move deletions through the pipeline: pretrain, submit, run,
serve, demo.

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
from typing import Any

from .errors import EXIT_FAILED, EXIT_OK, Failure, UsageError
from .output import emit, finish, say
from .runtime import context, require_dataset, run_flow


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

    p = sub.add_parser("demo", help="end to end on digits: pretrain, three batches (one "
                                    "invalid), promotions, the rollback guard")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=cmd_demo)


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
