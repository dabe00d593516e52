"""Metric definitions shared by gates, reports and benchmarks.

Accuracies are in percent. MIA efficacy follows SalUn: an RBF SVC (C=3) trained on the
true-class softmax probability, members = a retain sample, non-members = held-out data;
the score is the share of forget instances the attack calls non-members.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .forget_set import ForgetSet
from .train import accuracy, predict_logits


def true_class_prob(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Softmax probability of the true class; 0 where the model's output is not finite (a
    diverged model, e.g. gradient ascent: it is sure of nothing, and the attacks still run)."""
    probs = F.softmax(predict_logits(model, x), 1)
    return torch.nan_to_num(probs.gather(1, y[:, None]).squeeze(1), nan=0.0).numpy()


def per_example_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Cross-entropy per row; 1e6 where it is not finite (a diverged model)."""
    loss = F.cross_entropy(predict_logits(model, x), y, reduction="none")
    return torch.nan_to_num(loss, nan=1e6, posinf=1e6).numpy()


def objective_rate(model: nn.Module, forget: ForgetSet) -> float:
    """Share (percent) of instances whose objective holds."""
    if len(forget) == 0:
        return 100.0
    return 100.0 * forget.satisfied_by(model).float().mean().item()


def relabel_success(model: nn.Module, forget: ForgetSet) -> float | None:
    """Share (percent) of relabel rows predicted as their new label; None if there are none."""
    mask = forget.is_relabel
    if not bool(mask.any()):
        return None
    pred = predict_logits(model, forget.x[mask]).argmax(1)
    return 100.0 * (pred == forget.relabel_to[mask]).float().mean().item()


def mia_efficacy(
    model: nn.Module,
    retain: tuple[torch.Tensor, torch.Tensor],
    heldout: tuple[torch.Tensor, torch.Tensor],
    forget: tuple[torch.Tensor, torch.Tensor],
    seed: int = 0,
    max_per_side: int = 2000,
) -> float:
    """SalUn-style MIA efficacy in percent (higher = forget set looks less like members)."""
    from sklearn.svm import SVC

    rng = np.random.default_rng(seed)

    def sample(x, y):
        idx = rng.permutation(len(x))[:max_per_side]
        return true_class_prob(model, x[idx], y[idx])

    p_in, p_out = sample(*retain), sample(*heldout)
    n = min(len(p_in), len(p_out))  # balance the two classes
    feats = np.concatenate([p_in[:n], p_out[:n]])[:, None]
    labels = np.concatenate([np.ones(n), np.zeros(n)])
    clf = SVC(C=3, kernel="rbf", gamma="auto").fit(feats, labels)
    p_forget = true_class_prob(model, *forget)[:, None]
    return 100.0 * float((clf.predict(p_forget) == 0).mean())


def loss_mia_auc(model: nn.Module, members: tuple[torch.Tensor, torch.Tensor],
                 nonmembers: tuple[torch.Tensor, torch.Tensor]) -> float:
    """AUC of the loss-threshold attack (lower loss = member): 0.5 is chance."""
    from sklearn.metrics import roc_auc_score

    l_in, l_out = per_example_loss(model, *members), per_example_loss(model, *nonmembers)
    scores = np.concatenate([-l_in, -l_out])
    labels = np.concatenate([np.ones(len(l_in)), np.zeros(len(l_out))])
    return float(roc_auc_score(labels, scores))


def membership_auc(model: nn.Module, forget: tuple[torch.Tensor, torch.Tensor],
                   heldout: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, float]:
    """Class-matched confidence attack on the forget rows: the AUC of telling them from
    held-out rows of the same class by the model's confidence in the label (more confident
    = member), and its z-score against chance.

    Confidence is LiRA's phi = log(p / (1 - p)) (:func:`confidence_logit`): it ranks rows as
    the loss does, but a memorised row's loss rounds to 0.0 in float32 and ties with every
    confident held-out row, where phi still tells them apart. Per forget row, the share of
    same-class held-out rows the model is less sure of (ties count half); the AUC is their
    mean. Matching classes keeps a batch drawn from one hard class from looking "unseen" just
    because its class is hard. Rows never trained on are exchangeable with held-out data:
    each share is uniform, the AUC is 0.5 with standard error sqrt(1 / (12 n)). Far above
    chance the rows still look like members; far below, deliberately damaged, which reveals
    the deletion as much.
    """
    from .objectives import class_ranks, confidence_logit

    fx, fy = forget
    hx, hy = heldout
    if len(fx) == 0:
        raise ValueError("no forget rows")
    fy, hy = fy.long(), hy.long()
    # a diverged model (NaN outputs) is sure of nothing: the lowest confidence
    phi_in = torch.nan_to_num(confidence_logit(predict_logits(model, fx), fy), nan=-torch.inf)
    phi_out = torch.nan_to_num(confidence_logit(predict_logits(model, hx), hy), nan=-torch.inf)
    judged = torch.isin(fy, hy)  # a class with no held-out rows cannot be judged
    if not bool(judged.any()):
        raise ValueError("no held-out rows of the forget rows' classes")
    auc = float(class_ranks(phi_in[judged], fy[judged], phi_out, hy).mean())
    return auc, (auc - 0.5) / float(np.sqrt(1.0 / (12 * int(judged.sum()))))


def evaluate_unlearning(
    model: nn.Module,
    parent: nn.Module,
    forget: ForgetSet,
    test: tuple[torch.Tensor, torch.Tensor],
    earlier: ForgetSet | None = None,
    parent_test_acc: float | None = None,
) -> dict[str, float | None]:
    """The release metrics: objective on this batch and on earlier ones, held-out accuracy."""
    test_acc = accuracy(model, *test)
    before = parent_test_acc if parent_test_acc is not None else accuracy(parent, *test)
    return {
        "forget_acc": accuracy(model, forget.x, forget.y),
        "objective_rate": objective_rate(model, forget),
        "relabel_success": relabel_success(model, forget),
        "test_acc_before": before,
        "test_acc": test_acc,
        "test_drop": before - test_acc,
        "earlier_objective_rate": objective_rate(model, earlier) if earlier is not None and len(earlier) else None,
        "weights_finite": float(all(torch.isfinite(p).all() for p in model.parameters())),
    }
