"""What ``unlearn bench`` draws and sums up besides its table: PNG plots (matplotlib, Agg
backend) and the aggregated metrics (mean per method, objective and k) that its MLflow run
and DVC metrics files hold."""

from __future__ import annotations

import re
import statistics
from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display, no GUI toolkit
    import matplotlib.pyplot as plt

    return plt


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _by(rows: list[dict], *keys: str) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault(tuple(r.get(k) for k in keys), []).append(r)
    return out


def plot_sweep(rows: list[dict], folder: Path) -> list[Path]:
    """``test_drop_vs_k.png`` (one panel per objective, mean ± sd over seeds per method) and
    ``tradeoff.png`` (forget accuracy vs test accuracy, one point per run)."""
    plt = _pyplot()
    folder.mkdir(parents=True, exist_ok=True)
    objectives = list(dict.fromkeys(r["objective"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, len(objectives), figsize=(5 * len(objectives), 4), squeeze=False,
                             sharey=True)
    for ax, objective in zip(axes[0], objectives):
        for method in methods:
            groups = _by([r for r in rows if r["objective"] == objective and r["method"] == method],
                         "k")
            ks = sorted(g[0] for g in groups)
            stats = [_mean_sd([r["test_drop"] for r in groups[(k,)]]) for k in ks]
            ax.errorbar(ks, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o",
                        capsize=3, label=method)
        ax.set_xscale("log", base=2)
        all_ks = sorted({r["k"] for r in rows})
        ax.set_xticks(all_ks, [str(k) for k in all_ks])
        ax.minorticks_off()
        ax.set_title(f"objective: {objective}")
        ax.set_xlabel("forget-set size k")
        ax.axhline(0, color="grey", lw=0.5)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test-accuracy drop (pp), mean ± sd over seeds")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    drop = folder / "test_drop_vs_k.png"
    fig.savefig(drop, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    markers = dict(zip(objectives, "os^D"))
    colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    for (method, objective), rs in _by(rows, "method", "objective").items():
        ax.scatter([r["forget_acc"] for r in rs], [r["test_acc_after"] for r in rs],
                   c=colors[method], marker=markers.get(objective, "o"), alpha=0.7,
                   label=f"{method} / {objective}")
    ax.set_xlabel("forget-set accuracy after (%, lower = more forgotten)")
    ax.set_ylabel("held-out test accuracy after (%)")
    ax.set_title("forget vs test trade-off (one point per run)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    trade = folder / "tradeoff.png"
    fig.savefig(trade, dpi=110)
    plt.close(fig)
    return [drop, trade]


def plot_continual(rows: list[dict], folder: Path) -> list[Path]:
    """``continual.png``: cumulative test drop and the objective rate on earlier batches per
    round (mean over seeds), one line per method and objective."""
    plt = _pyplot()
    folder.mkdir(parents=True, exist_ok=True)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for (method, objective, k, both), rs in _by(rows, "method", "objective", "k",
                                                "include_earlier").items():
        rounds = _by(rs, "round")
        xs = sorted(r[0] for r in rounds)
        label = f"{method}{' +earlier' if both else ''} / {objective} / k={k}"
        left.plot(xs, [_mean_sd([r["cumulative_test_drop"] for r in rounds[(x,)]])[0]
                       for x in xs], marker="o", label=label)
        later = [x for x in xs if x > 1]
        right.plot(later, [_mean_sd([r["earlier_objective_rate"] for r in rounds[(x,)]])[0]
                           for x in later], marker="o", label=label)
    left.set(xlabel="round", ylabel="cumulative test-accuracy drop (pp)",
             title="continual: cost so far")
    right.set(xlabel="round", ylabel="objective rate on all earlier batches (%)",
              title="continual: earlier deletions hold (100%)")
    right.axhline(100, color="grey", lw=0.5)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    right.legend(fontsize=7)
    fig.tight_layout()
    path = folder / "continual.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def _metric_key(*parts: Any) -> str:
    """MLflow metric names allow letters, digits, ``_ - . / `` and spaces only."""
    return "/".join(re.sub(r"[^A-Za-z0-9_.\- ]", "_", str(p)) for p in parts)


def aggregate_metrics(rows: list[dict]) -> dict[str, float]:
    """Mean over seeds per (method, objective, k[, round]) of the numeric row fields."""
    fields = ("test_drop", "forget_acc", "relabel_success", "steps", "unlearn_seconds",
              "speedup_vs_retrain", "grad_examples", "gradient_saving_vs_retrain",
              "objective_rate", "earlier_objective_rate", "cumulative_test_drop", "test_acc_after")
    keys = ("method", "objective", "k", "round") if rows and "round" in rows[0] else \
        ("method", "objective", "k")
    out: dict[str, float] = {}
    for group, rs in _by(rows, *keys).items():
        prefix = [*group[:2], f"k{group[2]}", *(f"round{g}" for g in group[3:])]
        out[_metric_key(*prefix, "reached")] = sum(r["reached"] for r in rs) / len(rs)
        for f in fields:
            values = [float(r[f]) for r in rs if r.get(f) is not None]
            if values:
                out[_metric_key(*prefix, f)] = statistics.mean(values)
    return out
