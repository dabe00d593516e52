"""Classifiers built by name, with normalisation inside, and safe checkpoints.

A checkpoint is a plain dict ``{"spec": ModelSpec-as-dict, "state_dict": ...}`` saved with
``torch.save`` and always loaded with ``weights_only=True``: no pickled code ever runs.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

ARCHITECTURES = ("small-cnn", "resnet18")


class CheckpointError(ValueError):
    """A checkpoint file is missing, malformed, or does not match its recorded hash."""


class Normalize(nn.Module):
    """Per-channel standardisation as the model's first layer (buffers, device-agnostic)."""

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    mean: torch.Tensor
    std: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class SmallCNN(nn.Module):
    """Two conv blocks and a linear head; works for 8x8 (digits) and 28x28 inputs."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 16):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            )

        self.features = nn.Sequential(block(in_channels, width), block(width, 2 * width))
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * 4, 128), nn.ReLU(inplace=True),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)))


def resnet18_small(in_channels: int, num_classes: int) -> nn.Module:
    """torchvision ResNet-18 with a 3x3 stride-1 stem and no max-pool, for small images."""
    from torchvision.models import resnet18

    net = resnet18(weights=None, num_classes=num_classes)
    net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the module that a state dict belongs to."""

    arch: str
    in_channels: int
    num_classes: int
    image_size: int
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown model {self.arch!r}; choose one of {', '.join(ARCHITECTURES)}")
        if self.in_channels < 1 or self.num_classes < 2 or self.image_size < 4:
            raise ValueError(f"invalid model spec {self}")

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        known = {"arch", "in_channels", "num_classes", "image_size", "mean", "std"}
        if not isinstance(d, dict) or set(d) - known or not {"arch", "in_channels"} <= set(d):
            raise CheckpointError(f"malformed model spec: {d!r}")
        return cls(**d)


def build_model(spec: ModelSpec) -> nn.Module:
    """Return ``Sequential(Normalize, net)`` for the spec, with fresh weights."""
    net: nn.Module
    if spec.arch == "small-cnn":
        net = SmallCNN(spec.in_channels, spec.num_classes)
    else:
        net = resnet18_small(spec.in_channels, spec.num_classes)
    mean = spec.mean or [0.5] * spec.in_channels
    std = spec.std or [0.5] * spec.in_channels
    return nn.Sequential(Normalize(mean, std), net)


def spec_for(arch: str, dataset) -> ModelSpec:
    """The spec of ``arch`` for an ``ImageDataset`` (channels, classes, size, pixel stats)."""
    mean, std = dataset.channel_stats()
    c, h, _ = dataset.image_shape
    return ModelSpec(arch, c, dataset.num_classes, h, mean, std)


def state_bytes(model: nn.Module, spec: ModelSpec) -> bytes:
    """Serialise a checkpoint deterministically (same weights -> same bytes)."""
    buf = io.BytesIO()
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    torch.save({"spec": asdict(spec), "state_dict": state}, buf)
    return buf.getvalue()


def weights_sha256(model: nn.Module) -> str:
    """Hash of the weights alone (names, dtypes, shapes and values), independent of pickling."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(path: str | os.PathLike, model: nn.Module, spec: ModelSpec) -> str:
    """Write atomically (temp file + rename) and return the weights' sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(state_bytes(model, spec))
    os.replace(tmp, path)
    return weights_sha256(model)


def load_checkpoint(
    path: str | os.PathLike, expected_sha256: str | None = None
) -> tuple[nn.Module, ModelSpec]:
    """Load a checkpoint weights-only; refuse pickled code and hash mismatches."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (any failure to parse means: not a checkpoint of ours)
        raise CheckpointError(f"refusing to load {path}: not a weights-only checkpoint ({e.__class__.__name__})") from None
    if not isinstance(payload, dict) or set(payload) != {"spec", "state_dict"}:
        raise CheckpointError(f"{path} is not a checkpoint written by this project")
    spec = ModelSpec.from_dict(payload["spec"])
    model = build_model(spec)
    try:
        model.load_state_dict(payload["state_dict"])
    except (RuntimeError, TypeError) as e:
        raise CheckpointError(f"{path}: weights do not fit a {spec.arch}: {str(e)[:200]}") from None
    model.eval()
    if expected_sha256 is not None and weights_sha256(model) != expected_sha256:
        raise CheckpointError(f"{path}: weights sha256 differs from the recorded one (tampered?)")
    return model, spec
