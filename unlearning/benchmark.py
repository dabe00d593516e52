"""Benchmark: methods x objective x k x seed on one pre-trained model, with an optional
retrain-from-scratch reference measured in the same process. Pure PyTorch + numpy; the CLI
(`unlearn bench`) and the flows only call :func:`run_benchmark` and the table helpers.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .attacks import random_other_labels
from .data import ImageDataset, sample_forget_ids, sample_retain_ids
from .methods import ForgetSet, RetainSample, get_method, make_config, unlearn
from .metrics import relabel_success
from .train import TrainConfig, accuracy, train_classifier

# One switch off at a time (`--ablation`): label -> l2ul parameter overrides.
L2UL_ABLATION: dict[str, dict[str, Any]] = {
    "l2ul": {},
    "l2ul -margin(neg-ce)": {"forget_loss": "neg-ce"},
    "l2ul -kl(hard-ce)": {"anchor_loss": "ce"},
    "l2ul -neighbours": {"neighbour_shifts": 0},
    "l2ul -synthetic": {"synthetic_anchors": 0},
    "l2ul -decay": {"anchor_decay": 1.0},
    "l2ul -adversarial": {"adv_per_instance": 0},
    "l2ul -importance": {"use_importance": False},
    "l2ul -frozen-bn": {"freeze_bn": False},
    "l2ul -adam(sgd)": {"optimizer": "sgd", "lr": 1e-3},
}


@dataclass(frozen=True)
class Variant:
    """A method under a label, with parameter overrides (e.g. an ablation row)."""

    label: str
    method: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BenchConfig:
    variants: tuple[Variant, ...]
    objectives: tuple[str, ...] = ("misclassify",)
    ks: tuple[int, ...] = (8, 32, 128)
    seeds: tuple[int, ...] = (0, 1, 2)
    retrain: bool = False
    retain_fraction: float = 0.0  # > 0: give methods a retain sample of this share
    train: TrainConfig = field(default_factory=TrainConfig)


def variants_for(methods: list[str], ablation: bool = False,
                 overrides: dict[str, dict[str, Any]] | None = None) -> tuple[Variant, ...]:
    """Variants for method names (validated), l2ul expanded into its ablation if asked."""
    overrides = overrides or {}
    out: list[Variant] = []
    for m in methods:
        get_method(m)  # raises for unknown names
        base = overrides.get(m, {})
        make_config(m, base)  # raises for unknown/mistyped parameters
        if m == "l2ul" and ablation:
            out += [Variant(label, m, {**base, **extra}) for label, extra in L2UL_ABLATION.items()]
        else:
            out.append(Variant(m, m, base))
    return tuple(out)


def forget_set_for(ds: ImageDataset, objective: str, k: int, seed: int) -> ForgetSet:
    """The seeded forget set; relabel targets uniform over the other classes, per instance."""
    ids = sample_forget_ids(ds.num_train, k, seed)
    x, y = ds.train_x[ids], ds.train_y[ids]
    new = None
    if objective == "relabel":
        new = random_other_labels(y, ds.num_classes, torch.Generator().manual_seed(1_000 + seed))
    return ForgetSet.build(x, y, objective, new, num_classes=ds.num_classes, ids=ids)


def retrain_without(ds: ImageDataset, model_factory: Callable[[], torch.nn.Module],
                    forget_ids: list[int], config: TrainConfig) -> tuple[torch.nn.Module, float]:
    """Exact unlearning: train from scratch on the training split minus ``forget_ids``."""
    keep = torch.ones(ds.num_train, dtype=torch.bool)
    keep[torch.as_tensor(forget_ids)] = False
    start = time.perf_counter()
    model = model_factory()
    train_classifier(model, ds.train_x[keep], ds.train_y[keep], config)
    return model, time.perf_counter() - start


def run_benchmark(
    ds: ImageDataset,
    model: torch.nn.Module,
    model_factory: Callable[[], torch.nn.Module],
    config: BenchConfig,
    log: Callable[[dict], None] | None = None,
) -> list[dict]:
    """One record per (variant, objective, k, seed); retrain runs once per (k, seed) and is
    shared by every variant and objective (it does not depend on either)."""
    test = (ds.test_x, ds.test_y)
    test_before = accuracy(model, *test)
    rows: list[dict] = []
    for k in config.ks:
        for seed in config.seeds:
            ids = sample_forget_ids(ds.num_train, k, seed)
            retain = None
            if config.retain_fraction > 0:
                r = sample_retain_ids(ds.num_train, ids, config.retain_fraction, seed)
                retain = RetainSample(ds.train_x[r], ds.train_y[r])
            reference: dict[str, Any] = {}
            if config.retrain:
                torch.manual_seed(config.train.seed)
                re_model, re_seconds = retrain_without(ds, model_factory, ids, config.train)
                reference = {
                    "retrain_seconds": re_seconds,
                    "retrain_test_acc": accuracy(re_model, *test),
                    "retrain_forget_acc": accuracy(re_model, ds.train_x[ids], ds.train_y[ids]),
                }
            for objective, v in itertools.product(config.objectives, config.variants):
                forget = forget_set_for(ds, objective, k, seed)
                uses_retain = retain is not None and get_method(v.method).accepts_retain
                res = unlearn(v.method, model, forget, v.params,
                              retain=retain if uses_retain else None, seed=seed)
                after = accuracy(res.model, *test)
                row = {
                    "method": v.label, "base_method": v.method, "objective": objective,
                    "k": k, "seed": seed,
                    "retain_sample": len(retain.x) if retain is not None and uses_retain else 0,
                    "reached": res.reached,
                    "forget_acc": accuracy(res.model, forget.x, forget.y),
                    "relabel_success": relabel_success(res.model, forget),
                    "test_acc_before": test_before, "test_acc_after": after,
                    "test_drop": test_before - after,
                    "steps": res.steps, "unlearn_seconds": res.seconds,
                    **reference,
                }
                if "retrain_seconds" in row:
                    row["speedup_vs_retrain"] = row["retrain_seconds"] / max(res.seconds, 1e-9)
                rows.append(row)
                if log:
                    log(row)
    return rows


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def summary_table(rows: list[dict]) -> list[dict[str, str]]:
    """Mean ± sd over seeds per (method, objective, k)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["objective"], r["k"], r.get("retain_sample", 0) > 0),
                          []).append(r)
    table = []
    for (method, objective, k, with_retain), rs in groups.items():
        entry = {
            "method": method + (" +retain" if with_retain else ""), "objective": objective,
            "k": str(k), "runs": str(len(rs)),
            "reached": f"{sum(r['reached'] for r in rs)}/{len(rs)}",
            "forget_acc": _mean_sd([r["forget_acc"] for r in rs]),
            "test_drop_pp": _mean_sd([r["test_drop"] for r in rs]),
            "steps": _mean_sd([float(r["steps"]) for r in rs]),
            "seconds": _mean_sd([r["unlearn_seconds"] for r in rs]),
        }
        if any(r.get("relabel_success") is not None for r in rs):
            entry["relabel_success"] = _mean_sd([r["relabel_success"] for r in rs
                                                 if r.get("relabel_success") is not None])
        if any("retrain_seconds" in r for r in rs):
            entry["retrain_s"] = _mean_sd([r["retrain_seconds"] for r in rs])
            entry["speedup"] = _mean_sd([r["speedup_vs_retrain"] for r in rs])
        table.append(entry)
    return table


def markdown_table(table: list[dict[str, str]]) -> str:
    if not table:
        return "(no runs)\n"
    cols = list(dict.fromkeys(c for row in table for c in row))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(row.get(c, "") for c in cols) + " |" for row in table]
    return "\n".join(lines) + "\n"
