"""``unlearn verify``: rebuild releases from their recorded lineage and compare weight hashes.

Each release is rebuilt with the pipeline's own task code (``tasks.repro.verify``): the base
model from ``params.yaml`` and ``data/dataset``, every other release from its parent's
registered weights plus its batch manifests, with the seed derived from the batch id. The
rebuilt ``weights_sha256`` must equal the registry's, the data files a release used must
equal the ones in its ``data_rev`` (DVC's listing of ``data/`` when it was registered), and
the files of its logged MLflow model (what consumers load) must equal the ``served_sha256``
recorded when it was registered (``tasks.served``).

Weights are reproducible bit for bit on the same device only: a release built on another
device (its ``device`` tag; none means the CPU) is rebuilt here but reported as not
comparable, never as a match it cannot prove.

Exit codes: 0 every release reproduced; 1 a release diverged (the message names the
version, the batch and both hashes, or the served file that changed) or cannot be compared
here (built on another device), or the ledger, the registry and data/ disagree
(``tasks.state_check``: the releases are still rebuilt);
2 bad input (unknown version, missing files, no
registry), with nothing changed.
"""

from __future__ import annotations

import argparse
from typing import Any

from .arguments import version_number
from .errors import EXIT_FAILED, EXIT_OK, Failure, UsageError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="rebuild releases from their lineage and compare the "
                                      "weight hashes with the registry")
    which = p.add_mutually_exclusive_group()
    which.add_argument("version", nargs="?", type=version_number,
                       help="the version to verify (default: the champion)")
    which.add_argument("--all", action="store_true", help="verify every version")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=cmd_verify)


def cmd_verify(args: argparse.Namespace) -> int:
    from .output import emit, say
    from .runtime import context, require_dataset, state_problem

    paths, cfg = context()
    damaged = state_problem(paths, cfg)  # verify still rebuilds what the registry records
    if paths.tracking_uri == paths.default_tracking_uri and not (
            paths.mlruns / "mlflow.db").exists():
        raise UsageError(f"no registry in {paths.home}: nothing to verify "
                         "(run `unlearn pretrain` or `unlearn demo` first)")
    require_dataset(cfg)
    cfg.runtime.apply()  # the thread count the releases were built with (float results)
    from tasks import registry
    from tasks.repro import VerifyInputError, verify

    client = registry.connect(paths, cfg)
    name = cfg.registry.model_name
    versions = registry.list_versions(client, name)
    if not versions:
        raise UsageError(f"{name} has no versions in {paths.home}: nothing to verify")
    if args.all:
        targets = [v["version"] for v in versions]
    elif args.version is not None:
        targets = [args.version]
    else:
        champion = registry.alias_version(client, name, registry.CHAMPION)
        if champion is None:
            raise UsageError(f"{name} has no champion: name a VERSION or use --all")
        targets = [champion]
    try:
        result = verify(paths, cfg, client, versions, targets, say=say)
    except VerifyInputError as e:
        raise UsageError(str(e)) from None
    if args.json:
        emit({**result, "state_problem": damaged})
        return EXIT_OK if result["status"] == "ok" and not damaged else EXIT_FAILED
    for r in result["releases"]:
        print(_line(r))
    if result["status"] != "ok":
        raise Failure(result["diverged"]["reason"])
    print(f"{len(result['releases'])} release(s) reproduced: weights equal to the registry's, "
          f"served models equal to their fingerprints ({result['seconds']:.1f} s)")
    if damaged:
        raise Failure(f"the releases reproduce, but {damaged}")
    return EXIT_OK


def _line(r: dict[str, Any]) -> str:
    what = (f"{','.join(r['batches'])} from version {r['parent']}" if r["parent"] is not None
            else "base model")
    if r["ok"]:
        across = "" if r.get("same_device", True) else \
            f" (built on {r['device']}, rebuilt on {r['rebuilt_on']})"
        return f"version {r['version']} ({what}): reproduced {r['recorded'][:12]}{across}"
    if not r.get("same_device", True) and not r["match"] and not r["findings"]:
        return (f"version {r['version']} ({what}): NOT COMPARABLE here: built on "
                f"{r['device']}, rebuilt on {r['rebuilt_on']}")
    return (f"version {r['version']} ({what}): DIVERGED rebuilt {str(r['rebuilt'])[:12]} "
            f"registry {r['recorded'][:12]}")
