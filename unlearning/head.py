"""A classifier's head: the trailing block of linear layers that turns features into logits.

An update confined to the head can run on features computed once (the input to the head does
not change while only the head moves), so each step costs a pass through a few linear layers
instead of the whole network. The head is found on the model itself, for any architecture:
the largest submodule made only of linear layers and parameter-free layers (activations,
flattening, dropout) whose output *is* the model's output, checked on a probe batch.
"""

from __future__ import annotations

import torch
from torch import nn

from .devices import to_model

# Layers a head may hold besides nn.Linear: none of them has parameters or running statistics.
_PARAMETER_FREE = (nn.Flatten, nn.Dropout, nn.Identity, nn.ReLU, nn.LeakyReLU, nn.GELU,
                   nn.SiLU, nn.ELU, nn.Tanh, nn.Sigmoid, nn.Hardswish, nn.Mish, nn.Softplus)


class NoHeadError(ValueError):
    """The model ends in no block of linear layers whose output is the model's output."""


def _head_shaped(module: nn.Module) -> bool:
    leaves = [m for m in module.modules() if not list(m.children())]
    return any(isinstance(m, nn.Linear) for m in leaves) \
        and all(isinstance(m, (nn.Linear, *_PARAMETER_FREE)) for m in leaves)


def classifier_head(model: nn.Module, probe: torch.Tensor) -> tuple[str, nn.Module]:
    """``(name, module)`` of ``model``'s head, checked on ``probe`` (a few input rows): among
    the submodules of linear and parameter-free layers whose output equals the model's
    output, the one with the most parameters. NoHeadError when there is none (the model
    does something after its last linear layer, or has no linear layer)."""
    candidates = [(n, m) for n, m in model.named_modules() if n and _head_shaped(m)]
    outputs: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(
        lambda _m, _i, out, name=n: outputs.__setitem__(name, out.detach().clone())
        if isinstance(out, torch.Tensor) else None) for n, m in candidates]
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            logits = model(to_model(model, probe[:4]))
        model.train(was_training)
    finally:
        for h in hooks:
            h.remove()
    found = [(sum(p.numel() for p in m.parameters()), n, m) for n, m in candidates
             if n in outputs and outputs[n].shape == logits.shape and torch.equal(outputs[n], logits)]
    if not found:
        raise NoHeadError(f"{type(model).__name__}: no block of linear layers produces the "
                          "model's output, so there is no head to update alone")
    _, name, head = max(found, key=lambda t: t[0])
    return name, head


def head_inputs(model: nn.Module, head: nn.Module, x: torch.Tensor,
                chunk: int = 1024) -> torch.Tensor:
    """What ``head`` receives when ``model`` runs on ``x`` (no gradients; on the model's
    device), computed in chunks of ``chunk`` rows."""
    seen: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    try:
        with torch.no_grad():
            for i in range(0, len(x), chunk):
                model(to_model(model, x[i:i + chunk]))
    finally:
        handle.remove()
    if not seen:
        return torch.empty(0)
    return torch.cat(seen)
