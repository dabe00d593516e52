"""Diagnostic for docs/l2ul.md (not a product setting): `l2ul` at k = 128 on Fashion-MNIST
given the WHOLE training split minus the forget set as a constant retain anchor. Does 128
rows' objective fit in the step cap when every other training image holds the model?

    python docs/bench/full_retain_diagnostic.py --out docs/bench/fmnist-full-retain.json

Prints one JSON line per objective; needs the cached bench checkpoint
(artifacts/bench/fashion-mnist-small-cnn-e5-s0.pt, made by any fashion-mnist `unlearn bench`).
"""

from __future__ import annotations

import argparse
import json

import torch

from unlearning.benchmark import forget_set_for
from unlearning.data import load_dataset, sample_forget_ids
from unlearning.methods import RetainSample, unlearn
from unlearning.models import load_checkpoint
from unlearning.train import accuracy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--k", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--objectives", default="misclassify,relabel")
    p.add_argument("--max-steps", type=int, default=800)
    p.add_argument("--checkpoint", default="artifacts/bench/fashion-mnist-small-cnn-e5-s0.pt")
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args()
    torch.set_num_threads(1)
    ds = load_dataset("fashion-mnist")
    model, _ = load_checkpoint(args.checkpoint)
    before = accuracy(model, ds.test_x, ds.test_y)
    keep = torch.ones(ds.num_train, dtype=torch.bool)
    keep[torch.as_tensor(sample_forget_ids(ds.num_train, args.k, args.seed))] = False
    retain = RetainSample(ds.train_x[keep], ds.train_y[keep])
    rows = []
    for objective in args.objectives.split(","):
        forget = forget_set_for(ds, objective, args.k, args.seed, model)
        res = unlearn("l2ul", model, forget, {"retain_decay": 1.0, "max_steps": args.max_steps},
                      retain=retain, seed=args.seed)
        rows.append({"objective": objective, "k": args.k, "seed": args.seed,
                     "retain_rows": len(retain.x), "reached": res.reached, "steps": res.steps,
                     "seconds": round(res.seconds, 1),
                     "test_drop": round(before - accuracy(res.model, ds.test_x, ds.test_y), 2)})
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
