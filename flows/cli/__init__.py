"""``unlearn``: the one command. Subcommands register themselves from small modules so each
area (library commands, the release pipeline, reports) owns its own file; heavy imports
happen inside the handlers so ``unlearn --help`` stays fast.

Exit codes: 0 ok, 1 gate or validation failure (or a refusal, a busy pipeline, a damaged
state), 2 usage error (bad arguments or input). Every error is one line on stderr,
``unlearn COMMAND: error|failed: REASON``; ``UNLEARN_DEBUG=1`` re-raises unexpected errors
with their traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .arguments import Parser
from .errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, Failure, UsageError

# Modules that add subcommands: each has ``register(subparsers)``.
COMMAND_MODULES = ("flows.cli.pipeline", "flows.cli.releases", "flows.cli.audit",
                   "flows.cli.verify", "flows.cli.repair", "flows.cli.report", "flows.cli.ui",
                   "flows.cli.library")












def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="unlearn",
        description="Instance-wise machine unlearning as a release pipeline "
                    "(Cha et al., AAAI 2024): delete training instances from a deployed "
                    "classifier and ship every deletion batch as a gated, versioned release.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue  # an area not installed in this checkout
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a bad command line (2, one line already printed)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    if not getattr(args, "handler", None):
        parser.print_help()
        return EXIT_USAGE
    previous = os.environ.get("UNLEARN_PROGRESS")
    if getattr(args, "json", False) is True:
        os.environ["UNLEARN_PROGRESS"] = "0"  # machine-readable output: no progress bars
    try:
        return int(args.handler(args) or EXIT_OK)
    except UsageError as e:
        print(f"unlearn {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Failure as e:
        print(f"unlearn {args.command}: failed: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line, not a traceback; UNLEARN_DEBUG=1 shows it
        if os.environ.get("UNLEARN_DEBUG"):
            raise
        from tasks.ledger import LedgerError

        text = str(e).splitlines()[0] if str(e) else ""
        if isinstance(e, LedgerError):
            print(f"unlearn {args.command}: failed: {text}", file=sys.stderr)
        else:
            print(f"unlearn {args.command}: failed: unexpected {e.__class__.__name__}: {text} "
                  "(UNLEARN_DEBUG=1 shows the traceback)", file=sys.stderr)
        return EXIT_FAILED
    finally:  # in-process callers (tests) get their environment back
        if previous is None:
            os.environ.pop("UNLEARN_PROGRESS", None)
        else:
            os.environ["UNLEARN_PROGRESS"] = previous


if __name__ == "__main__":
    sys.exit(main())
