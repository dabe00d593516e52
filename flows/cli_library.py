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


def _param(text: str) -> tuple[str, str, object]:
    """``method.key=value`` with value parsed as JSON when possible (1e-3, true, "margin")."""
    key, sep, raw = text.partition("=")
    method, dot, name = key.partition(".")
    if not sep or not dot or not method or not name:
        raise argparse.ArgumentTypeError(f"expected METHOD.KEY=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return method, name, value


def register(sub) -> None:
    p = sub.add_parser("methods", help="list the unlearning methods and their parameters")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_methods)

    p = sub.add_parser(
        "bench", help="benchmark methods x k x seed (optionally against retraining)",
        description="Pre-train (or load) a model, then unlearn seeded random forget sets with "
                    "each method; prints a table and writes one JSON object per run.")
    p.add_argument("--dataset", default="digits", help="digits | fashion-mnist | cifar10 | ...")
    p.add_argument("--data-dir", default=None, help="where the dataset files are (if needed)")
    p.add_argument("--model", default="small-cnn", help="small-cnn | resnet18")
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
    p.add_argument("--epochs", type=int, default=None,
                   help="pre-training epochs (default: 30 for digits, 5 otherwise)")
    p.add_argument("--checkpoint", default=None,
                   help="pre-trained checkpoint to use (default: cached under artifacts/bench/)")
    p.add_argument("--json", dest="json_out", default=None, metavar="FILE",
                   help="write the list of runs here")
    p.add_argument("--markdown", default=None, metavar="FILE", help="write the summary table here")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
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
                      "params": dataclasses.asdict(info.config_cls())})
    if args.json:
        print(json.dumps(items, indent=2))
    else:
        for it in items:
            print(f"{it['name']:16s} {it['summary']} (retain sample: {it['retain']})")
    return 0


def cmd_bench(args) -> int:
    from flows.cli import UsageError

    if not 0.0 <= args.retain_fraction <= 0.01:
        raise UsageError("--retain-fraction must be between 0 and 0.01 (at most 1% of train)")
    if args.threads is not None and args.threads < 1:
        raise UsageError("--threads must be >= 1")
    if args.epochs is not None and args.epochs < 1:
        raise UsageError("--epochs must be >= 1")
    if any(k < 1 for k in args.k):
        raise UsageError("--k values must be >= 1")

    import torch

    from unlearning import benchmark as B
    from unlearning.data import DatasetError, load_dataset
    from unlearning.models import (
        ARCHITECTURES,
        CheckpointError,
        build_model,
        load_checkpoint,
        save_checkpoint,
        spec_for,
    )
    from unlearning.progress import ProgressLine
    from unlearning.train import TrainConfig, accuracy, pretrain

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model not in ARCHITECTURES:
        raise UsageError(f"unknown model {args.model!r}; choose one of {', '.join(ARCHITECTURES)}")
    overrides: dict[str, dict] = {}
    for method, key, value in args.params:
        overrides.setdefault(method, {})[key] = value
    methods = [m for m in args.methods.split(",") if m]
    objectives = tuple(o for o in args.objective.split(",") if o)
    if not objectives or any(o not in ("misclassify", "relabel") for o in objectives):
        raise UsageError(f"--objective must be misclassify, relabel or both, got {args.objective!r}")
    try:
        variants = B.variants_for(methods, args.ablation, overrides)
        ds = load_dataset(args.dataset, args.data_dir)
    except (KeyError, ValueError, DatasetError) as e:
        raise UsageError(str(e).strip("'\"")) from None
    if max(args.k) > ds.num_train:
        raise UsageError(f"--k {max(args.k)} exceeds the {ds.num_train} training instances")

    epochs = args.epochs or (30 if ds.name == "digits" else 5)
    train_cfg = TrainConfig(epochs=epochs, seed=0)
    spec = spec_for(args.model, ds)
    cache = Path(args.checkpoint or os.path.join(
        os.environ.get("UNLEARN_HOME", "."), "artifacts", "bench",
        f"{ds.name}-{args.model}-e{epochs}-s0.pt"))
    if cache.exists():
        try:
            model, spec = load_checkpoint(cache)
        except CheckpointError as e:
            raise UsageError(str(e)) from None
    elif args.checkpoint:
        raise UsageError(f"checkpoint {cache} does not exist")
    else:
        bar = ProgressLine(f"pretrain {ds.name}/{args.model}")
        model, spec = pretrain(ds, args.model, train_cfg, bar)
        bar.close()
        save_checkpoint(cache, model, spec)
    print(f"# {ds.name} / {args.model}: test accuracy {accuracy(model, ds.test_x, ds.test_y):.2f}%"
          f", objective {args.objective}, k={args.k}, seeds={args.seeds}", file=sys.stderr)

    def factory():
        return build_model(spec)

    def log(row: dict) -> None:  # one line per run on stderr (the table goes to stdout)
        print(f"  {row['method']:22s} {row['objective']:11s} k={row['k']:<4d} seed={row['seed']} "
              f"reached={row['reached']!s:5s} test drop {row['test_drop']:6.2f} pp "
              f"steps {row['steps']:5d} {row['unlearn_seconds']:7.2f}s", file=sys.stderr,
              flush=True)

    config = B.BenchConfig(variants=variants, objectives=objectives, ks=tuple(args.k),
                           seeds=tuple(args.seeds), retrain=args.retrain,
                           retain_fraction=args.retain_fraction, train=train_cfg)
    rows = B.run_benchmark(ds, model, factory, config, log)
    for r in rows:
        r.update(dataset=ds.name, model=args.model)
    table = B.summary_table(rows)
    md = B.markdown_table(table)
    print(md)
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(rows, indent=1))
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(md)
    return 0
