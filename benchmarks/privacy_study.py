"""Unlearning judged by LiRA in a setting where membership is detectable.

The memorising setting: the target is trained with the project's recipe (no augmentation)
on a seeded *half* of the training split (the members) for more epochs than usual, so it
fits its members exactly; the other half are the non-members. Shadows are trained on random
halves of the whole training split (:func:`unlearning.privacy.train_shadows`), independent of
the target. Then, per seed, ``k`` members are deleted by: retraining without them (the gold
standard: they should score like non-members) and every registered unlearning method.

Research code, not part of the pipeline: ``python benchmarks/privacy_study.py --out FILE
--markdown FILE`` (a stage of ``benchmarks/dvc.yaml``). The markdown it writes holds the
setting and the measured tables; what they mean is discussed in ``docs/privacy.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from unlearning import privacy as P
from unlearning.benchmark import forget_set_for, retrain_without
from unlearning.datasets import load_dataset, sample_retain_ids
from unlearning.methods import RetainSample, get_method, list_methods, unlearn
from unlearning.metrics import mia_efficacy
from unlearning.models import build_model, spec_for
from unlearning.train import TrainConfig, accuracy, predict_logits, train_classifier

Log = Callable[[str], None]
# Registered methods left out by default (``--methods`` may still name them), and why.
SKIPPED = {
    "retrain": "the gold standard is trained here on every member but the forget set; the "
               "registered method would train on the 1% retain sample alone",
    "l2ul-reference": "about 90 s per run here (20 PGD examples x 100 steps per instance), "
                      "more than the rest of a seed together",
}


@dataclass(frozen=True)
class StudyConfig:
    dataset: str = "digits"
    arch: str = "small-cnn"
    member_fraction: float = 0.5  # share of the training split the target is trained on
    epochs: int = 40  # the pipeline's pre-training uses 30 on the full split
    n_shadows: int = 16
    k: int = 32  # forget instances, drawn from the members
    seeds: tuple[int, ...] = (0, 1, 2)  # forget-set seeds
    methods: tuple[str, ...] | None = None  # None: every registered method but SKIPPED
    relabel_methods: tuple[str, ...] = ("l2ul", "neggrad")  # also run with objective relabel
    unseen_methods: tuple[str, ...] = ("l2ul",)  # also run with objective as-if-unseen
    retain_fraction: float = 0.01  # retain sample (of the members) for methods that need one
    split_seed: int = 0
    shadow_seed: int = 1
    train: TrainConfig = field(default_factory=TrainConfig)

    def train_config(self) -> TrainConfig:
        return dataclasses.replace(self.train, epochs=self.epochs, augment=False)


def _members(n: int, fraction: float, seed: int) -> np.ndarray:
    mask = np.zeros(n, bool)
    mask[np.random.default_rng(seed).permutation(n)[: round(n * fraction)]] = True
    return mask


def attack_original(model: nn.Module, fit: P.LiraFit, x: torch.Tensor, y: torch.Tensor,
                    members: np.ndarray, seed: int) -> list[dict]:
    """Every attack on the target, members vs non-members of the whole training split."""
    phi = P.logit_confidence(model, x, y)
    rows = []
    for name, offline in (("LiRA online", False), ("LiRA offline", True)):
        s = P.lira_scores(fit, phi, offline=offline)
        rows.append({"attack": name, "auc": P.attack_auc(s[members], s[~members]),
                     "tpr_at_1pct_fpr": P.tpr_at_fpr(s[members], s[~members], 0.01),
                     "tpr_at_5pct_fpr": P.tpr_at_fpr(s[members], s[~members], 0.05)})
    c = phi[:, 0]  # one global threshold on the confidence: what loss-threshold attacks do
    rows.append({"attack": "loss threshold", "auc": P.attack_auc(c[members], c[~members]),
                 "tpr_at_1pct_fpr": P.tpr_at_fpr(c[members], c[~members], 0.01),
                 "tpr_at_5pct_fpr": P.tpr_at_fpr(c[members], c[~members], 0.05)})
    # SalUn's SVC: fitted on one half of each side, asked about the other half
    rng = np.random.default_rng(seed)
    m_idx, n_idx = rng.permutation(np.flatnonzero(members)), rng.permutation(np.flatnonzero(~members))
    half = lambda idx, part: torch.from_numpy(np.array_split(idx, 2)[part])
    fit_m, ask_m, fit_n, ask_n = half(m_idx, 0), half(m_idx, 1), half(n_idx, 0), half(n_idx, 1)
    eff = lambda ask: mia_efficacy(model, (x[fit_m], y[fit_m]), (x[fit_n], y[fit_n]),
                                   (x[ask], y[ask]), seed=seed)
    tpr, tnr = 1 - eff(ask_m) / 100, eff(ask_n) / 100
    rows.append({"attack": "SalUn SVC (MIA efficacy)", "auc": None,
                 "balanced_accuracy": (tpr + tnr) / 2, "tpr": tpr, "fpr": 1 - tnr})
    return rows


def judge(model: nn.Module, fit: P.LiraFit, x: torch.Tensor, y: torch.Tensor,
          forget: np.ndarray, members: np.ndarray, seed: int) -> dict:
    """LiRA on one model: the forget set (and the kept members) against the non-members."""
    phi = P.logit_confidence(model, x, y)
    s = P.lira_scores(fit, phi)
    kept = members & ~forget
    auc = P.attack_auc(s[forget], s[~members])
    t = lambda m: (x[torch.from_numpy(m)], y[torch.from_numpy(m)])
    finite = bool(torch.isfinite(predict_logits(model, x)).all())  # neggrad can diverge
    return {
        "forget_auc": auc, "forget_auc_two_sided": P.two_sided(auc),
        "forget_tpr_at_5pct_fpr": P.tpr_at_fpr(s[forget], s[~members], 0.05),
        "forget_score": float(s[forget].mean()), "forget_score_median": float(np.median(s[forget])),
        "nonmember_score": float(s[~members].mean()),
        "kept_auc": P.attack_auc(s[kept], s[~members]),
        "forget_acc": accuracy(model, *t(forget)),
        # CE loss = softplus(-phi) is monotone in phi: this is metrics.loss_mia_auc, defined
        # even for a diverged model
        "forget_loss_auc": P.attack_auc(phi[forget, 0], phi[~members, 0]),
        "forget_mia_efficacy": mia_efficacy(model, t(kept), t(~members), t(forget), seed=seed)
        if finite else None,
        "finite_outputs": finite,
    }


def _variants(cfg: StudyConfig) -> list[tuple[str, str]]:
    names = cfg.methods if cfg.methods is not None else [m for m in list_methods()
                                                         if m not in SKIPPED]
    out = [(m, "misclassify") for m in names]
    return out + [(m, "relabel") for m in names if m in cfg.relabel_methods] \
        + [(m, "as-if-unseen") for m in names if m in cfg.unseen_methods]


def run_study(cfg: StudyConfig, log: Log | None = None) -> dict:
    """The whole study; every number but the ``seconds`` fields is deterministic on one machine."""
    log = log or (lambda _m: None)
    ds = load_dataset(cfg.dataset)
    spec, tcfg = spec_for(cfg.arch, ds), cfg.train_config()
    x, y = ds.train_x, ds.train_y
    members = _members(len(x), cfg.member_fraction, cfg.split_seed)
    m_ids = np.flatnonzero(members)

    def make_model(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return build_model(spec)

    start = t0 = time.perf_counter()
    target = train_classifier(make_model(tcfg.seed), x[m_ids], y[m_ids],
                              P.even_batches(tcfg, len(m_ids)))
    seconds = {"target": time.perf_counter() - t0}
    log(f"target: train acc {accuracy(target, x[m_ids], y[m_ids]):.2f}% "
        f"test acc {accuracy(target, ds.test_x, ds.test_y):.2f}%")
    t0 = time.perf_counter()
    shadows = P.train_shadows(lambda i: make_model(100 + i), x, y, cfg.n_shadows, tcfg,
                              seed=cfg.shadow_seed,
                              progress=lambda d, n, _m: log(f"shadow {d}/{n}"))
    seconds["shadows"] = time.perf_counter() - t0
    fit = P.fit_lira(shadows)
    original = attack_original(target, fit, x, y, members, cfg.split_seed)
    rows: list[dict] = []
    for seed in cfg.seeds:
        rows += _judge_seed(cfg, seed, ds, target, fit, make_model, members, log)
    seconds["total"] = time.perf_counter() - start
    return {
        "config": {**dataclasses.asdict(cfg), "train": dataclasses.asdict(tcfg)},
        "setting": {"members": int(members.sum()), "nonmembers": int((~members).sum()),
                    "target_train_acc": accuracy(target, x[m_ids], y[m_ids]),
                    "target_test_acc": accuracy(target, ds.test_x, ds.test_y),
                    "variance": "per-example" if cfg.n_shadows >= 64 else "global"},
        "skipped": SKIPPED, "original_attacks": original, "rows": rows,
        "summary": summarise(rows), "seconds": seconds,
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__},
    }


def _judge_seed(cfg: StudyConfig, seed: int, pool, target: nn.Module, fit: P.LiraFit,
                make_model: Callable[[int], nn.Module], members: np.ndarray,
                log: Log) -> list[dict]:
    """Original, retrain and every method for one forget set of ``cfg.k`` members."""
    m_ids = np.flatnonzero(members)
    ds_m = dataclasses.replace(pool, train_x=pool.train_x[m_ids], train_y=pool.train_y[m_ids])
    x, y, tcfg = ds_m.train_x, ds_m.train_y, cfg.train_config()
    forget_local = forget_set_for(ds_m, "misclassify", cfg.k, seed).ids
    forget = np.zeros(len(members), bool)
    forget[m_ids[list(forget_local)]] = True
    base = {"seed": seed, "k": cfg.k}
    judge_ = lambda model: judge(model, fit, pool.train_x, pool.train_y, forget, members, seed)
    rows = [{**base, "model": "original", "objective": "", "steps": 0, "seconds": 0.0,
             "test_acc": accuracy(target, pool.test_x, pool.test_y), **judge_(target)}]
    retrained, secs = retrain_without(ds_m, lambda: make_model(tcfg.seed), list(forget_local),
                                      P.even_batches(tcfg, len(x) - cfg.k))
    rows.append({**base, "model": "retrain (gold)", "objective": "", "steps": 0, "seconds": secs,
                 "test_acc": accuracy(retrained, pool.test_x, pool.test_y), **judge_(retrained)})
    r_ids = sample_retain_ids(len(x), list(forget_local), cfg.retain_fraction, seed)
    retain = RetainSample(x[r_ids], y[r_ids])
    for method, objective in _variants(cfg):
        fs = forget_set_for(ds_m, objective, cfg.k, seed, target)
        needs = get_method(method).needs_retain
        res = unlearn(method, target, fs, retain=retain if needs else None, seed=seed)
        rows.append({**base, "model": method + (" +retain" if needs else ""),
                     "objective": objective, "steps": res.steps, "seconds": res.seconds,
                     "reached": res.reached,
                     "test_acc": accuracy(res.model, pool.test_x, pool.test_y),
                     **judge_(res.model)})
        log(f"seed {seed} {method} {objective}: forget AUC {rows[-1]['forget_auc']:.3f}")
    gold = rows[1]
    for r in rows:
        r["score_gap"] = r["forget_score"] - gold["forget_score"]
        r["auc_gap"] = r["forget_auc"] - gold["forget_auc"]
    return rows


SUMMARY_KEYS = ("forget_auc", "forget_auc_two_sided", "auc_gap", "forget_score",
                "forget_score_median", "score_gap",
                "kept_auc", "forget_acc", "test_acc", "forget_loss_auc", "forget_mia_efficacy",
                "seconds")


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and sd over seeds, one entry per (model, objective), in first-seen order."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["objective"]), []).append(r)
    out = []
    for (model, objective), rs in groups.items():
        entry: dict = {"model": model, "objective": objective, "runs": len(rs)}
        for key in SUMMARY_KEYS:
            vals = [float(r[key]) for r in rs if r[key] is not None]
            entry[key] = [statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0,
                          len(vals)] if vals else None
        if "reached" in rs[0]:
            entry["reached"] = f"{sum(r['reached'] for r in rs)}/{len(rs)}"
        out.append(entry)
    return out


def _pm(v: list[float] | None, digits: int, runs: int) -> str:
    """mean ± sd; "(n runs)" when only n of the runs had a value; "–" when none had."""
    if v is None:
        return "–"
    text = f"{v[0]:.{digits}f} ± {v[1]:.{digits}f}"
    return text if v[2] == runs else f"{text} ({int(v[2])} runs)"


def original_table(result: dict) -> str:
    lines = ["| attack | AUC | TPR @ 1% FPR | TPR @ 5% FPR | balanced accuracy |",
             "|---|---|---|---|---|"]
    for r in result["original_attacks"]:
        if r["auc"] is None:
            lines.append(f"| {r['attack']} | – | – | – | {r['balanced_accuracy']:.3f} "
                         f"(TPR {r['tpr']:.3f}, FPR {r['fpr']:.3f}) |")
        else:
            lines.append(f"| {r['attack']} | {r['auc']:.3f} | {r['tpr_at_1pct_fpr']:.3f} | "
                         f"{r['tpr_at_5pct_fpr']:.3f} | |")
    return "\n".join(lines) + "\n"


def unlearning_table(result: dict) -> str:
    cols = [("forget_auc", "LiRA AUC forget vs non-members"), ("forget_auc_two_sided", "two-sided"),
            ("auc_gap", "AUC − retrain"), ("forget_score", "mean LiRA score (forget)"),
            ("forget_score_median", "median"),
            ("score_gap", "score − retrain"), ("kept_auc", "LiRA AUC kept members"),
            ("forget_acc", "forget acc %"), ("test_acc", "test acc %"),
            ("forget_loss_auc", "loss AUC (forget)"), ("forget_mia_efficacy", "SVC MIA efficacy %"),
            ("seconds", "seconds")]
    head = "| model | objective | reached | " + " | ".join(c[1] for c in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 3)]
    for e in result["summary"]:
        one = ("forget_acc", "test_acc", "forget_mia_efficacy", "forget_score",
               "forget_score_median", "score_gap", "seconds")
        cells = [_pm(e[k], 1 if k in one else 3, e["runs"]) for k, _ in cols]
        lines.append(f"| {e['model']} | {e['objective'] or '–'} | {e.get('reached', '–')} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_markdown(result: dict, command: str) -> str:
    """The generated page: the command, the machine, the setting and the measured tables."""
    c, st, sec, m = result["config"], result["setting"], result["seconds"], result["machine"]
    skipped = "; ".join(f"`{k}`: {v}" for k, v in result["skipped"].items())
    return f"""# LiRA on {c['dataset']}: measured tables

```
{command}
```

Machine: {m['cpus']} CPUs, {m['torch_threads']} torch thread(s), Python {m['python']},
torch {m['torch']}. Wall time: target {sec['target']:.0f} s, {c['n_shadows']} shadows
{sec['shadows']:.0f} s, whole run {sec['total']:.0f} s.

Setting: `{c['arch']}` trained for {c['epochs']} epochs on {st['members']} members (train
accuracy {st['target_train_acc']:.1f}%, test accuracy {st['target_test_acc']:.1f}%),
{st['nonmembers']} non-members; LiRA with {c['n_shadows']} shadows and a {st['variance']}
variance; k = {c['k']} forget instances from the members, seeds
{', '.join(map(str, c['seeds']))} (mean ± sd over seeds). Left out: {skipped}.

## The attacks on the original model (members vs non-members)

{original_table(result)}
## Unlearning judged by the attack

{unlearning_table(result)}"""


def _metric_name(*parts: str) -> str:
    """A DVC/MLflow-safe key: ``" +"`` joins as ``+``, other odd runs become ``-``."""
    return "/".join(re.sub(r"[^A-Za-z0-9_.+-]+", "-", p.replace(" +", "+")).strip("-")
                    for p in parts)


def flat_metrics(result: dict) -> dict[str, float]:
    """The attacks on the original model and every summary mean, keyed by model/objective."""
    out: dict[str, float] = {}
    for r in result["original_attacks"]:
        for key in ("auc", "tpr_at_1pct_fpr", "tpr_at_5pct_fpr", "balanced_accuracy"):
            if r.get(key) is not None:
                out[_metric_name("original", "attack", r["attack"], key)] = float(r[key])
    for e in result["summary"]:
        prefix = (e["model"], e["objective"] or "none")
        for key in SUMMARY_KEYS:
            if e.get(key) is not None:
                out[_metric_name(*prefix, key)] = float(e[key][0])
        if "reached" in e:
            done, runs = e["reached"].split("/")
            out[_metric_name(*prefix, "reached")] = int(done) / int(runs)
    return out


def main(argv: list[str] | None = None) -> int:
    """The LiRA study: unlearning judged by a membership attack that can fail."""
    ap = argparse.ArgumentParser(prog="privacy_study.py", description=main.__doc__)
    ap.add_argument("--out", type=Path, help="write every row and the summary as JSON here")
    ap.add_argument("--markdown", type=Path, help="write the report page here")
    ap.add_argument("--metrics", type=Path,
                    help="write the means as one flat JSON object (DVC metrics) here")
    ap.add_argument("--shadows", type=int, default=StudyConfig.n_shadows)
    ap.add_argument("--epochs", type=int, default=StudyConfig.epochs)
    ap.add_argument("--k", type=int, default=StudyConfig.k)
    ap.add_argument("--seeds", default="0,1,2", help="forget-set seeds, comma-separated")
    ap.add_argument("--methods", help="comma-separated (default: every registered method but "
                    + ", ".join(SKIPPED) + ")")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--render", type=Path, metavar="JSON",
                    help="no run: rewrite --markdown from a JSON written by --out")
    args = ap.parse_args(argv)
    if args.render:
        if not args.markdown:
            ap.error("--render needs --markdown")
        result = json.loads(args.render.read_text())
        args.markdown.write_text(to_markdown(result, result["command"]))
        return 0
    if args.threads < 1 or args.shadows < 4 or args.shadows % 2 or args.k < 1:
        ap.error("--threads and --k must be >= 1, --shadows an even number >= 4")
    try:
        for name in (args.methods.split(",") if args.methods else []):
            get_method(name)
    except KeyError as e:
        ap.error(str(e.args[0]))
    torch.set_num_threads(args.threads)
    cfg = StudyConfig(
        n_shadows=args.shadows, epochs=args.epochs, k=args.k,
        seeds=tuple(int(s) for s in args.seeds.split(",")),
        methods=tuple(args.methods.split(",")) if args.methods else None)
    result = run_study(cfg, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(original_table(result))
    print(unlearning_table(result))
    command = "python benchmarks/privacy_study.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**result, "command": command}, indent=1) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(to_markdown(result, command))
    if args.metrics:
        args.metrics.parent.mkdir(parents=True, exist_ok=True)
        args.metrics.write_text(json.dumps(flat_metrics(result), indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
