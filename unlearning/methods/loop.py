"""The bounded unlearning loop: every optimiser step goes through :class:`Context`, which
counts steps against the budget and stops as soon as every objective holds."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..forget_set import ForgetSet
from ..train import Progress


@dataclass
class UnlearnResult:
    model: nn.Module
    reached: bool
    steps: int
    seconds: float
    satisfied: int
    total: int
    info: dict[str, Any] = field(default_factory=dict)
    # The cost in examples (:class:`ExampleCount`): set-up included, unless it was handed in.
    grad_examples: int = 0
    forward_examples: int = 0


class ExampleCount:
    """Counts the examples a model is run on while it is attached: ``grad`` for forward passes
    recorded by autograd (each is backpropagated: an example-gradient evaluation, the unit a
    retrain's cost is counted in too), ``forward`` for the rest (labels, objective checks).
    Unlike wall seconds it does not depend on the machine or its load."""

    def __init__(self, model: nn.Module):
        self.grad = 0
        self.forward = 0
        self._handle = model.register_forward_hook(self._seen)

    def _seen(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        rows = len(inputs[0]) if inputs and isinstance(inputs[0], torch.Tensor) else 0
        if isinstance(output, torch.Tensor) and output.requires_grad:
            self.grad += rows
        else:
            self.forward += rows

    def detach(self) -> None:
        self._handle.remove()


# Steps between re-reads of the as-if-unseen targets from the model being unlearned.
CEILING_REFRESH = 10


class Context:
    """Owns the optimiser step, the bound on steps and the early stop on the objective."""

    def __init__(self, model: nn.Module, forget: ForgetSet, max_steps: int,
                 generator: torch.Generator, progress: Progress | None,
                 with_retain: bool = False):
        self.model = model
        self.forget = forget
        self.max_steps = max_steps
        self.g = generator
        self.progress = progress
        self.steps = 0
        self.ceiling = forget.ceilings_for(model)  # as-if-unseen targets, refreshed as it goes
        self.reached = bool(forget.satisfied_by(model).all())
        self.info: dict[str, Any] = {}
        self.with_retain = with_retain  # the method gets a retain sample (set-ups may depend on it)
        # the method's set-up, when it has one (``registry.prepare``): computed before the
        # update, or handed in from a cache
        self.prepared: dict[str, Any] | None = None

    @property
    def done(self) -> bool:
        return self.reached or self.steps >= self.max_steps

    def step(self, optimizer: torch.optim.Optimizer, loss: torch.Tensor,
             forget_logits: Callable[[], torch.Tensor] | None = None) -> bool:
        """One optimiser step, then the objective check. Returns True when the loop must end.
        ``forget_logits``: the updated model's logits on the forget rows, for a method that
        can compute them more cheaply than a forward pass (one that moves only the head)."""
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        self.steps += 1
        phi_ref = None
        if self.steps % CEILING_REFRESH == 0:  # one forward pass over the held-out reference
            phi_ref = self.forget.reference_confidence(self.model)
            self.ceiling = self.forget.ceilings_for(self.model, phi_ref)
        logits = None
        if forget_logits is not None:
            with torch.no_grad():
                logits = forget_logits()
        ok = self.forget.satisfied_by(self.model, phi_ref, logits)
        self.reached = bool(ok.all())
        if self.progress and (self.reached or self.steps % 10 == 0):
            self.progress(self.steps, self.max_steps,
                          f"satisfied {int(ok.sum())}/{len(ok)} loss {loss.item():.3f}")
        return self.done
