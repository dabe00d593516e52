"""``unlearn`` commands that move deletions through the pipeline: pretrain, adopt, submit,
run, serve, demo.

``unlearn run --watch SECONDS`` stays in one process and releases batches as they are
submitted: the stack is imported and Prefect started once. Prefect's runner (``serve``, a
worker) starts a fresh process for every flow run instead, which pays the imports each time.

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

from .arguments import positive_count, watch_seconds
from .errors import EXIT_FAILED, EXIT_OK, Failure, UsageError
from .output import emit, finish, say
from .runtime import (
    context,
    load_release_stack,
    refuse_if_damaged,
    require_dataset,
    run_flow,
    start_prefect_early,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="train the base model; register version 1 as champion")
    p.add_argument("--dataset", help="dataset name (default: params.yaml dataset.name)")
    p.add_argument("--model", help="architecture: small-cnn, resnet18, torchvision:NAME, "
                                    "timm:NAME or package.module:function (default: "
                                    "params.yaml)")
    p.add_argument("--epochs", type=int, help="training epochs (default: params.yaml)")
    p.add_argument("--seed", type=int, help="training seed (default: params.yaml)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=cmd_pretrain)

    p = sub.add_parser(
        "adopt", help="register a model you already have as version 1 (champion)",
        description="Adopt a deployed classifier: its weights (a state_dict file and an "
                    "architecture, or a model in another MLflow store) become version 1 and "
                    "the first champion, evaluated on the held-out split of params.yaml's "
                    "dataset. Releases keep its input contract and classes: consumers feed "
                    "them their own preprocessed input, as before. Only into an empty "
                    "registry.")
    src = p.add_argument_group("source (one of)")
    src.add_argument("--weights", metavar="FILE",
                     help="a state_dict saved with torch.save(model.state_dict(), FILE); read "
                          "weights-only (no pickled code)")
    src.add_argument("--from-mlflow", metavar="URI",
                     help="a model in an MLflow store: models:/NAME/VERSION, models:/NAME@ALIAS "
                          "or runs:/RUN_ID/PATH")
    src.add_argument("--source-tracking-uri", metavar="URI",
                     help="the store --from-mlflow reads (default: the project's tracking URI)")
    src.add_argument("--allow-pickle", action="store_true",
                     help="consent to unpickling a model logged with "
                          "serialization_format='pickle' (runs code from that store)")
    p.add_argument("--arch", help="its architecture: torchvision:NAME (e.g. "
                                  "torchvision:resnet18), timm:NAME, package.module:function "
                                  "(called with num_classes=), small-cnn or resnet18")
    contract = p.add_argument_group(
        "input contract: the preprocessing the model was trained with, applied to the "
        "dataset's [0, 1] pixels (default: none: pixels as torchvision's ToTensor gives them)")
    contract.add_argument("--mean", metavar="M[,M,M]", help="normalisation mean per channel")
    contract.add_argument("--std", metavar="S[,S,S]", help="normalisation std per channel")
    contract.add_argument("--image-size", type=int, metavar="N",
                          help="side the network takes (bilinear resize; default: the "
                               "dataset's)")
    contract.add_argument("--channels", type=int, choices=(1, 3),
                          help="channels the network takes (gray is repeated to 3; default: "
                               "3 for torchvision/timm, else the dataset's)")
    contract.add_argument("--preprocessing", metavar="FILE",
                          help="a JSON object with any of mean, std, image_size, channels, "
                               "classes (options given on the command line win)")
    contract.add_argument("--classes", metavar="A,B,...",
                          help="the model's classes in output order, checked against the "
                               "dataset's")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=cmd_adopt)

    p = sub.add_parser("submit", help="validate a deletion manifest and queue it as a batch")
    p.add_argument("file", help="CSV or JSON-lines manifest: request_id, instance_id, "
                                "objective (misclassify|relabel), new_label (relabel only)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=cmd_submit)

    p = sub.add_parser(
        "run", help="process every pending batch now (a Prefect flow run)",
        description="Process every pending batch now, in submission order, each from the "
                    "current champion. With --watch the command stays: every SECONDS it "
                    "looks for batches submitted since and processes them in the same process, "
                    "so the stack is loaded and Prefect started once, not for every batch. "
                    "Ctrl-C or SIGTERM stops it: at once while it waits (exit 0); during a "
                    "flow run, that run ends where it is and its unfinished batches stay "
                    "pending for the next run (exit 143 for SIGTERM, 130 for Ctrl-C). "
                    "Without --watch, while a watcher watches the same state, the command "
                    "wakes it and prints its pass instead of loading the stack itself.")
    p.add_argument("--json", action="store_true",
                   help="print the result as JSON (with --watch: one line per pass)")
    p.add_argument("--watch", type=watch_seconds, metavar="SECONDS",
                   help="keep running and look for new batches every SECONDS (1 to 86400)")
    p.add_argument("--stop-after", type=positive_count, metavar="N",
                   help="with --watch: stop after N passes that processed batches")
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
    start_prefect_early()
    require_dataset(cfg)
    _check_arch(cfg.pretrain.arch)
    from tasks.state_check import new_base_refusal

    why = new_base_refusal(paths, cfg, "pretrain")  # never a base that holds deleted data
    if why:
        raise Failure(why)
    from flows.pipeline import pretrain_flow

    say(f"pretraining {cfg.pretrain.arch} on {cfg.dataset.name} for {cfg.pretrain.epochs} "
        f"epochs (state: {paths.home})")
    result = run_flow(pretrain_flow, home=str(paths.home), dataset=args.dataset,
                      arch=args.model, epochs=args.epochs, seed=args.seed)
    return finish(result, args.json, f"version {result.get('version')} is champion: test "
                  f"accuracy {result.get('test_acc', 0):.2f}% ({result.get('seconds', 0):.1f} s)")

def _check_arch(arch: str) -> None:
    from unlearning.models import ArchitectureError, check_arch

    try:
        check_arch(arch)
    except ArchitectureError as e:
        raise UsageError(str(e)) from None


def _floats(text: str, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"{what} must be comma-separated numbers, got {text!r}") from None
    return values


def _adopt_request(args: argparse.Namespace):
    """The AdoptRequest of the command line (and --preprocessing), or a UsageError."""
    import json
    from pathlib import Path

    from tasks.adopt import AdoptError, AdoptRequest

    given: dict[str, Any] = {}
    if args.preprocessing:
        try:
            given = json.loads(Path(args.preprocessing).read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise UsageError(f"--preprocessing {args.preprocessing}: cannot read a JSON object "
                             f"({e.__class__.__name__})") from None
        known = {"mean", "std", "image_size", "channels", "classes"}
        if not isinstance(given, dict) or set(given) - known:
            raise UsageError(f"--preprocessing {args.preprocessing}: expected a JSON object with "
                             f"keys among {', '.join(sorted(known))}")
    mean = _floats(args.mean, "--mean") if args.mean else given.get("mean")
    std = _floats(args.std, "--std") if args.std else given.get("std")
    size = args.image_size if args.image_size is not None else given.get("image_size")
    channels = args.channels if args.channels is not None else given.get("channels")
    classes = args.classes.split(",") if args.classes else given.get("classes")
    for what, value in (("mean", mean), ("std", std)):
        if value is not None and (not isinstance(value, list) or not value or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
            raise UsageError(f"{what} must be a list of numbers, got {value!r}")
    if size is not None and (not isinstance(size, int) or not 4 <= size <= 4096):
        raise UsageError(f"image size must be an integer from 4 to 4096, got {size!r}")
    if channels is not None and channels not in (1, 3):
        raise UsageError(f"channels must be 1 or 3, got {channels!r}")
    if classes is not None and (not isinstance(classes, list)
                                or not all(isinstance(c, str) for c in classes)):
        raise UsageError(f"classes must be a list of names, got {classes!r}")
    if args.source_tracking_uri and not args.from_mlflow:
        raise UsageError("--source-tracking-uri goes with --from-mlflow")
    if args.allow_pickle and not args.from_mlflow:
        raise UsageError("--allow-pickle goes with --from-mlflow (a --weights file is always "
                         "read weights-only)")
    if args.arch:
        _check_arch(args.arch)
    try:
        return AdoptRequest(
            arch=args.arch, weights=args.weights, from_mlflow=args.from_mlflow,
            source_tracking_uri=args.source_tracking_uri, allow_pickle=args.allow_pickle,
            mean=[float(v) for v in mean] if mean is not None else None,
            std=[float(v) for v in std] if std is not None else None,
            image_size=size, channels=channels, classes=classes)
    except AdoptError as e:
        raise UsageError(str(e)) from None


def cmd_adopt(args: argparse.Namespace) -> int:
    paths, cfg = context()
    request = _adopt_request(args)
    start_prefect_early()
    require_dataset(cfg)
    from flows.pipeline import adopt_flow

    result = run_flow(adopt_flow, request=request.to_dict(), home=str(paths.home))
    for warning in result.get("warnings") or []:
        say(f"warning: {warning}")
    contract = result.get("input_contract") or {}
    return finish(result, args.json, (
        f"version {result.get('version')} is champion: {result.get('source_format')} from "
        f"{result.get('source')}, held-out accuracy {result.get('test_acc', 0):.2f}% "
        f"(consumers feed it: {', '.join(contract.get('preprocessing', [])) or 'pixels'})"))


def cmd_submit(args: argparse.Namespace) -> int:
    from pathlib import Path

    paths, cfg = context()
    from tasks import registry
    from tasks.submit import submit_manifest
    from tasks.validation import ManifestError

    manifest = Path(args.file)
    refuse_if_damaged(paths, cfg, served=True)  # no new deletion on a damaged state
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
    if args.stop_after is not None and args.watch is None:
        raise UsageError("--stop-after needs --watch")
    if args.watch is None:
        handed = _hand_to_watcher(args)
        if handed is not None:
            return handed
    paths, cfg = context()
    start_prefect_early()
    refuse_if_damaged(paths, cfg, served=True)
    require_dataset(cfg)
    from flows.pipeline import process_deletions_flow

    if args.watch is not None:
        load_release_stack()
        return _watch(args, paths, process_deletions_flow)
    if _has_pending(paths):
        load_release_stack(suites=False)
    say(f"processing pending batches (state: {paths.home})")
    return _report_run(args, run_flow(process_deletions_flow, home=str(paths.home)))


def _print_run(result: dict[str, Any]) -> None:
    for b in result["batches"]:
        print(_batch_line(b), flush=True)
    if not result["batches"]:
        print("no pending batches", flush=True)
    for c in result.get("consolidations") or []:
        print(consolidation_line(c), flush=True)
    if result.get("champion") is not None:
        print(f"champion: version {result['champion']}", flush=True)


REWAKE_S = 2.0  # a pass skipped for a held lock waits out --watch: the wake is repeated
SETTLE_S = 5.0  # a batch the ledger calls released, with no pass line for it after this


def _hand_to_watcher(args: argparse.Namespace) -> int | None:
    """A one-shot ``unlearn run`` while ``unlearn run --watch`` watches the same state: the
    watcher, whose stack is loaded, releases the batches that are pending now (``tasks.watcher``
    wakes it), and this command prints what its passes say, as if it had run them; nothing
    heavier than the ledger is imported here. None when no watcher is there.

    The wait ends when every batch pending at the start has its pass line, or the ledger says
    it was released and no line came (another command released it, or the watcher died
    before writing its line: the command's line then comes from the ledger); a pass that fails
    fails this command with its line (exit 2 when the pass refused its input, such as
    params.yaml, as this command would have without a watcher; else 1), and a watcher that
    ends before its batches are done leaves them pending, as a killed run does."""
    from tasks.paths import Paths, find_home
    from tasks.watcher import watcher_running

    # params.yaml is not loaded here: the watcher reloads and checks it every pass, and a
    # pass that refuses it fails this command with its line (exit 2)
    paths = Paths(find_home())
    if not watcher_running(paths):
        return None
    import time

    from tasks.watcher import WAKE_POLL_S, PassLog, wake

    passes = PassLog(paths)  # before the listing: a pass that ends after it is in the log
    wanted = [b.batch_id for b in _ledger_batches(paths, "pending")]  # a LedgerError: one line
    result: dict[str, Any] = {"status": "ok", "batches": [], "consolidations": [],
                              "champion": None, "watcher": True}
    if not wanted:
        say(f"a watcher watches this state ({paths.home}); nothing is pending")
        return _report_run(args, result)
    say(f"handing {len(wanted)} pending batch(es) to the watcher of {paths.home}")
    found: dict[str, dict[str, Any]] = {}
    settled: dict[str, float] = {}
    woke = float("-inf")
    alive = True
    while True:  # bounded by the watcher's life: it writes its line, or it ends
        look = not alive or time.monotonic() - woke >= REWAKE_S  # at the ledger too
        if look:
            wake(paths)
            woke = time.monotonic()
        for p in passes.new_passes():
            if p.get("status") != "ok":
                if p.get("bad_input"):  # params.yaml refused: bad input, as without a watcher
                    raise UsageError(f"the watcher's pass refused its input: {p.get('reason')}")
                raise Failure(f"the watcher's pass failed: {p.get('reason', 'failed')}")
            mine = [b for b in p.get("batches", []) if b.get("batch_id") in wanted]
            found.update((b["batch_id"], b) for b in mine)
            if mine or p.get("consolidations"):
                result["consolidations"] += p.get("consolidations") or []
                result["champion"] = p.get("champion", result["champion"])
        missing = [i for i in wanted if i not in found]
        records = {b.batch_id: b for b in _ledger_batches(paths)} if missing and look else {}
        for i in missing:  # released without a line from a watcher: the ledger's word
            if i in records and records[i].state != "pending":
                settled.setdefault(i, time.monotonic())
                if not alive or time.monotonic() - settled[i] >= SETTLE_S:
                    found[i] = {"batch_id": i, "state": records[i].state,
                                "version": records[i].version,
                                "reason": records[i].reason or "", "from_ledger": True}
        still = [i for i in wanted if i not in found]
        if not still:
            break
        if not alive:
            raise Failure(f"the watcher stopped before releasing {', '.join(still)}: "
                          f"{'it stays' if len(still) == 1 else 'they stay'} pending; run "
                          "`unlearn run` again")
        alive = watcher_running(paths)  # one more look at the log after it ended
        time.sleep(WAKE_POLL_S)
    result["batches"] = [found[i] for i in wanted]
    return _report_run(args, result)


def _report_run(args: argparse.Namespace, result: dict[str, Any]) -> int:
    rejected = [b for b in result.get("batches", []) if b["state"] == "rejected"]
    if args.json:
        emit(result)
    elif result.get("status") != "ok":
        raise Failure(result.get("reason", "failed"))
    else:
        _print_run(result)
    return EXIT_FAILED if rejected or result.get("status") != "ok" else EXIT_OK


def _watch(args: argparse.Namespace, paths, process_deletions_flow) -> int:
    """``run --watch``: a pass (the flow, which checks the state first) whenever the ledger
    holds pending batches, else a wait of ``--watch`` seconds, cut short when a one-shot
    ``unlearn run`` wakes it (``tasks.watcher``: that command then prints this pass's result,
    which every pass appends to the pass log). Each pass reloads params.yaml.

    It ends after ``--stop-after`` passes; on SIGTERM, at once while it waits (exit 0) and,
    during a flow run, the way Prefect stops one (the run ends where it is, its unfinished
    batches stay pending for the next run, as after a killed one-shot run: exit 143); on
    Ctrl-C the same (exit 130); and on the first pass that fails: a damaged state or a
    crash ends the command with that line (exit 1) rather than failing again every
    SECONDS. A pass refused because another pipeline command holds the lock waits for the
    next look."""
    import json
    import signal
    import threading
    import time

    from prefect.exceptions import TerminationSignal

    from tasks.faults import fault
    from tasks.watcher import WAKE_POLL_S, record_pass, watching, woken

    stop = threading.Event()

    def pause(seconds: float) -> None:
        """Wait ``seconds``, or less: until SIGTERM or a one-shot run's wake."""
        end = time.monotonic() + seconds
        while not stop.is_set() and time.monotonic() < end and not woken(paths):
            stop.wait(min(WAKE_POLL_S, max(end - time.monotonic(), 0)))

    def failed(reason: str, bad_input: bool = False) -> str:
        # for a waiting run, which exits as this command does: 2 for bad input, else 1
        record_pass(paths, {"status": "failed", "reason": reason, "bad_input": bad_input})
        return reason

    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    passes = 0
    try:
        with watching(paths):
            say(f"watching for pending batches every {args.watch:g} s (state: {paths.home}); "
                "Ctrl-C or SIGTERM stops")
            while not stop.is_set() and passes < (args.stop_after or float("inf")):
                if not _has_pending(paths):
                    pause(args.watch)
                    continue
                start = time.perf_counter()
                say("pass: pending batches found")
                # params.yaml re-read and checked; the records are checked by the flow, under
                # the pipeline lock (a damaged state is its one-line answer), not twice a pass
                try:
                    paths, _ = context()
                except (UsageError, Failure) as e:
                    failed(str(e), bad_input=isinstance(e, UsageError))
                    raise
                if stop.is_set():
                    break
                try:
                    result = run_flow(process_deletions_flow, home=str(paths.home))
                except TerminationSignal:
                    say("unlearn run: stopped by SIGTERM during a flow run (nothing "
                        "half-applied: unfinished batches stay pending)")
                    return 128 + signal.SIGTERM
                except (UsageError, Failure) as e:
                    failed(str(e), bad_input=isinstance(e, UsageError))
                    raise
                result["seconds"] = time.perf_counter() - start
                if result.get("busy"):
                    say(f"skipped a pass: {result['reason']}")
                    pause(args.watch)
                    continue
                if result.get("status") != "ok":
                    raise Failure(failed(result.get("reason", "failed")))
                fault("after:watch_pass")
                record_pass(paths, result)
                passes += 1
                if args.json:
                    print(json.dumps(result, default=str), flush=True)
                else:
                    _print_run(result)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return EXIT_OK


def _has_pending(paths) -> bool:
    return bool(_ledger_batches(paths, "pending"))


def _ledger_batches(paths, state: str | None = None) -> list[Any]:
    """The ledger's batches (in ``state``); none before the ledger exists."""
    from tasks.ledger import Ledger, ledger_present

    if not ledger_present(paths.ledger):
        return []
    with Ledger(paths.ledger) as ledger:
        return ledger.batches(state)

def consolidation_line(c: dict[str, Any]) -> str:
    """One consolidation (``flows.pipeline._consolidate_if_due``) as the run reports it."""
    head = (f"consolidated: version {c['version']}, an exact retrain of version "
            f"{c['parent']}'s history ({c['reason']})")
    if c["passed"]:
        return f"{head}; test {c['test_acc']:.2f}%, the new base ({c['seconds']:.1f} s)"
    return f"{head}; failed its gates ({', '.join(c['gates']['failures'])}), not promoted"


def _batch_line(b: dict[str, Any]) -> str:
    attempts = b.get("attempts") or []
    if b.get("from_ledger"):  # no pass line for it (another command, or a watcher that died)
        return (f"{b['batch_id']}: {b['state']}"
                + (f" -> version {b['version']}" if b.get("version") else "")
                + (f": {b['reason']}" if b.get("reason") else "")
                + " (as the ledger records it: no pass reported it)")
    if b["state"] == "done":
        m = b["metrics"]
        failed = [str(a["version"]) for a in attempts if not a["passed"]]
        how = (f", escalated: {attempts[-1]['method']} after version(s) {', '.join(failed)} "
               "failed their gates" if failed else "")
        return (f"{b['batch_id']}: done{' (exact)' if b.get('exact') else ''} -> version "
                f"{b['version']} (objective {m['objective_rate']:.0f}%, test "
                f"{m['test_acc']:.2f}% drop {m['test_drop']:.2f}, {b['seconds']:.1f} s{how})")
    where = f" (version {b['version']} kept for audit)" if b.get("version") else ""
    if attempts:  # its release failed: the requests stay open obligations
        where += f", requests still open: `unlearn retry {b['batch_id']}`"
    return f"{b['batch_id']}: rejected{where}: {b['reason']}"

def cmd_serve(args: argparse.Namespace) -> int:
    paths, cfg = context()
    refuse_if_damaged(paths, cfg)  # (each scheduled run checks again, in the flow)
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
    start_prefect_early()
    require_dataset(cfg)
    from flows.demo import run_demo

    # the story goes to stdout as it happens; with --json, to stderr and the result to stdout
    tell = say if args.json else lambda line: print(line, flush=True)
    result = run_flow(run_demo, paths=paths, cfg=cfg, say=tell)
    if args.json:
        emit(result)
    return EXIT_OK if result["ok"] else EXIT_FAILED
