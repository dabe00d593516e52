"""Continual deletions through the whole pipeline, with escalation and consolidation.

In a fresh state folder (the project's params.yaml with ``--dataset``, ``--epochs``,
``unlearn.consolidate_every`` and ``unlearn.retain_fraction`` set), the script runs the real CLI, one process per command:
``unlearn pretrain``, then ``--batches`` rounds of ``unlearn submit`` (``--k`` rows of
``--objective``, drawn by ``--seed`` from training instances not deleted before; ``relabel``
rows get the next class) and ``unlearn run --json``. Per batch it records the run's wall
time, the unlearning seconds, the method that released it (after escalation), the held-out
accuracy of the release, and every consolidation the run made. At the end it asks for one
more consolidation (``consolidate_every: 1``, nothing pending): an exact retrain without every
deleted row, the reference each release's held-out accuracy is compared with. When the
champion is already such a retrain (the last batch was released by ``retrain-exact``, or a
consolidation followed it), nothing is due and that release is the reference. Finally it
reads ``unlearn requests``: every request should be ``done``.

    python benchmarks/continual_pipeline.py --dataset fashion-mnist --batches 10 --k 32 \\
        --consolidate-every 128 --epochs 3 --seed 0 --out benchmarks/results/fmnist-pipeline-10x32.json

Writes the rows as JSON (``--out``), a Markdown table next to it (``.md``) and the headline
numbers as DVC metrics (``--metrics``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
UNLEARN = [sys.executable, "-m", "flows"]


def command(home: Path, *args: str, ok_codes: tuple[int, ...] = (0,),
            timeout: float = 7200) -> tuple[float, str]:
    env = {**os.environ, "UNLEARN_HOME": str(home), "UNLEARN_PROGRESS": "0"}
    env.pop("PREFECT_API_URL", None)
    start = time.perf_counter()
    done = subprocess.run([*UNLEARN, *args], cwd=home, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)
    wall = time.perf_counter() - start
    if done.returncode not in ok_codes:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SystemExit(f"unlearn {' '.join(args)} exited {done.returncode}: {tail}")
    return wall, done.stdout


def number(value) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def set_params(home: Path, **sections: dict) -> None:
    path = home / "params.yaml"
    data = yaml.safe_load(path.read_text())
    for section, values in sections.items():
        data[section].update(values)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--objective", default="misclassify",
                    choices=("misclassify", "relabel", "as-if-unseen"))
    ap.add_argument("--consolidate-every", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=3, help="the pretrain recipe (and retrains)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--retain-fraction", type=float, default=0.0,
                    help="unlearn.retain_fraction: 0 (forget set only) up to 0.01")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--metrics", type=Path)
    args = ap.parse_args()
    if not (1 <= args.batches <= 100 and 1 <= args.k <= 1024 and 1 <= args.epochs <= 100
            and 0.0 <= args.retain_fraction <= 0.01):
        ap.error("--batches 1..100, --k 1..1024, --epochs 1..100, --retain-fraction 0..0.01")

    home = Path(tempfile.mkdtemp(prefix="continual-pipeline-"))
    try:
        shutil.copy(ROOT / "params.yaml", home / "params.yaml")
        set_params(home, dataset={"name": args.dataset},
                   pretrain={"epochs": args.epochs, "seed": args.seed},
                   unlearn={"consolidate_every": args.consolidate_every,
                            "retain_fraction": args.retain_fraction})
        pretrain_s, out = command(home, "pretrain", "--json")
        base = json.loads(out)
        sys.path.insert(0, str(ROOT))
        from unlearning.datasets import load_dataset

        data = load_dataset(args.dataset)
        labels = data.train_y.tolist()
        rng = random.Random(args.seed)
        pool = list(range(len(labels)))
        rng.shuffle(pool)
        rows, consolidations = [], []
        for b in range(args.batches):
            ids, pool = pool[: args.k], pool[args.k:]
            manifest = home / f"batch-{b}.csv"
            manifest.write_text("request_id,instance_id,objective,new_label\n" + "".join(
                f"r{b}-{i},{i},{args.objective},"
                f"{(labels[i] + 1) % 10 if args.objective == 'relabel' else ''}\n"
                for i in ids))
            command(home, "submit", str(manifest))
            run_s, out = command(home, "run", "--json", ok_codes=(0, 1))
            result = json.loads(out)
            [batch] = result["batches"]
            attempts = batch.get("attempts") or []
            rows.append({
                "batch": b, "k": args.k, "state": batch["state"], "version": batch["version"],
                "run_s": run_s, "unlearn_s": batch.get("unlearn_seconds"),
                "released_by": attempts[-1]["method"] if batch["state"] == "done" else None,
                "attempts": [(a["method"], a["version"], a["passed"]) for a in attempts],
                "failed_gates": [[f"{f['gate']} {number(f.get('value'))} (limit "
                                  f"{number(f.get('limit'))})" for f in a.get("failures") or []]
                                 for a in attempts],
                "test_acc": (batch.get("metrics") or {}).get("test_acc"),
                "cumulative_drop": (batch.get("metrics") or {}).get("cumulative_drop")})
            for c in result.get("consolidations") or []:
                consolidations.append({"after_batch": b, **{k: c[k] for k in (
                    "version", "parent", "passed", "rows", "test_acc", "seconds")}})
            print(f"batch {b}: {rows[-1]['state']} by {rows[-1]['released_by']} "
                  f"(v{rows[-1]['version']}, test {rows[-1]['test_acc']}, {run_s:.0f} s)"
                  + "".join(f"; consolidated v{c['version']}" for c in consolidations
                            if c["after_batch"] == b), flush=True)
        set_params(home, unlearn={"consolidate_every": 1})  # the reference: retrain now
        ref_s, out = command(home, "run", "--json")
        [reference] = json.loads(out)["consolidations"] or [None]
        if reference is None:  # the champion is already exact: it is the reference
            reference, ref_s = exact_champion(rows, consolidations)
        _, out = command(home, "requests", "--json")
        statuses = [r["status"] for r in json.loads(out)["requests"]]
    finally:
        shutil.rmtree(home, ignore_errors=True)

    ref_acc = reference["test_acc"] if reference else None
    for r in rows:
        r["gap_to_retrain"] = (ref_acc - r["test_acc"]) if ref_acc is not None and \
            r["test_acc"] is not None else None
    result = {
        "benchmark": "continual-pipeline", "dataset": args.dataset, "objective": args.objective,
        "k": args.k, "batches": args.batches, "consolidate_every": args.consolidate_every,
        "epochs": args.epochs, "seed": args.seed, "retain_fraction": args.retain_fraction,
        "pretrain_s": pretrain_s,
        "base_test_acc": base.get("test_acc"), "rows": rows, "consolidations": consolidations,
        "reference": reference, "reference_s": ref_s,
        "requests_done": sum(s.startswith("done") for s in statuses),
        "requests": len(statuses),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(render(result))
    if args.metrics:
        done = [r for r in rows if r["state"] == "done"]
        args.metrics.write_text(json.dumps({
            "requests_done_share": round(result["requests_done"] / max(1, result["requests"]), 4),
            "median_run_s": round(sorted(r["run_s"] for r in rows)[len(rows) // 2], 1),
            "max_gap_to_retrain": round(max((r["gap_to_retrain"] or 0) for r in done), 2)
            if done else None,
            "consolidations": len(consolidations)}, indent=2) + "\n")
    print(render(result))


def exact_champion(rows: list[dict], consolidations: list[dict]) -> tuple[dict | None, float]:
    """The release that retrained without every deleted row, when the run ended on one: a
    consolidation after the last batch, else the last batch released by ``retrain-exact``."""
    last = rows[-1]
    after = [c for c in consolidations if c["after_batch"] == last["batch"] and c["passed"]]
    if after:
        return {**after[-1], "kind": "consolidation after the last batch"}, after[-1]["seconds"]
    if last["released_by"] == "retrain-exact":
        return ({"version": last["version"], "test_acc": last["test_acc"],
                 "kind": "the last batch's exact retrain"}, last["run_s"])
    return None, 0.0


def render(r: dict) -> str:
    ref = r["reference"]
    every = r["consolidate_every"]
    retain = r.get("retain_fraction") or 0.0
    lines = [(f"# {r['batches']} batches of {r['k']} `{r['objective']}` rows on {r['dataset']}, "
             + (f"consolidating every {every} rows" if every else "no consolidation")
             + (f", a retain sample of {retain:.1%} of the training rows" if retain else "")
             + f" (seed {r['seed']})"), "",
             f"Base model: test {r['base_test_acc']:.2f}% ({r['epochs']} pre-training epochs, "
             f"{r['pretrain_s']:.0f} s). Reference, retrained without all "
             f"{r['batches'] * r['k']} deleted rows: "
             + (f"v{ref['version']}, test {ref['test_acc']:.2f}% ({r['reference_s']:.0f} s"
                + (f"; {ref['kind']}" if ref.get("kind") else "") + ")." if ref else "none."),
             f"Requests done: {r['requests_done']} of {r['requests']}.", "",
             ("| batch | state | released by | attempts | `run` s | unlearning s | test % "
             "| below the retrain (points) | consolidated after |"),
             "|---:|---|---|---|---:|---:|---:|---:|---|"]
    for x in r["rows"]:
        after = [c for c in r["consolidations"] if c["after_batch"] == x["batch"]]
        cons = "; ".join(f"v{c['version']} ({c['rows']} rows, test {c['test_acc']:.2f}%, "
                         f"{c['seconds']:.0f} s)" for c in after) or ""
        attempts = ", ".join(f"{m} v{v} {'pass' if p else 'fail'}" for m, v, p in x["attempts"])
        failed = [g for gates in x.get("failed_gates") or [] for g in gates]
        if failed:  # why the failed attempts failed, with the gate values
            attempts += " (" + "; ".join(failed) + ")"
        test = f"{x['test_acc']:.2f}" if x["test_acc"] is not None else "-"
        gap = f"{x['gap_to_retrain']:.2f}" if x["gap_to_retrain"] is not None else "-"
        unl = f"{x['unlearn_s']:.0f}" if x["unlearn_s"] is not None else "-"
        lines.append(f"| {x['batch']} | {x['state']} | {x['released_by'] or '-'} | {attempts} | "
                     f"{x['run_s']:.0f} | {unl} | {test} | {gap} | {cons} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
