"""Single `l2ul` runs on Fashion-MNIST with parameters overridden, for docs/l2ul.md's "what was
tried" tables (not a product setting). Same forget sets, seeds and determinism as
`unlearn bench`, so a row equals the bench row with the same parameters; it also prints the
seconds spent building the anchors.

    python docs/bench/l2ul_probe.py --k 32 --objectives misclassify --set relax_patience=0
    python docs/bench/l2ul_probe.py --k 32 --objectives misclassify --retain-fraction 0.01

Needs the cached bench checkpoint (artifacts/bench/fashion-mnist-small-cnn-e5-s0.pt, made by
any fashion-mnist `unlearn bench`).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import unlearning.methods.l2ul as l2ul_module
from unlearning.benchmark import forget_set_for, retain_sample_for
from unlearning.data import load_dataset
from unlearning.methods import unlearn
from unlearning.models import load_checkpoint
from unlearning.train import accuracy

SETUP: dict[str, float] = {}


def _timed(name: str):
    inner = getattr(l2ul_module, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            SETUP[name] = SETUP.get(name, 0.0) + time.perf_counter() - start
    setattr(l2ul_module, name, wrapper)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--k", default="8,32")
    p.add_argument("--seeds", default="0")
    p.add_argument("--objectives", default="misclassify,relabel")
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                   help="l2ul parameter, e.g. relax_patience=0 (repeatable)")
    p.add_argument("--retain-fraction", type=float, default=0.0,
                   help="give l2ul a retain sample of this share (<= 0.01), as `unlearn bench` does")
    p.add_argument("--checkpoint", default="artifacts/bench/fashion-mnist-small-cnn-e5-s0.pt")
    p.add_argument("--out", help="append the rows to this JSON-lines file")
    args = p.parse_args()
    params = {}
    for item in args.set:
        key, value = item.split("=", 1)
        params[key] = json.loads(value)
    for name in ("adversarial_set", "invert_batchnorm", "mas_importance"):
        _timed(name)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True, warn_only=True)  # as in `unlearn bench`
    ds = load_dataset("fashion-mnist")
    model, _ = load_checkpoint(args.checkpoint)
    model.eval()
    before = accuracy(model, ds.test_x, ds.test_y)
    for objective in args.objectives.split(","):
        for k in map(int, args.k.split(",")):
            for seed in map(int, args.seeds.split(",")):
                SETUP.clear()
                forget = forget_set_for(ds, objective, k, seed, model)
                retain = retain_sample_for(ds, k, seed, args.retain_fraction)
                res = unlearn("l2ul", model, forget, params, retain=retain, seed=seed)
                row = {"params": params, "retain_fraction": args.retain_fraction,
                       "objective": objective, "k": k, "seed": seed,
                       "reached": res.reached, "satisfied": f"{res.satisfied}/{res.total}",
                       "test_drop": round(before - accuracy(res.model, ds.test_x, ds.test_y), 2),
                       "steps": res.steps, "seconds": round(res.seconds, 1),
                       "setup_seconds": round(sum(SETUP.values()), 1)}
                print(json.dumps(row), flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
