"""What a release report shows, computed: per-instance predictions before and after, per-class
accuracy, the confidence and loss distributions behind membership inference, and targeted
adversarial examples of the forget instances. Pure PyTorch and numpy; the report task
gathers the inputs and the renderer draws the result."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .attacks import l2_pgd_targeted, random_other_labels
from .train import predict_logits


def predict_probs(model, x) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities and argmax predictions (numpy)."""
    probs = F.softmax(predict_logits(model, x), 1).numpy()
    return probs, probs.argmax(1)


def forget_rows(parent, model, forget, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per forget instance: its image, label, objective, and both models' predictions.

    ``parent`` may be None (then the "before" columns are None); ``requests`` are the
    manifest rows in the forget set's order (request_id, instance_id, objective, new_label).
    """
    probs, pred = predict_probs(model, forget.x)
    p_probs, p_pred = predict_probs(parent, forget.x) if parent is not None else (None, None)
    ok = forget.satisfied_by(model).numpy()
    rows = []
    for i, req in enumerate(requests):
        label = int(forget.y[i])
        rows.append({
            "instance_id": int(req["instance_id"]), "request_id": req["request_id"],
            "instance_key": req.get("instance_key"),
            "objective": req["objective"], "label": label,
            "new_label": None if req.get("new_label") is None else int(req["new_label"]),
            "before_pred": None if p_pred is None else int(p_pred[i]),
            "before_conf": (None if p_probs is None or p_pred is None
                            else float(p_probs[i, int(p_pred[i])])),
            "before_label_conf": None if p_probs is None else float(p_probs[i, label]),
            "after_pred": int(pred[i]), "after_conf": float(probs[i, pred[i]]),
            "after_label_conf": float(probs[i, label]),
            "objective_met": bool(ok[i]),
            # as-if-unseen: the most confidence in its label the row may keep
            "ceiling_conf": (float(forget.ceiling[i].sigmoid())
                             if forget.ceiling is not None and bool(forget.is_unseen[i])
                             else None),
            "image": forget.x[i].numpy(),
        })
    return rows


def per_class_accuracy(model, x, y, num_classes: int) -> list[float | None]:
    """Top-1 accuracy (percent) per class; None for a class absent from ``y``."""
    _, pred = predict_probs(model, x)
    labels = y.numpy()
    out: list[float | None] = []
    for c in range(num_classes):
        mask = labels == c
        out.append(float(100.0 * (pred[mask] == c).mean()) if mask.any() else None)
    return out


def class_accuracy_table(parent, model, x, y, class_names: tuple[str, ...]) -> dict[str, Any]:
    """Held-out accuracy per class of the parent and of the release, with class counts."""
    n = len(class_names)
    counts = np.bincount(y.numpy(), minlength=n)
    before = per_class_accuracy(parent, x, y, n) if parent is not None else [None] * n
    after = per_class_accuracy(model, x, y, n)
    return {"classes": list(class_names), "counts": counts.tolist(), "parent": before,
            "release": after}


def score_distributions(parent, model, sets: dict[str, tuple[Any, Any]]) -> dict[str, Any]:
    """True-class confidence and loss of each named set under both models (the MIA view).

    ``sets`` maps a name ("forget", "held-out", "retain sample") to (x, y). Returns
    ``{"scores": {model: {set: {"confidence": array, "loss": array}}}, "summary": ...}``
    where the summary holds each set's mean confidence and mean loss per model.
    """
    scores: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for who, net in (("parent", parent), ("release", model)):
        if net is None:
            continue
        scores[who], summary[who] = {}, {}
        for name, (x, y) in sets.items():
            if len(x) == 0:
                continue
            probs, _ = predict_probs(net, x)
            conf = probs[np.arange(len(y)), y.numpy()]
            loss = -np.log(np.clip(conf, 1e-12, None))
            scores[who][name] = {"confidence": conf, "loss": loss}
            summary[who][name] = {"n": len(conf), "mean_confidence": float(conf.mean()),
                                  "mean_loss": float(loss.mean())}
    return {"scores": scores, "summary": summary}


def adversarial_examples(parent, model, forget, requests: list[dict[str, Any]],
                         num_classes: int, count: int, eps_rms: float, steps: int,
                         seed: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Targeted L2 PGD examples of the first ``count`` forget instances, from the parent.

    The same construction the unlearning method trains on (random other target label,
    radius ``eps_rms * sqrt(pixels)``); each row shows the source, the adversarial image,
    the target and what the parent and the release predict on the adversarial image.
    """
    k = min(count, len(forget))
    dim = int(np.prod(forget.x.shape[1:]))
    eps = eps_rms * math.sqrt(dim)
    settings = {"count": k, "eps": eps, "eps_rms": eps_rms, "steps": steps,
                "step_size": 2.5 * eps / max(steps, 1), "seed": seed}
    if k == 0 or parent is None:
        return [], settings
    g = torch.Generator().manual_seed(seed)
    x, avoid = forget.x[:k], forget.avoid[:k]
    target = random_other_labels(avoid, num_classes, g)
    x_adv = l2_pgd_targeted(parent, x, target, eps, settings["step_size"], steps, g)
    p_src, pred_src = predict_probs(parent, x)
    p_adv, pred_adv = predict_probs(parent, x_adv)
    r_adv, rpred_adv = predict_probs(model, x_adv)
    rows = []
    for i in range(k):
        rows.append({
            "instance_id": int(requests[i]["instance_id"]), "label": int(forget.y[i]),
            "target": int(target[i]), "l2": float((x_adv[i] - x[i]).norm()),
            "parent_source_pred": int(pred_src[i]),
            "parent_source_conf": float(p_src[i, pred_src[i]]),
            "parent_adv_pred": int(pred_adv[i]), "parent_adv_conf": float(p_adv[i, pred_adv[i]]),
            "release_adv_pred": int(rpred_adv[i]),
            "release_adv_conf": float(r_adv[i, rpred_adv[i]]),
            "hit": bool(pred_adv[i] == target[i]),
            "source": x[i].numpy(), "adversarial": x_adv[i].numpy(),
        })
    return rows, settings
