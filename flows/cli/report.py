"""``unlearn report VERSION``: one self-contained HTML page for a release, also logged to its
MLflow run."""

from __future__ import annotations

import argparse

from .errors import EXIT_OK, UsageError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write the HTML release report of VERSION and log it "
                                      "to the version's MLflow run")
    p.add_argument("version", type=int, help="model version number (see `unlearn releases`)")
    p.add_argument("--output", "-o", help="HTML file to write (default: "
                                          "artifacts/reports/v<VERSION>.html)")
    p.add_argument("--no-log", action="store_true",
                   help="only write the file; do not attach it to the MLflow run")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from .output import emit
    from .runtime import context, require_dataset

    paths, cfg = context()
    if args.version < 1:
        raise UsageError(f"version must be >= 1, got {args.version}")
    from flows.render.report import build_report
    from tasks import registry
    from tasks.report import ReportError, open_registry
    from unlearning.progress import ProgressLine

    try:  # an unknown version fails fast, before the dataset loads
        client = open_registry(paths, cfg)
        registry.version_info(client, cfg.registry.model_name, args.version)
    except (ReportError, registry.RegistryError) as e:
        raise UsageError(str(e)) from None
    require_dataset(cfg)
    bar = ProgressLine(f"report v{args.version}",
                       enabled=False if args.json else None)  # None: only on a terminal
    try:
        result = build_report(paths, cfg, args.version, args.output, log=not args.no_log,
                              progress=bar)
    except ReportError as e:
        raise UsageError(str(e)) from None
    finally:
        bar.close()
    if args.json:
        emit({k: v for k, v in result.items() if k != "data"})
        return EXIT_OK
    where = f"; logged to {result['artifact']}" if result["artifact"] else ""
    verdict = "gates passed" if result["gates_passed"] else "gates failed"
    print(f"{result['model']} version {args.version} ({verdict}): {result['path']} "
          f"({result['bytes'] / 1024:.0f} KiB){where}")
    return EXIT_OK
