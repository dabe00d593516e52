"""Where the wall time of a deletion batch goes, and how fast the interactive commands answer.

In a fresh state folder (the project's params.yaml, the embedded digits data, consolidation
switched off so that every run is one batch; the escalation policy stays on), the script
runs the real CLI as an operator would: ``unlearn pretrain``, then two ways of releasing
``--batches`` batches of ``--k`` misclassify rows never used before:

- one-shot: per batch, ``unlearn submit`` and ``unlearn run --json``, one process each. The
  run's wall time splits into the unlearning step (the method's own seconds, every attempt,
  from the run's JSON) and everything else (interpreter start and imports, Prefect's
  temporary server, validation, evaluation, registration, DVC tracking);
- watching: one ``unlearn run --watch 1 --json`` process for all of them, and per batch an
  ``unlearn submit``; each pass (the flow run, timed inside the process) splits the same
  way. The watcher's start (imports, Prefect's server) is paid once and reported on its own;
- handed to a watcher: one ``unlearn run --watch 3600`` process, and per batch an ``unlearn
  submit`` and a one-shot ``unlearn run --json``, which wakes the watcher and answers with its
  pass (``tasks.watcher``); the run's wall time splits as the one-shot's does;
- one-shot against a lasting Prefect server: ``prefect server start`` in the state folder
  (started once, before the first batch) and ``PREFECT_API_URL`` pointing at it, then the
  one-shot commands again: what a running server saves a fresh process.

Then, with ``4 * --batches + 1`` releases registered, it times ``--help``, ``releases``,
``requests`` and ``audit REQUEST`` ``--repeat`` times each (median and max): the commands
an operator types and waits for.

    python benchmarks/orchestration.py                     # about 19 min on 2 cores
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
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
UNLEARN = [sys.executable, "-m", "flows"]
LISTINGS = (("--help",), ("releases",), ("requests",))
MODES = 4
ID_SPACING = 4
MAX_ROWS = 358  # distinct instance ids, 3 + ID_SPACING * (MAX_ROWS - 1) < 1,437


def unlearn_env(home: Path, api_url: str | None = None) -> dict[str, str]:
    """The environment of every ``unlearn`` process the benchmark starts: Prefect's temporary
    local server (the default), or the lasting one at ``api_url``."""
    env = {**os.environ, "UNLEARN_HOME": str(home), "UNLEARN_PROGRESS": "0"}
    env.pop("PREFECT_API_URL", None)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def command(home: Path, *args: str, timeout: float = 1800,
            api_url: str | None = None) -> tuple[float, str]:
    """Run ``unlearn ARGS`` in its own process; (wall seconds, stdout). A failure stops the
    benchmark with the command's own error line."""
    start = time.perf_counter()
    done = subprocess.run([*UNLEARN, *args], cwd=home, env=unlearn_env(home, api_url),
                          capture_output=True, text=True, timeout=timeout, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SystemExit(f"unlearn {' '.join(args)} exited {done.returncode}: {tail}")
    return wall, done.stdout


def submit(home: Path, batch: int, k: int) -> None:
    """``unlearn submit`` of ``k`` misclassify rows (requests ``bench-BATCH-I``); ids spaced
    so that no two batches share an instance (the three modes' batches fit in digits' 1,437
    training rows)."""
    ids = [3 + ID_SPACING * (batch * k + i) for i in range(k)]
    rows = [f"bench-{batch}-{i},{x},misclassify," for i, x in enumerate(ids)]
    path = home / f"batch-{batch}.csv"
    path.write_text("request_id,instance_id,objective,new_label\n" + "\n".join(rows) + "\n")
    command(home, "submit", str(path))


def split(b: int, k: int, wall: float, batch: dict) -> dict:
    """One batch's wall time split into unlearning and everything else."""
    unlearn_s = batch["unlearn_seconds"]
    return {"batch": b, "k": k, "run_s": wall, "unlearn_s": unlearn_s,
            "rest_s": wall - unlearn_s, "rest_share": (wall - unlearn_s) / wall,
            "in_flow_rest_s": batch["seconds"] - unlearn_s, "start_s": wall - batch["seconds"],
            "method": batch["attempts"][-1]["method"]}


def released(found: list[dict], b: int) -> dict:
    if [x["state"] for x in found] != ["done"]:
        raise SystemExit(f"batch {b} was not released: {found}")
    return found[0]


def one_shot(home: Path, batches: range, k: int, api_url: str | None = None) -> list[dict]:
    """``unlearn submit`` + ``unlearn run --json`` per batch, one process per command; on
    Prefect's temporary server, or on the lasting one at ``api_url``."""
    runs = []
    for b in batches:
        submit(home, b, k)
        run_s, out = command(home, "run", "--json", api_url=api_url)
        runs.append(split(b, k, run_s, released(json.loads(out)["batches"], b)))
    return runs


def start_watcher(home: Path, every: int, passes: int) -> tuple[subprocess.Popen, float]:
    """``unlearn run --watch EVERY --json --stop-after PASSES``, once it says it watches: (the
    process, seconds until then). Its stderr is read from then on as it comes, so a full
    pipe never stops it; its stdout is the caller's."""
    start = time.perf_counter()
    watcher = subprocess.Popen(
        [*UNLEARN, "run", "--watch", str(every), "--json", "--stop-after", str(passes)],
        cwd=home, env=unlearn_env(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    assert watcher.stderr is not None
    for line in watcher.stderr:  # "watching for pending batches ..." once it is ready
        if line.startswith("watching for pending batches"):
            threading.Thread(target=watcher.stderr.read, daemon=True).start()
            return watcher, time.perf_counter() - start
    code = watcher.wait()
    raise SystemExit(f"unlearn run --watch exited {code} before watching")


def watching(home: Path, batches: range, k: int, timeout: float = 1800) -> tuple[float, list[dict]]:
    """One ``unlearn run --watch 1 --json`` for every batch; each batch is submitted once the
    watcher has reported the one before. Returns (seconds until the watcher was ready to
    take the first batch, the passes)."""
    watcher, ready = start_watcher(home, 1, len(batches))
    try:
        assert watcher.stdout is not None
        runs = []
        for b in batches:
            submit(home, b, k)
            line = watcher.stdout.readline()
            if not line:
                raise SystemExit(f"unlearn run --watch exited {watcher.wait()} at batch {b}")
            passed = json.loads(line)
            runs.append(split(b, k, passed["seconds"], released(passed["batches"], b)))
        if watcher.wait(timeout=timeout) != 0:
            raise SystemExit(f"unlearn run --watch exited {watcher.returncode}")
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()
    return ready, runs


def handed_to_watcher(home: Path, batches: range, k: int) -> list[dict]:
    """``unlearn submit`` + ``unlearn run --json`` per batch, one process per command, beside
    one ``unlearn run --watch 3600`` that only a run's wake makes look before the hour."""
    watcher, _ = start_watcher(home, 3600, len(batches))
    try:
        assert watcher.stdout is not None
        threading.Thread(target=watcher.stdout.read, daemon=True).start()  # never a full pipe
        runs = []
        for b in batches:
            submit(home, b, k)
            run_s, out = command(home, "run", "--json")
            result = json.loads(out)
            if not result.get("watcher"):
                raise SystemExit(f"batch {b}: the run did not hand its batch to the watcher")
            runs.append(split(b, k, run_s, released(result["batches"], b)))
        if watcher.wait(timeout=120) != 0:
            raise SystemExit(f"unlearn run --watch exited {watcher.returncode}")
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()
    return runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lasting_server(home: Path, timeout: float = 180) -> tuple[subprocess.Popen, str, float]:
    """``prefect server start`` with its own database in ``home``; (the process, its API
    URL, seconds until /api/health answered)."""
    port = free_port()
    env = {**unlearn_env(home), "PREFECT_HOME": str(home / ".prefect-server"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    start = time.perf_counter()
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("prefect")), "server", "start", "--host",
         "127.0.0.1", "--port", str(port)], cwd=home, env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/api"
    while time.perf_counter() - start < timeout:
        if server.poll() is not None:
            raise SystemExit(f"prefect server start exited {server.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return server, url, time.perf_counter() - start
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise SystemExit(f"prefect server start did not answer within {timeout:.0f} s")


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
    if not (1 <= args.batches <= 50 and 1 <= args.k <= 64 and 1 <= args.repeat <= 50
            and MODES * args.batches * args.k <= MAX_ROWS):
        ap.error(f"--batches 1..50, --k 1..64, --repeat 1..50, and {MODES} * batches * k <= "
                 f"{MAX_ROWS} (distinct digits training rows for the {MODES} modes)")

    home = Path(tempfile.mkdtemp(prefix="orchestration-"))
    try:
        params = yaml.safe_load((ROOT / "params.yaml").read_text())
        # one batch per run: no consolidation (a retrain) inside the measured runs
        params["unlearn"].update(consolidate_every=0, consolidate_drop=0.0)
        (home / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        pretrain_s, _ = command(home, "pretrain")
        runs = one_shot(home, range(args.batches), args.k)
        watch_ready_s, watch_runs = watching(home, range(args.batches, 2 * args.batches),
                                             args.k)
        handed_runs = handed_to_watcher(home, range(2 * args.batches, 3 * args.batches),
                                        args.k)
        server, api_url, server_ready_s = lasting_server(home)
        try:
            served_runs = one_shot(home, range(3 * args.batches, 4 * args.batches), args.k,
                                   api_url)
        finally:
            server.terminate()
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:  # never left running past the benchmark
                server.kill()
                server.wait()
        releases = len(json.loads(command(home, "releases", "--json")[1])["versions"])
        interactive = [timed(home, a, args.repeat) for a in LISTINGS]
        interactive.append(timed(home, ("audit", "bench-0-0"), args.repeat))  # batch 0's first
    finally:
        shutil.rmtree(home, ignore_errors=True)

    result = {
        "benchmark": "orchestration", "dataset": "digits", "k": args.k,
        "batches": args.batches, "releases": releases, "pretrain_s": pretrain_s,
        "runs": runs, "interactive": interactive,
        "median_run_s": statistics.median(r["run_s"] for r in runs),
        "median_unlearn_s": statistics.median(r["unlearn_s"] for r in runs),
        "median_rest_share": statistics.median(r["rest_share"] for r in runs),
        "watch": {"ready_s": watch_ready_s, "runs": watch_runs,
                  "median_run_s": statistics.median(r["run_s"] for r in watch_runs),
                  "median_unlearn_s": statistics.median(r["unlearn_s"] for r in watch_runs),
                  "median_rest_share": statistics.median(r["rest_share"]
                                                         for r in watch_runs)},
        "handed": {
            "runs": handed_runs,
            "median_run_s": statistics.median(r["run_s"] for r in handed_runs),
            "median_unlearn_s": statistics.median(r["unlearn_s"] for r in handed_runs),
            "median_rest_share": statistics.median(r["rest_share"] for r in handed_runs)},
        "lasting_server": {
            "ready_s": server_ready_s, "runs": served_runs,
            "median_run_s": statistics.median(r["run_s"] for r in served_runs),
            "median_unlearn_s": statistics.median(r["unlearn_s"] for r in served_runs),
            "median_rest_share": statistics.median(r["rest_share"] for r in served_runs)},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(render(result))
    if args.metrics:
        by = {i["command"].split()[0]: i["median_s"] for i in interactive}
        watch = result["watch"]
        args.metrics.write_text(json.dumps({
            "run_median_s": round(result["median_run_s"], 2),
            "unlearn_median_s": round(result["median_unlearn_s"], 2),
            "rest_share_median": round(result["median_rest_share"], 3),
            "watch_pass_median_s": round(watch["median_run_s"], 2),
            "watch_unlearn_median_s": round(watch["median_unlearn_s"], 2),
            "watch_rest_share_median": round(watch["median_rest_share"], 3),
            "watch_ready_s": round(watch_ready_s, 2),
            "handed_run_median_s": round(result["handed"]["median_run_s"], 2),
            "handed_unlearn_median_s": round(result["handed"]["median_unlearn_s"], 2),
            "handed_rest_share_median": round(result["handed"]["median_rest_share"], 3),
            "server_run_median_s": round(result["lasting_server"]["median_run_s"], 2),
            "server_rest_share_median": round(result["lasting_server"]["median_rest_share"],
                                              3),
            "releases_median_s": round(by["releases"], 3),
            "requests_median_s": round(by["requests"], 3),
            "audit_median_s": round(by["audit"], 3),
            "help_median_s": round(by["--help"], 3)}, indent=2) + "\n")
    print(render(result))


def render(r: dict) -> str:
    w, h, ls = r["watch"], r["handed"], r["lasting_server"]
    lines = [f"# Orchestration: one k = {r['k']} batch at a time on {r['dataset']}", "",
             (f"{r['batches']} batches released one-shot (`unlearn run`, one process per "
              f"command), then {len(w['runs'])} by one `unlearn run --watch`, then "
              f"{len(h['runs'])} one-shot beside a watcher (each `unlearn run` hands its "
              "batch over), all on Prefect's temporary local server, then "
              f"{len(ls['runs'])} one-shot against a lasting `prefect server start`; "
              f"{r['machine']['cpus']} CPUs. `unlearn` = the project's CLI."), "",
             ("Everything else = the process around the flow (one-shot: interpreter, imports, "
              "Prefect's server, the state check; watching: the flow run's start and end; "
              "handed over: the command, the wake and the flow run's start and end) + "
              "the batch's other steps in the flow (the state check, validation, evaluation, "
              "gates, registration, DVC)."), ""]
    for title, runs in (("One-shot `unlearn run`", r["runs"]),
                        ("`unlearn run --watch`, one pass per batch", w["runs"]),
                        ("One-shot `unlearn run` handed to a watcher", h["runs"]),
                        ("One-shot `unlearn run` against a lasting Prefect server",
                         ls["runs"])):
        lines += [f"## {title}", "",
                  ("| batch | wall s | unlearning s | everything else s | of it: around the "
                   "flow s | of it: other steps s | else share | method |"),
                  "|---:|---:|---:|---:|---:|---:|---:|---|"]
        for x in runs:
            lines.append(f"| {x['batch']} | {x['run_s']:.1f} | {x['unlearn_s']:.1f} | "
                         f"{x['rest_s']:.1f} | {x['start_s']:.1f} | {x['in_flow_rest_s']:.1f} | "
                         f"{100 * x['rest_share']:.0f}% | {x['method']} |")
        lines.append("")
    lines += [(f"One-shot: median `run` {r['median_run_s']:.1f} s, of which unlearning "
               f"{r['median_unlearn_s']:.1f} s; everything else "
               f"{100 * r['median_rest_share']:.0f}% of the wall time."), "",
              (f"Watching: median pass {w['median_run_s']:.1f} s, of which unlearning "
               f"{w['median_unlearn_s']:.1f} s; everything else "
               f"{100 * w['median_rest_share']:.0f}%. The watcher was ready after "
               f"{w['ready_s']:.1f} s (once)."), "",
              (f"Handed to a watcher: median `run` {h['median_run_s']:.1f} s, of which "
               f"unlearning {h['median_unlearn_s']:.1f} s; everything else "
               f"{100 * h['median_rest_share']:.0f}%."), "",
              (f"One-shot against a lasting Prefect server: median `run` "
               f"{ls['median_run_s']:.1f} s, of which unlearning {ls['median_unlearn_s']:.1f} "
               f"s; everything else {100 * ls['median_rest_share']:.0f}%. The server answered "
               f"after {ls['ready_s']:.1f} s (once)."), "",
              f"Interactive commands with {r['releases']} releases registered:", "",
              "| command | median s | max s | runs |", "|---|---:|---:|---:|"]
    for x in r["interactive"]:
        lines.append(f"| `unlearn {x['command']}` | {x['median_s']:.2f} | {x['max_s']:.2f} | "
                     f"{x['runs']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
