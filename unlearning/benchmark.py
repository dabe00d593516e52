"""Benchmark: methods x objective x k x seed on one pre-trained model, with an optional
retrain-from-scratch reference measured in the same process, and a continual mode (batch
after batch, earlier deletions checked every round). Pure PyTorch + numpy; the CLI
(`unlearn bench`) and the flows only call :func:`run_benchmark` and the table helpers.
"""

from __future__ import annotations

import itertools
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .attacks import random_other_labels
from .datasets import ImageDataset, sample_forget_ids, sample_retain_ids
from .datasets.core import take
from .methods import ForgetSet, RetainSample, UnlearnResult, get_method, make_config, unlearn
from .methods.retrain import retrain_reference
from .metrics import membership_auc, mia_efficacy, objective_rate, relabel_success
from .train import TrainConfig, accuracy, steps_per_epoch, train_classifier

# One switch off at a time (`--ablation`): label -> l2ul parameter overrides.
L2UL_ABLATION: dict[str, dict[str, Any]] = {
    "l2ul": {},
    "l2ul -margin(neg-ce)": {"forget_loss": "neg-ce"},
    "l2ul margin=1": {"margin": 1.0},
    "l2ul lr=3e-4": {"lr": 3e-4},
    "l2ul forget average over active rows": {"forget_average": "active"},
    "l2ul -kl(hard-ce)": {"anchor_loss": "ce"},
    "l2ul -neighbours": {"neighbour_shifts": 0},
    "l2ul neighbours 4x0.1": {"neighbour_shifts": 4, "neighbour_weight": 0.1},
    "l2ul -synthetic": {"synthetic_anchors": 0},
    "l2ul -decay": {"anchor_decay": 1.0},
    "l2ul -relax-on-stall(every step)": {"relax_patience": 0},
    "l2ul -relax-after-half-budget": {"relax_always_after": 1.0},
    "l2ul -warmup": {"warmup_steps": 0},
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
                 overrides: dict[str, dict[str, Any]] | None = None,
                 sweep: tuple[str, str, list[Any]] | None = None) -> tuple[Variant, ...]:
    """Variants for method names (validated), l2ul expanded into its ablation if asked;
    ``sweep`` (method, key, values): that method once per value, labelled ``METHOD KEY=VALUE``,
    so the values meet the same forget sets in one run."""
    overrides = overrides or {}
    swept, key, values = sweep if sweep is not None else (None, "", [])
    if swept is not None:
        if swept not in methods:
            raise ValueError(f"the swept method {swept} is not among the methods "
                             f"({', '.join(methods)})")
        if swept == "l2ul" and ablation:
            raise ValueError("a sweep of l2ul does not combine with its ablation")
        if key in overrides.get(swept, {}):
            raise ValueError(f"{swept}.{key} is both swept and set")
        if len(values) < 2 or len(set(map(json.dumps, values))) < len(values):
            raise ValueError(f"a sweep needs two or more different values, got {values}")
    out: list[Variant] = []
    for m in methods:
        get_method(m)  # raises for unknown names
        base = overrides.get(m, {})
        make_config(m, base)  # raises for unknown/mistyped parameters
        if m == swept:
            for value in values:
                params = {**base, key: value}
                make_config(m, params)
                out.append(Variant(f"{m} {key}={json.dumps(value)}", m, params))
        elif m == "l2ul" and ablation:
            out += [Variant(label, m, {**base, **extra}) for label, extra in L2UL_ABLATION.items()]
        else:
            out.append(Variant(m, m, base))
    return tuple(out)


def forget_set_for(ds: ImageDataset, objective: str, k: int, seed: int,
                   model: torch.nn.Module | None = None) -> ForgetSet:
    """The seeded forget set; relabel targets uniform over the other classes, per instance;
    as-if-unseen ceilings from ``model`` on the test split (held-out data)."""
    ids = sample_forget_ids(ds.num_train, k, seed)
    x, y = ds.train_x[ids], ds.train_y[ids]
    new = None
    if objective == "relabel":
        new = random_other_labels(y, ds.num_classes, torch.Generator().manual_seed(1_000 + seed))
    return ForgetSet.build(x, y, objective, new, num_classes=ds.num_classes, ids=ids,
                           model=model, heldout=ds.heldout())


def retain_sample_for(ds: ImageDataset, k: int, seed: int, fraction: float) -> RetainSample | None:
    """The seeded retain sample (``fraction`` of train, disjoint from the forget set of
    ``k``/``seed``); None for fraction 0."""
    if fraction <= 0:
        return None
    r = sample_retain_ids(ds.num_train, sample_forget_ids(ds.num_train, k, seed), fraction, seed)
    return RetainSample(ds.train_x[r], ds.train_y[r])


def retrain_without(ds: ImageDataset, model_factory: Callable[[], torch.nn.Module],
                    forget_ids: list[int], config: TrainConfig) -> tuple[torch.nn.Module, float]:
    """Exact unlearning: train from scratch on the training split minus ``forget_ids``."""
    keep = torch.ones(ds.num_train, dtype=torch.bool)
    keep[torch.as_tensor(forget_ids)] = False
    start = time.perf_counter()
    model = model_factory()
    train_classifier(model, take(ds.train_x, keep), ds.train_y[keep], config)  # lazy: read per batch
    return model, time.perf_counter() - start


def exact_retrain(ds: ImageDataset, model_factory: Callable[[], torch.nn.Module],
                  forget: ForgetSet, config: TrainConfig,
                  reuse: tuple[torch.nn.Module, float] | None = None) -> UnlearnResult:
    """The ``retrain`` method as the benchmark runs it when no retain sample is given: the
    whole training split minus the forget rows (relabel rows with their new label), with the
    pre-training recipe. ``reuse``: the (model, seconds) of a retrain of the same rows
    already measured (``--retrain``, non-relabel objectives): the same weights."""
    rows = ds.num_train - int((~forget.is_relabel).sum())  # relabel rows stay, relabelled
    model, seconds = reuse if reuse is not None else retrain_reference(
        model_factory, ds.train_x, ds.train_y, forget, config)
    ok = forget.satisfied_by(model)
    return UnlearnResult(model=model, reached=bool(ok.all()),
                         steps=config.epochs * steps_per_epoch(rows, config.batch_size),
                         seconds=seconds, satisfied=int(ok.sum()), total=len(forget),
                         info={"trained_on": rows, "exact": True},
                         grad_examples=retrain_grad_examples(rows, config))


def retrain_grad_examples(rows: int, config: TrainConfig) -> int:
    """A retrain's cost in example-gradient evaluations: every row once per epoch."""
    return config.epochs * rows


# Retain accuracy and the MIA's member side are measured on this many training rows outside
# the forget set (a fixed draw per seed): the whole split would cost more than the unlearning.
RETAIN_EVAL_ROWS = 2000
# The metrics averaged into ``gap_to_retrain`` (forget, retain and test accuracy, MIA efficacy), in percent.
GAP_METRICS = ("forget_acc", "retain_acc", "test_acc", "mia_efficacy")  # not membership_auc


def retain_eval_ids(num_train: int, forget_ids: list[int], seed: int,
                    n: int = RETAIN_EVAL_ROWS) -> list[int]:
    """Training rows outside the forget set on which retain accuracy is measured."""
    excluded = {int(i) for i in forget_ids}
    order = torch.randperm(num_train, generator=torch.Generator().manual_seed(20_000 + seed))
    return [i for i in order.tolist() if i not in excluded][:n]


def model_metrics(model: torch.nn.Module, ds: ImageDataset, forget_x: torch.Tensor,
                  forget_y: torch.Tensor, retain_ids: list[int], seed: int) -> dict[str, float]:
    """Forget / retain / test accuracy and SalUn's MIA efficacy (members: the retain rows,
    non-members: the test split) of one model, in percent; and the class-matched
    membership AUC of the forget rows against the test split (:func:`membership_auc`)."""
    retain = (ds.train_x[retain_ids], ds.train_y[retain_ids])
    auc, _ = membership_auc(model, (forget_x, forget_y), ds.heldout())
    return {
        "membership_auc": auc,
        "forget_acc": accuracy(model, forget_x, forget_y),
        "retain_acc": accuracy(model, *retain),
        "test_acc": accuracy(model, ds.test_x, ds.test_y),
        "mia_efficacy": mia_efficacy(model, retain, (ds.test_x, ds.test_y),
                                     (forget_x, forget_y), seed=seed),
    }


def gap_to_retrain(measured: dict[str, float], retrained: dict[str, float]) -> float:
    """Mean absolute gap (percentage points) over :data:`GAP_METRICS` between a model's
    :func:`model_metrics` and the retrained model's."""
    return statistics.mean(abs(measured[m] - retrained[m]) for m in GAP_METRICS)


# Row fields that measure time: they differ between two runs of the same sweep; every other
# field is a deterministic function of the inputs (same seed, same thread count).
TIMING_KEYS = ("unlearn_seconds", "retrain_seconds", "speedup_vs_retrain")


def run_group(
    ds: ImageDataset,
    model: torch.nn.Module,
    model_factory: Callable[[], torch.nn.Module],
    config: BenchConfig,
    k: int,
    seed: int,
    pairs: list[tuple[str, Variant]] | None = None,
    log: Callable[[dict], None] | None = None,
) -> list[dict]:
    """The runs of one (k, seed) group: one retrain (if asked) shared by ``pairs``
    ((objective, variant); default: every objective x variant of ``config``, in that order).

    Each run depends only on its inputs (seeds are set per run), so groups can run in any
    order or process and give the same rows.
    """
    torch.use_deterministic_algorithms(True, warn_only=True)  # same kernels in every process
    if pairs is None:
        pairs = list(itertools.product(config.objectives, config.variants))
    test = (ds.test_x, ds.test_y)
    test_before = accuracy(model, *test)
    ids = sample_forget_ids(ds.num_train, k, seed)
    retain = retain_sample_for(ds, k, seed, config.retain_fraction)
    retain_eval = retain_eval_ids(ds.num_train, ids, seed)
    forget_x, forget_y = ds.train_x[ids], ds.train_y[ids]
    reference: dict[str, Any] = {}
    retrained: dict[str, float] = {}
    removal: tuple[torch.nn.Module, float] | None = None
    if config.retrain:
        torch.manual_seed(config.train.seed)
        removal = retrain_without(ds, model_factory, ids, config.train)
        re_model, re_seconds = removal
        retrained = model_metrics(re_model, ds, forget_x, forget_y, retain_eval, seed)
        reference = {"retrain_seconds": re_seconds,
                     "retrain_grad_examples": retrain_grad_examples(ds.num_train - k, config.train),
                     **{f"retrain_{m}": v for m, v in retrained.items()}}
    rows: list[dict] = []
    for objective, v in pairs:
        forget = forget_set_for(ds, objective, k, seed, model)
        uses_retain = retain is not None and get_method(v.method).accepts_retain
        if v.method == "retrain" and not uses_retain:
            res = exact_retrain(ds, model_factory, forget, config.train,
                                reuse=removal if objective != "relabel" else None)
        else:
            res = unlearn(v.method, model, forget, v.params,
                          retain=retain if uses_retain else None, seed=seed)
        measured = model_metrics(res.model, ds, forget_x, forget_y, retain_eval, seed)
        row = {
            "method": v.label, "base_method": v.method, "objective": objective,
            "k": k, "seed": seed,
            "retain_sample": len(retain.x) if retain is not None and uses_retain else 0,
            "reached": res.reached,
            "relabel_success": relabel_success(res.model, forget),
            "forget_acc": measured["forget_acc"], "retain_acc": measured["retain_acc"],
            "mia_efficacy": measured["mia_efficacy"],
            "membership_auc": measured["membership_auc"],
            "test_acc_before": test_before, "test_acc_after": measured["test_acc"],
            "test_drop": test_before - measured["test_acc"],
            "steps": res.steps, "unlearn_seconds": res.seconds,
            "grad_examples": res.grad_examples, "forward_examples": res.forward_examples,
            **reference,
        }
        if "retrain_seconds" in row:
            row["speedup_vs_retrain"] = row["retrain_seconds"] / max(res.seconds, 1e-9)
            row["gradient_saving_vs_retrain"] = (row["retrain_grad_examples"]
                                                 / max(res.grad_examples, 1))
            # The reference removes the rows; a relabel run is meant to differ from it.
            row["gap_to_retrain"] = (None if objective == "relabel"
                                     else gap_to_retrain(measured, retrained))
        rows.append(row)
        if log:
            log(row)
    return rows


def run_benchmark(
    ds: ImageDataset,
    model: torch.nn.Module,
    model_factory: Callable[[], torch.nn.Module],
    config: BenchConfig,
    log: Callable[[dict], None] | None = None,
) -> list[dict]:
    """One record per (variant, objective, k, seed); retrain runs once per (k, seed) and is
    shared by every variant and objective (it does not depend on either)."""
    rows: list[dict] = []
    for k in config.ks:
        for seed in config.seeds:
            rows += run_group(ds, model, model_factory, config, k, seed, log=log)
    return rows


# -- continual: batch after batch, each round unlearning only its own batch ------------------


def continual_batch(ds: ImageDataset, objective: str, k: int, rounds: int, seed: int,
                    r: int, parent: torch.nn.Module | None = None) -> ForgetSet:
    """Batch ``r`` (0-based) of ``rounds`` disjoint forget sets of ``k`` ids drawn with
    ``seed``. As-if-unseen ceilings come from ``parent``, the model the batch is deleted from."""
    ids = sample_forget_ids(ds.num_train, k * rounds, seed)
    y = ds.train_y[ids]
    new = None
    if objective == "relabel":
        new = random_other_labels(y, ds.num_classes, torch.Generator().manual_seed(1_000 + seed))
    part = slice(r * k, (r + 1) * k)
    return ForgetSet.build(ds.train_x[ids[part]], y[part], objective,
                           None if new is None else new[part], num_classes=ds.num_classes,
                           ids=ids[part], model=parent, heldout=ds.heldout())


def continual_batches(ds: ImageDataset, objective: str, k: int, rounds: int,
                      seed: int) -> list[ForgetSet]:
    """All ``rounds`` batches (misclassify / relabel: they need no parent model)."""
    return [continual_batch(ds, objective, k, rounds, seed, r) for r in range(rounds)]


def run_continual(ds: ImageDataset, model: torch.nn.Module, variant: Variant, objective: str,
                  k: int, rounds: int, seed: int, include_earlier: bool = False,
                  log: Callable[[dict], None] | None = None) -> list[dict]:
    """One row per round: round r unlearns batch r from round r-1's model, then checks the
    objective on every earlier batch. A broken earlier deletion is reported (``earlier_held``
    False), never repaired here. With ``include_earlier`` the earlier batches join round r's
    forget set, as the release pipeline's ``unlearn.include_earlier`` does. As-if-unseen
    ceilings are fixed when a batch is deleted, from the model it is deleted from."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    test = (ds.test_x, ds.test_y)
    test_start = accuracy(model, *test)
    current, before, rows = model, test_start, []
    batches: list[ForgetSet] = []
    for r in range(1, rounds + 1):
        forget = continual_batch(ds, objective, k, rounds, seed, r - 1, parent=current)
        batches.append(forget)
        target = ForgetSet.concat(batches[:r]) if include_earlier else forget
        res = unlearn(variant.method, current, target, variant.params, seed=seed * 1_000 + r)
        current, after = res.model, accuracy(res.model, *test)
        earlier = ForgetSet.concat(batches[: r - 1]) if r > 1 else None
        earlier_ok = earlier.satisfied_by(current) if earlier is not None else None
        row = {
            "method": variant.label, "base_method": variant.method, "objective": objective,
            "k": k, "seed": seed, "round": r, "include_earlier": include_earlier,
            "reached": res.reached,
            "objective_rate": objective_rate(current, forget),
            "forget_acc": accuracy(current, forget.x, forget.y),
            "earlier_objective_rate": (None if earlier_ok is None
                                       else 100.0 * earlier_ok.float().mean().item()),
            "earlier_broken": 0 if earlier_ok is None else int((~earlier_ok).sum()),
            "earlier_held": None if earlier_ok is None else bool(earlier_ok.all()),
            "test_acc_before": test_start, "test_acc_after": after,
            "round_test_drop": before - after, "cumulative_test_drop": test_start - after,
            "steps": res.steps, "unlearn_seconds": res.seconds,
            "grad_examples": res.grad_examples, "forward_examples": res.forward_examples,
        }
        before = after
        rows.append(row)
        if log:
            log(row)
    return rows


def continual_summary(rows: list[dict]) -> list[dict[str, str]]:
    """Mean ± sd over seeds per (method, objective, k, round)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        label = r["method"] + (" +earlier" if r.get("include_earlier") else "")
        groups.setdefault((label, r["objective"], r["k"], r["round"]), []).append(r)
    table = []
    for (method, objective, k, rnd), rs in groups.items():
        earlier = [r["earlier_objective_rate"] for r in rs if r["earlier_objective_rate"] is not None]
        held = [r["earlier_held"] for r in rs if r["earlier_held"] is not None]
        table.append({
            "method": method, "objective": objective, "k": str(k), "round": str(rnd),
            "deleted": str(k * rnd), "reached": f"{sum(r['reached'] for r in rs)}/{len(rs)}",
            "batch_objective_rate": _mean_sd([r["objective_rate"] for r in rs]),
            "earlier_objective_rate": _mean_sd(earlier),
            "earlier_held": f"{sum(held)}/{len(held)}" if held else "-",
            "test_acc": _mean_sd([r["test_acc_after"] for r in rs]),
            "cumulative_drop_pp": _mean_sd([r["cumulative_test_drop"] for r in rs]),
            "steps": _mean_sd([float(r["steps"]) for r in rs]),
        })
    return table


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
        if any("mia_efficacy" in r for r in rs):
            entry["mia"] = _mean_sd([r["mia_efficacy"] for r in rs if "mia_efficacy" in r])
            entry["membership_auc"] = _mean_sd([r["membership_auc"] for r in rs
                                                if "membership_auc" in r])
        if any("retrain_seconds" in r for r in rs):
            entry["retrain_forget_acc"] = _mean_sd([r["retrain_forget_acc"] for r in rs])
            if any("retrain_mia_efficacy" in r for r in rs):
                entry["retrain_mia"] = _mean_sd([r["retrain_mia_efficacy"] for r in rs
                                                 if "retrain_mia_efficacy" in r])
                entry["retrain_membership_auc"] = _mean_sd(
                    [r["retrain_membership_auc"] for r in rs if "retrain_membership_auc" in r])
            gaps = [r["gap_to_retrain"] for r in rs if r.get("gap_to_retrain") is not None]
            if gaps:
                entry["gap_to_retrain_pp"] = _mean_sd(gaps)
            entry["retrain_s"] = _mean_sd([r["retrain_seconds"] for r in rs])
            entry["speedup"] = _mean_sd([r["speedup_vs_retrain"] for r in rs])
            if all("grad_examples" in r for r in rs):
                entry["gradients"] = _mean_sd([float(r["grad_examples"]) for r in rs])
                entry["retrain_gradients"] = _mean_sd(
                    [float(r["retrain_grad_examples"]) for r in rs])
                entry["gradient_saving"] = _mean_sd(
                    [r["gradient_saving_vs_retrain"] for r in rs])
        table.append(entry)
    return table


def markdown_table(table: list[dict[str, str]]) -> str:
    if not table:
        return "(no runs)\n"
    cols = list(dict.fromkeys(c for row in table for c in row))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(row.get(c, "") for c in cols) + " |" for row in table]
    return "\n".join(lines) + "\n"
