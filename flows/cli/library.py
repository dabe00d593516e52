"""Library-level commands: ``unlearn methods`` and ``unlearn bench``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return values


def _value(raw: str) -> object:
    """A parameter value: JSON when it parses (1e-3, true, "margin"), else the text."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _key_and_raw(text: str) -> tuple[str, str, str]:
    """``method.key=RAW`` split into (method, key, RAW)."""
    key, sep, raw = text.partition("=")
    method, dot, name = key.partition(".")
    if not sep or not dot or not method or not name:
        raise argparse.ArgumentTypeError(f"expected METHOD.KEY=VALUE, got {text!r}")
    return method, name, raw


def _param(text: str) -> tuple[str, str, object]:
    """``method.key=value``, the value parsed by :func:`_value`."""
    method, name, raw = _key_and_raw(text)
    return method, name, _value(raw)


def _sweep(text: str) -> tuple[str, str, list[object]]:
    """``method.key=v1,v2,...``, each value parsed by :func:`_value`."""
    method, name, raw = _key_and_raw(text)
    return method, name, [_value(piece) for piece in raw.split(",")]


def register(sub) -> None:
    p = sub.add_parser("methods", help="list the unlearning methods and their parameters")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_methods)

    p = sub.add_parser(
        "bench", help="benchmark methods x k x seed (optionally against retraining)",
        description="Pre-train (or load) a model, then unlearn seeded random forget sets with "
                    "each method; prints a table and writes one JSON object per run. Runs "
                    "as a Prefect flow on a Dask cluster (a local one by default), or in "
                    "this process with --serial; the rows are the same either way, except "
                    "timings.")
    p.add_argument("--dataset", default="digits", help="digits | fashion-mnist | cifar10 | ...")
    p.add_argument("--data-dir", default=None, help="where the dataset files are (if needed)")
    p.add_argument("--model", default="small-cnn",
                   help="small-cnn | resnet18 | torchvision:NAME | timm:NAME | "
                        "package.module:function")
    p.add_argument("--methods", default="neggrad,l2ul-reference,l2ul",
                   help="comma-separated method names (see `unlearn methods`)")
    p.add_argument("--objective", default="misclassify",
                   help="misclassify | relabel | misclassify,relabel (shares the retrains)")
    p.add_argument("--k", type=_int_list, default=[8, 32], help="forget-set sizes, e.g. 8,32,128")
    p.add_argument("--seeds", type=_int_list, default=[0], help="forget-set seeds, e.g. 0,1,2")
    p.add_argument("--retrain", action="store_true",
                   help="also retrain from scratch without each forget set (the exact reference)")
    p.add_argument("--retain-fraction", type=float, default=0.0,
                   help="give methods that accept one a retain sample of this share (<= 0.01)")
    p.add_argument("--ablation", action="store_true",
                   help="expand l2ul into its ablation: each change switched off alone")
    p.add_argument("--set", dest="params", type=_param, action="append", default=[],
                   metavar="METHOD.KEY=VALUE", help="override a method parameter (repeatable)")
    p.add_argument("--vary", type=_sweep, default=None, metavar="METHOD.KEY=V1,V2,...",
                   help="run METHOD once per value of one parameter, side by side on the same "
                        "forget sets (rows labelled 'METHOD KEY=VALUE')")
    p.add_argument("--epochs", type=int, default=None,
                   help="pre-training epochs (default: 30 for digits, 5 otherwise)")
    p.add_argument("--checkpoint", default=None,
                   help="pre-trained checkpoint to use (default: cached under artifacts/bench/)")
    p.add_argument("--json", dest="json_out", default=None, metavar="FILE",
                   help="write the list of runs here")
    p.add_argument("--markdown", default=None, metavar="FILE", help="write the summary table here")
    p.add_argument("--device", default="auto",
                   help="auto (a GPU when torch sees one) | cpu | cuda | cuda:N: where models "
                        "train and unlearn (every Dask worker uses it too)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads per process (default: 1 per Dask worker; torch's "
                        "default with --serial)")
    p.add_argument("--rounds", type=int, default=None, metavar="R",
                   help="continual mode: R disjoint batches of k each, each round unlearning "
                        "its own batch from the previous round's model; reports every round")
    p.add_argument("--include-earlier", action="store_true",
                   help="continual mode: earlier batches join each round's forget set (the "
                        "release pipeline's unlearn.include_earlier); default: own batch only")
    run = p.add_argument_group("where it runs (Prefect flow on Dask by default)")
    run.add_argument("--serial", action="store_true",
                     help="run in this process, without Prefect or Dask")
    run.add_argument("--workers", type=int, default=2,
                     help="local Dask cluster: worker processes, 1 thread each (default 2)")
    run.add_argument("--dask-address", default=None, metavar="ADDR",
                     help="use the running Dask scheduler at ADDR (tcp://host:8786) instead")
    out = p.add_argument_group("outputs")
    out.add_argument("--plots", default=None, metavar="DIR",
                     help="write PNG plots (test drop vs k, trade-off; continual) here")
    out.add_argument("--mlflow", action="store_true",
                     help="log params, aggregated metrics and the outputs to the MLflow "
                          "experiment 'bench' of the project's tracking URI")
    out.add_argument("--quiet", action="store_true", help="no per-run lines on stderr")
    out.add_argument("--metrics", default=None, metavar="FILE",
                     help="write the aggregated metrics (means per method, objective and k) "
                          "as one flat JSON object, as DVC metrics")
    p.set_defaults(handler=cmd_bench)


def cmd_methods(args) -> int:
    import dataclasses

    from unlearning.methods import get_method, list_methods

    items = []
    for name in list_methods():
        info = get_method(name)
        items.append({"name": name, "summary": info.summary,
                      "retain": "required" if info.needs_retain else
                      "optional" if info.accepts_retain else "no",
                      "objectives": list(info.objectives),
                      "params": dataclasses.asdict(info.config_cls())})
    if args.json:
        print(json.dumps(items, indent=2))
    else:
        for it in items:
            print(f"{it['name']:16s} {it['summary']} (retain sample: {it['retain']}; "
                  f"objectives: {', '.join(it['objectives'])})")
    return 0


def _check_bench_args(args) -> None:
    from .errors import UsageError

    if not 0.0 <= args.retain_fraction <= 0.01:
        raise UsageError("--retain-fraction must be between 0 and 0.01 (at most 1% of train)")
    if args.threads is not None and args.threads < 1:
        raise UsageError("--threads must be >= 1")
    if args.epochs is not None and args.epochs < 1:
        raise UsageError("--epochs must be >= 1")
    if any(k < 1 for k in args.k):
        raise UsageError("--k values must be >= 1")
    if args.workers < 1:
        raise UsageError("--workers must be >= 1")
    if args.rounds is not None and args.rounds < 1:
        raise UsageError("--rounds must be >= 1")
    if args.serial and args.dask_address:
        raise UsageError("--serial and --dask-address exclude each other")
    if args.include_earlier and not args.rounds:
        raise UsageError("--include-earlier needs --rounds")
    if args.rounds and (args.retrain or args.retain_fraction or args.ablation):
        raise UsageError("--rounds does not combine with --retrain, --retain-fraction or "
                         "--ablation")


def _bench_model(args, ds):
    """(checkpoint path, model): the given checkpoint, the cached one, or pre-train and cache."""
    from unlearning.devices import resolve_device
    from unlearning.models import CheckpointError, load_checkpoint, save_checkpoint
    from unlearning.progress import ProgressLine
    from unlearning.train import pretrain

    from .errors import UsageError

    epochs = args.epochs or (30 if ds.name == "digits" else 5)
    cache = Path(args.checkpoint or os.path.join(
        os.environ.get("UNLEARN_HOME", "."), "artifacts", "bench",
        f"{ds.name}-{args.model}-e{epochs}-s0.pt")).resolve()
    if cache.exists():
        try:
            model, spec = load_checkpoint(cache, device=resolve_device(args.device))
        except CheckpointError as e:
            raise UsageError(str(e)) from None
        if spec.arch != args.model and not args.checkpoint:
            raise UsageError(f"{cache} holds a {spec.arch}, not a {args.model}")
    elif args.checkpoint:
        raise UsageError(f"checkpoint {cache} does not exist")
    else:
        from unlearning.train import TrainConfig

        bar = ProgressLine(f"pretrain {ds.name}/{args.model}")
        model, spec = pretrain(ds, args.model, TrainConfig(epochs=epochs, seed=0), bar,
                               device=resolve_device(args.device))
        bar.close()
        save_checkpoint(cache, model, spec)
    return cache, model, epochs


def _check_methods_fit(methods: list[str], objectives: tuple[str, ...],
                      retain_fraction: float) -> None:
    """Refuse up front what would fail half-way through a sweep."""
    from unlearning.methods import get_method

    from .errors import UsageError

    for m in methods:
        info = get_method(m)
        # Without a retain sample the bench gives `retrain` the whole training split minus
        # the forget set (benchmark.exact_retrain); every other such method needs the sample.
        if info.needs_retain and retain_fraction <= 0 and m != "retrain":
            raise UsageError(f"method {m} needs a retain sample: add --retain-fraction (<= 0.01)")
        missing = [o for o in objectives if o not in info.objectives]
        if missing:
            raise UsageError(f"method {m} does not support objective {', '.join(missing)} "
                             f"(it supports {', '.join(info.objectives)})")


def cmd_bench(args) -> int:
    import dataclasses
    import time

    from .errors import UsageError

    _check_bench_args(args)
    if not args.serial:  # Prefect in the project's home, offline; before prefect is imported
        from tasks.paths import Paths, configure_environment, find_home

        configure_environment(Paths(find_home()))
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
        if args.dask_address:
            from flows.bench import scheduler_problem

            problem = scheduler_problem(args.dask_address)
            if problem:
                raise UsageError(problem)

    import torch

    from unlearning import benchmark as B
    from unlearning.datasets import DatasetError, load_dataset
    from unlearning.devices import DeviceError, describe_device, resolve_device
    from unlearning.models import ArchitectureError, check_arch
    from unlearning.train import TrainConfig, accuracy

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        check_arch(args.model)
        device = resolve_device(args.device)
    except (ArchitectureError, DeviceError) as e:
        raise UsageError(str(e)) from None
    overrides: dict[str, dict] = {}
    for method, key, value in args.params:
        overrides.setdefault(method, {})[key] = value
    methods = [m for m in args.methods.split(",") if m]
    objectives = tuple(o for o in args.objective.split(",") if o)
    known = ("misclassify", "relabel", "as-if-unseen")
    if not objectives or any(o not in known for o in objectives):
        raise UsageError(f"--objective must be a comma-separated list of {', '.join(known)}, "
                         f"got {args.objective!r}")
    try:
        variants = B.variants_for(methods, args.ablation, overrides, args.vary)
        ds = load_dataset(args.dataset, args.data_dir)
    except (KeyError, ValueError, DatasetError) as e:
        raise UsageError(str(e)) from None
    _check_methods_fit(methods, objectives, args.retain_fraction)
    needed = max(args.k) * (args.rounds or 1)
    if needed > ds.num_train:
        raise UsageError(f"{needed} forget instances (k x rounds) exceed the {ds.num_train} "
                         "training instances")

    checkpoint, model, epochs = _bench_model(args, ds)
    where = ("serial" if args.serial else f"Dask scheduler {args.dask_address}"
             if args.dask_address else f"local Dask cluster, {args.workers} workers x 1 thread")
    print(f"# {ds.name} / {args.model}: test accuracy {accuracy(model, ds.test_x, ds.test_y):.2f}%"
          f", objective {args.objective}, k={args.k}, seeds={args.seeds}"
          + (f", rounds={args.rounds}" if args.rounds else "") + f"; {where}; "
          f"{describe_device(device)}", file=sys.stderr)
    spec = {
        "dataset": ds.name, "data_dir": args.data_dir, "checkpoint": str(checkpoint),
        "variants": [dataclasses.asdict(v) for v in variants], "objectives": list(objectives),
        "ks": list(args.k), "seeds": list(args.seeds), "retrain": args.retrain,
        "retain_fraction": args.retain_fraction, "rounds": args.rounds,
        "include_earlier": args.include_earlier,
        "train": dataclasses.asdict(TrainConfig(epochs=epochs, seed=0)),
        "threads": args.threads or (torch.get_num_threads() if args.serial else 1),
        "device": args.device,
    }
    from flows.bench import run_bench

    started = time.time()
    rows, seconds = run_bench(spec, args.serial, args.workers, args.dask_address, args.quiet)
    print(f"# {len(rows)} runs in {seconds:.1f} s ({where})", file=sys.stderr)
    table = B.continual_summary(rows) if args.rounds else B.summary_table(rows)
    md = B.markdown_table(table)
    print(md)
    _write_outputs(args, spec, rows, md, {"wall_seconds": seconds, "started": started})
    return 0


def _write_outputs(args, spec: dict, rows: list[dict], md: str, timing: dict) -> None:
    files: list[Path] = []
    for target, text in ((args.json_out, json.dumps(rows, indent=1)), (args.markdown, md)):
        if target:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            Path(target).write_text(text)
            files.append(Path(target))
    if args.metrics:
        from flows.render.bench import aggregate_metrics

        metrics = {**aggregate_metrics(rows), "runs": len(rows)}
        Path(args.metrics).parent.mkdir(parents=True, exist_ok=True)
        Path(args.metrics).write_text(json.dumps(metrics, indent=1, sort_keys=True) + "\n")
    if args.plots or args.mlflow:
        import tempfile

        from flows.render import bench as R

        folder = Path(args.plots) if args.plots else Path(tempfile.mkdtemp(prefix="bench-"))
        pngs = R.plot_continual(rows, folder) if args.rounds else R.plot_sweep(rows, folder)
        if args.plots:
            print(f"# plots: {', '.join(str(p) for p in pngs)}", file=sys.stderr)
        files += pngs
    if args.mlflow:
        from tasks.paths import Paths, configure_environment, find_home

        paths = Paths(find_home())
        configure_environment(paths)
        if paths.tracking_uri == paths.default_tracking_uri:
            paths.mlruns.mkdir(parents=True, exist_ok=True)
        import tempfile

        scratch = Path(tempfile.mkdtemp(prefix="bench-mlflow-"))
        for given, name, text in ((args.json_out, "rows.json", json.dumps(rows, indent=1)),
                                  (args.markdown, "summary.md", md)):
            if not given:  # log the rows and the table even when no file was asked for
                (scratch / name).write_text(text)
                files.append(scratch / name)
        params = {k: v for k, v in spec.items() if k not in ("variants", "train")}
        params.update(methods=",".join(v["label"] for v in spec["variants"]),
                      overrides=json.dumps({v["label"]: v["params"] for v in spec["variants"]}),
                      epochs=spec["train"]["epochs"], model=args.model,
                      runner="serial" if args.serial else args.dask_address or
                      f"local-dask-{args.workers}")
        from tasks.bench_log import EXPERIMENT, log_to_mlflow

        metrics = {**R.aggregate_metrics(rows), "wall_seconds": timing["wall_seconds"],
                   "runs": len(rows)}
        run_id = log_to_mlflow(paths.tracking_uri, paths.artifact_root, params, metrics, files)
        print(f"# MLflow: experiment {EXPERIMENT!r}, run {run_id} ({paths.tracking_uri})",
              file=sys.stderr)
