"""Where a model runs: ``runtime.device`` (auto | cpu | cuda) and batches that follow the model.

The library keeps every dataset, forget set and label on the CPU and runs each model where
its parameters are: a caller places the model (``model.to(resolve_device("auto"))``), and
every forward pass in the library goes through :func:`forward`, which moves the batch to the
model's device (and floating dtype) and brings the outputs back to the batch's. Losses,
objectives and metrics are computed next to the data, so the same code is correct on a CPU
and on a GPU; only the network's own work (and its gradients) moves. Checkpoints stay
device-independent: ``models.save_checkpoint`` writes CPU tensors and ``load_checkpoint``
maps to the CPU.

Reproducibility: on the CPU, one thread count and seed give the same weights bit for bit.
On a GPU :func:`make_deterministic` asks torch for deterministic kernels
(``torch.use_deterministic_algorithms(True, warn_only=True)``, ``CUBLAS_WORKSPACE_CONFIG``,
no cuDNN autotuning); the weights are then reproducible on the same GPU model, driver and
torch build, not across devices (GPU kernels sum in another order than CPU ones).
"""

from __future__ import annotations

import os

import torch
from torch import nn

DEVICES = ("auto", "cpu", "cuda")


class DeviceError(ValueError):
    """A device that cannot be used here (e.g. ``cuda`` without a GPU)."""


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: the GPU when ``torch.cuda.is_available()``, else the CPU; ``cpu``; ``cuda``
    (or ``cuda:N``), which must be available."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        try:
            device = torch.device(name)
        except RuntimeError:
            raise DeviceError(f"invalid device {name!r}; use auto, cpu or cuda[:N]") from None
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r} asked for, but torch sees no GPU "
                              "(torch.cuda.is_available() is False): use auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"device {name!r} asked for, but torch sees "
                              f"{torch.cuda.device_count()} GPU(s)")
        make_deterministic(device)
        return device
    raise DeviceError(f"unknown device {name!r}; use {', '.join(DEVICES)} (or cuda:N)")


def make_deterministic(device: torch.device) -> None:
    """Deterministic kernels where torch has them (warn, not fail, where it has none)."""
    if device.type == "cuda":
        # cuBLAS reads this when its first handle is created: before any GPU matmul
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)


def describe_device(device: torch.device) -> str:
    """What a weights hash depends on: ``cpu``, or ``cuda (GPU name, CUDA x.y, torch z)``."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device)
    return f"cuda ({name}, CUDA {torch.version.cuda}, torch {torch.__version__})"


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); the CPU for an empty model."""
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _model_dtype(model: nn.Module) -> torch.dtype | None:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def to_model(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` on the model's device; floating input also in the model's floating dtype."""
    dtype = _model_dtype(model) if x.is_floating_point() else None
    return x.to(device=model_device(model), dtype=dtype or x.dtype)


def forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` with ``x`` moved to the model, and the output brought back to ``x``'s
    device (and floating dtype). Gradients flow through both moves; on the model's own
    device and dtype both are no-ops (the same tensors, the same results)."""
    out = model(to_model(model, x))
    dtype = x.dtype if x.is_floating_point() and out.is_floating_point() else out.dtype
    return out.to(device=x.device, dtype=dtype)
