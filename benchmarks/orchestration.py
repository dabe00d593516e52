"""Where the wall time of a deletion batch goes, and how fast the interactive commands answer.

In a fresh state folder (the project's params.yaml, the embedded digits data, consolidation
switched off so that every run is one batch; the escalation policy stays on), the script
runs the real CLI, one process per command, as an operator would: ``unlearn pretrain``,
then ``--batches`` rounds of ``unlearn submit`` (a manifest of ``--k`` misclassify rows never
used before) and ``unlearn run --json``. For each run it records the process's wall time and
splits it into the unlearning step (the method's own seconds, every attempt, from the run's
JSON) and everything else (interpreter start and imports, Prefect's temporary server,
validation, evaluation, registration, DVC tracking). Then, with ``--batches + 1`` releases
registered, it times ``--help``, ``releases``, ``requests`` and ``audit REQUEST`` ``--repeat``
times each (median and max): the commands an operator types and waits for.

    python benchmarks/orchestration.py                     # about 5 min on 2 cores
    python benchmarks/orchestration.py --batches 9 --k 8 --out benchmarks/results/orchestration.json

Writes the rows as JSON (``--out``), a Markdown table next to it (``.md``) and the headline
numbers as DVC metrics (``--metrics``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
UNLEARN = [sys.executable, "-m", "flows"]
LISTINGS = (("--help",), ("releases",), ("requests",))


def command(home: Path, *args: str, timeout: float = 1800) -> tuple[float, str]:
    """Run ``unlearn ARGS`` in its own process; (wall seconds, stdout). A failure stops the
    benchmark with the command's own error line."""
    env = {**os.environ, "UNLEARN_HOME": str(home), "UNLEARN_PROGRESS": "0"}
    env.pop("PREFECT_API_URL", None)  # the default: Prefect's temporary local server
    start = time.perf_counter()
    done = subprocess.run([*UNLEARN, *args], cwd=home, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SystemExit(f"unlearn {' '.join(args)} exited {done.returncode}: {tail}")
    return wall, done.stdout


def manifest(path: Path, batch: int, k: int) -> list[str]:
    """``k`` misclassify rows; ids spaced so that no two batches share an instance."""
    ids = [7 + 13 * (batch * k + i) for i in range(k)]
    rows = [f"bench-{batch}-{i},{x},misclassify," for i, x in enumerate(ids)]
    path.write_text("request_id,instance_id,objective,new_label\n" + "\n".join(rows) + "\n")
    return [f"bench-{batch}-{i}" for i in range(k)]


def timed(home: Path, args: tuple[str, ...], repeat: int) -> dict:
    walls = [command(home, *args)[0] for _ in range(repeat)]
    return {"command": " ".join(args), "median_s": statistics.median(walls),
            "max_s": max(walls), "runs": repeat}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=9, help="deletion batches (releases - 1)")
    ap.add_argument("--k", type=int, default=8, help="rows per batch")
    ap.add_argument("--repeat", type=int, default=5, help="timings per interactive command")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/orchestration.json")
    ap.add_argument("--metrics", type=Path, help="also write the headline numbers here")
    args = ap.parse_args()
    if not (1 <= args.batches <= 50 and 1 <= args.k <= 64 and 1 <= args.repeat <= 50):
        ap.error("--batches 1..50, --k 1..64, --repeat 1..50")

    home = Path(tempfile.mkdtemp(prefix="orchestration-"))
    try:
        params = yaml.safe_load((ROOT / "params.yaml").read_text())
        # one batch per run: no consolidation (a retrain) inside the measured runs
        params["unlearn"].update(consolidate_every=0, consolidate_drop=0.0)
        (home / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        pretrain_s, _ = command(home, "pretrain")
        runs, request = [], None
        for b in range(args.batches):
            ids = manifest(home / f"batch-{b}.csv", b, args.k)
            request = request or ids[0]
            submit_s, _ = command(home, "submit", str(home / f"batch-{b}.csv"))
            run_s, out = command(home, "run", "--json")
            found = json.loads(out)["batches"]
            if [x["state"] for x in found] != ["done"]:
                raise SystemExit(f"batch {b} was not released: {found}")
            unlearn_s, batch_s = found[0]["unlearn_seconds"], found[0]["seconds"]
            runs.append({"batch": b, "k": args.k, "submit_s": submit_s, "run_s": run_s,
                         "unlearn_s": unlearn_s, "rest_s": run_s - unlearn_s,
                         "rest_share": (run_s - unlearn_s) / run_s,
                         "in_flow_rest_s": batch_s - unlearn_s,
                         "start_s": run_s - batch_s,
                         "method": found[0]["attempts"][-1]["method"]})
        releases = len(json.loads(command(home, "releases", "--json")[1])["versions"])
        interactive = [timed(home, a, args.repeat) for a in LISTINGS]
        interactive.append(timed(home, ("audit", request), args.repeat))
    finally:
        shutil.rmtree(home, ignore_errors=True)

    share = statistics.median(r["rest_share"] for r in runs)
    result = {
        "benchmark": "orchestration", "dataset": "digits", "k": args.k,
        "batches": args.batches, "releases": releases, "pretrain_s": pretrain_s,
        "runs": runs, "interactive": interactive,
        "median_run_s": statistics.median(r["run_s"] for r in runs),
        "median_unlearn_s": statistics.median(r["unlearn_s"] for r in runs),
        "median_rest_share": share,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(render(result))
    if args.metrics:
        by = {i["command"].split()[0]: i["median_s"] for i in interactive}
        args.metrics.write_text(json.dumps({
            "run_median_s": round(result["median_run_s"], 2),
            "unlearn_median_s": round(result["median_unlearn_s"], 2),
            "rest_share_median": round(share, 3),
            "releases_median_s": round(by["releases"], 3),
            "requests_median_s": round(by["requests"], 3),
            "audit_median_s": round(by["audit"], 3),
            "help_median_s": round(by["--help"], 3)}, indent=2) + "\n")
    print(render(result))


def render(r: dict) -> str:
    lines = [f"# Orchestration: one k = {r['k']} batch per `unlearn run` on {r['dataset']}", "",
             (f"{r['batches']} batches, one process per command, Prefect's temporary local "
             f"server, {r['machine']['cpus']} CPUs. `unlearn` = the project's CLI."), "",
             ("Everything else = the process around the flow (interpreter, imports, Prefect's "
             "server, the state checks) + the batch's other steps in the flow (validation, "
             "evaluation, gates, registration, DVC)."), "",
             ("| batch | `run` wall s | unlearning s | everything else s | of it: process s "
             "| of it: other steps s | else share | method |"),
             "|---:|---:|---:|---:|---:|---:|---:|---|"]
    for x in r["runs"]:
        lines.append(f"| {x['batch']} | {x['run_s']:.1f} | {x['unlearn_s']:.1f} | "
                     f"{x['rest_s']:.1f} | {x['start_s']:.1f} | {x['in_flow_rest_s']:.1f} | "
                     f"{100 * x['rest_share']:.0f}% | {x['method']} |")
    lines += ["", (f"Median `run`: {r['median_run_s']:.1f} s, of which unlearning "
              f"{r['median_unlearn_s']:.1f} s; everything else "
              f"{100 * r['median_rest_share']:.0f}% of the wall time."), "",
              f"Interactive commands with {r['releases']} releases registered:", "",
              "| command | median s | max s | runs |", "|---|---:|---:|---:|"]
    for x in r["interactive"]:
        lines.append(f"| `unlearn {x['command']}` | {x['median_s']:.2f} | {x['max_s']:.2f} | "
                     f"{x['runs']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
