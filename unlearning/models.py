"""Classifiers built by name, with the input contract inside, and safe checkpoints.

An architecture is named by a string (:data:`ARCH_FORMS`): a built-in (``small-cnn``,
``resnet18``), any classification builder of ``torchvision.models`` (``torchvision:NAME``,
built with ``weights=None`` and ``num_classes=``), a ``timm`` model (``timm:NAME``, when timm
is installed) or a user's own factory (``package.module:function``, called with
``num_classes=``; its module must be importable wherever the checkpoint is loaded).

Every model the library works with is ``Sequential(Normalize, net)``: images come in as float
pixels in [0, 1] at the dataset's size (attacks and shifts work there), and ``Normalize``
applies the input contract the network was trained with (channels, size, mean/std) as its
first layer. What a consumer loads is :func:`published_model`: the whole model for the
pipeline's own (``contract="pixels"``: pixels in [0, 1]), the network alone for an adopted
one (``contract="preprocessed"``: the user's own preprocessed input, so it is a drop-in
replacement for the model they adopted).

A checkpoint is a plain dict ``{"spec": ModelSpec-as-dict, "state_dict": ...}`` saved with
``torch.save`` from CPU tensors and always loaded with ``weights_only=True`` onto the CPU: no
pickled code ever runs. (A factory spec does import its module: load checkpoints from
registries you trust; the pipeline checks their weights against the registry's sha256.)
"""

from __future__ import annotations

import hashlib
import importlib
import io
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ARCHITECTURES = ("small-cnn", "resnet18")  # built in; the other forms are named by prefix
ARCH_FORMS = "small-cnn, resnet18, torchvision:NAME, timm:NAME or package.module:function"
CONTRACTS = ("pixels", "preprocessed")
# torchvision's rgb_to_grayscale weights (ITU-R 601-2 luma)
LUMA = (0.2989, 0.587, 0.114)
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


class CheckpointError(ValueError):
    """A checkpoint file is missing, malformed, or does not match its recorded hash."""


class ArchitectureError(ValueError):
    """An architecture name that does not resolve to a network (one line: what and why)."""


class WeightsError(ValueError):
    """A state dict that cannot be read safely or does not fit its architecture."""


class Normalize(nn.Module):
    """The input contract as the model's first layer: pixels in [0, 1] at the dataset's size
    become what the network takes. ``channels`` (0: as given) repeats a gray image to three
    channels or reduces RGB to luma; ``size`` (0: as given) resizes bilinearly (antialiased,
    as torchvision's ``Resize`` on tensors); then per-channel ``(x - mean) / std``. Mean and
    std are buffers (they move with the model and are part of its state dict)."""

    def __init__(self, mean: list[float], std: list[float], channels: int = 0, size: int = 0):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))
        self.channels = channels
        self.size = size

    mean: torch.Tensor
    std: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels and x.shape[1] != self.channels:
            if x.shape[1] == 1:
                x = x.expand(-1, self.channels, -1, -1)
            else:
                luma = torch.tensor(LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
                x = (x * luma).sum(1, keepdim=True)
        if self.size and (x.shape[-2] != self.size or x.shape[-1] != self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear",
                              align_corners=False, antialias=True)
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"channels={self.channels or 'as given'}, size={self.size or 'as given'}"


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


# -- architectures ----------------------------------------------------------------------------


def arch_kind(arch: str) -> str:
    """``builtin``, ``torchvision``, ``timm`` or ``factory`` for a well-formed name (nothing is
    imported); ArchitectureError otherwise."""
    if arch in ARCHITECTURES:
        return "builtin"
    prefix, sep, name = arch.partition(":")
    if sep and prefix in ("torchvision", "timm"):
        if re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
            return prefix
    elif sep and re.fullmatch(rf"{_IDENT}(\.{_IDENT})*", prefix) \
            and re.fullmatch(_IDENT, name) and not name.startswith("_"):
        return "factory"
    raise ArchitectureError(f"unknown model {arch!r}; use {ARCH_FORMS}")


def _torchvision_builder(name: str) -> Callable[..., nn.Module]:
    import torchvision.models as tvm
    from torchvision.models import get_model_builder, list_models

    if name not in list_models(module=tvm):
        raise ArchitectureError(f"torchvision has no classification model {name!r} (see "
                                "torchvision.models.list_models(module=torchvision.models))")
    return get_model_builder(name)


def _timm():
    try:
        import timm  # type: ignore[import-not-found]
    except ImportError:
        raise ArchitectureError("timm models need the timm package: pip install timm") from None
    return timm


def _factory(arch: str) -> Callable[..., nn.Module]:
    """The user's ``package.module:function``, imported (a one-line error if it cannot be)."""
    module_name, _, fn_name = arch.partition(":")
    if module_name.split(".")[0] in sys.stdlib_module_names:
        raise ArchitectureError(f"model factory {arch!r}: {module_name!r} is a standard-library "
                                "module, not a model factory")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001  (any import failure: the factory is unusable here)
        raise ArchitectureError(
            f"model factory {arch!r}: cannot import {module_name!r} ({e.__class__.__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); it must be importable wherever the "
            "model is built (install it, or add its folder to PYTHONPATH)") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ArchitectureError(f"model factory {arch!r}: {module_name!r} has no function "
                                f"{fn_name!r}")
    return fn


def check_arch(arch: str) -> str:
    """Raise ArchitectureError unless ``arch`` names a network that can be built here
    (imports the factory's module, torchvision or timm); return ``arch``."""
    kind = arch_kind(arch)
    name = arch.partition(":")[2]
    if kind == "torchvision":
        _torchvision_builder(name)
    elif kind == "timm" and not _timm().is_model(name):
        raise ArchitectureError(f"timm has no model {name!r} (see timm.list_models())")
    elif kind == "factory":
        _factory(arch)
    return arch


def default_net_channels(arch: str, in_channels: int) -> int:
    """The channels a freshly built ``arch`` takes: 3 for torchvision's builders (they have
    no channel argument) and timm's, the data's own for the built-ins and factories."""
    return 3 if arch_kind(arch) in ("torchvision", "timm") else in_channels


def build_net(arch: str, num_classes: int, channels: int) -> nn.Module:
    """The bare network of ``arch`` with fresh weights (``channels``: what it takes)."""
    kind = arch_kind(arch)
    name = arch.partition(":")[2]
    net: object
    if kind == "builtin":
        net = SmallCNN(channels, num_classes) if arch == "small-cnn" \
            else resnet18_small(channels, num_classes)
    elif kind == "torchvision":
        net = _torchvision_builder(name)(weights=None, num_classes=num_classes)
    elif kind == "timm":
        timm = _timm()
        if not timm.is_model(name):
            raise ArchitectureError(f"timm has no model {name!r} (see timm.list_models())")
        net = timm.create_model(name, pretrained=False, num_classes=num_classes,
                                in_chans=channels)
    else:
        try:
            net = _factory(arch)(num_classes=num_classes)
        except ArchitectureError:
            raise
        except Exception as e:  # noqa: BLE001  (the user's code: say what failed, on one line)
            raise ArchitectureError(f"model factory {arch!r} failed when called with "
                                    f"num_classes={num_classes}: {e.__class__.__name__}: "
                                    f"{str(e).splitlines()[0] if str(e) else ''}") from None
    if not isinstance(net, nn.Module):
        raise ArchitectureError(f"{arch!r} returned a {type(net).__name__}, not a torch "
                                "nn.Module")
    return net


# -- the spec ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the module that a state dict belongs to.

    ``in_channels`` and ``image_size`` describe the pixels the pipeline feeds (the dataset's
    images); ``net_channels`` and ``net_size`` what the network takes (0: the same), and
    ``mean``/``std`` its normalisation (empty: 0.5). ``contract`` says what a consumer of the
    published model feeds it (:func:`published_model`).
    """

    arch: str
    in_channels: int
    num_classes: int
    image_size: int
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    net_channels: int = 0
    net_size: int = 0
    contract: str = "pixels"

    def __post_init__(self) -> None:
        arch_kind(self.arch)  # a malformed name is refused here; nothing is imported
        if self.in_channels < 1 or self.num_classes < 2 or self.image_size < 4 \
                or self.net_size < 0 or self.net_channels < 0:
            raise ValueError(f"invalid model spec {self}")
        if self.channels != self.in_channels and {self.channels, self.in_channels} != {1, 3}:
            raise ValueError(f"cannot turn {self.in_channels}-channel images into the "
                             f"{self.channels} channels the network takes (only 1 <-> 3)")
        for what, values in (("mean", self.mean), ("std", self.std)):
            if values and len(values) != self.channels:
                raise ValueError(f"{what} has {len(values)} value(s); the network takes "
                                 f"{self.channels} channel(s)")
        if any(not v > 0 for v in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
        if self.contract not in CONTRACTS:
            raise ValueError(f"contract must be one of {CONTRACTS}, got {self.contract!r}")

    @property
    def channels(self) -> int:
        """The channels the network takes."""
        return self.net_channels or self.in_channels

    @property
    def size(self) -> int:
        """The side of the images the network takes."""
        return self.net_size or self.image_size

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        known = {f for f in cls.__dataclass_fields__}
        if not isinstance(d, dict) or set(d) - known or not {"arch", "in_channels"} <= set(d):
            raise CheckpointError(f"malformed model spec: {d!r}")
        try:
            return cls(**d)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"malformed model spec: {e}") from None


def build_model(spec: ModelSpec) -> nn.Sequential:
    """Return ``Sequential(Normalize, net)`` for the spec, with fresh weights.

    Raises ArchitectureError when the network cannot be built here (a factory's module that
    is not importable, timm not installed, an unknown torchvision name)."""
    net = build_net(spec.arch, spec.num_classes, spec.channels)
    mean = spec.mean or [0.5] * spec.channels
    std = spec.std or [0.5] * spec.channels
    channels = spec.channels if spec.channels != spec.in_channels else 0
    size = spec.net_size if spec.net_size and spec.net_size != spec.image_size else 0
    return nn.Sequential(Normalize(mean, std, channels, size), net)


def spec_for(arch: str, dataset) -> ModelSpec:
    """The spec of ``arch`` for an ``ImageDataset`` (channels, classes, size, pixel stats), to
    be trained by the pipeline (its consumers feed pixels in [0, 1])."""
    mean, std = dataset.channel_stats()
    c, h, _ = dataset.image_shape
    channels = default_net_channels(arch, c)
    if channels != c:  # gray repeated to RGB: the same statistics on every channel
        mean, std = [mean[0]] * channels, [std[0]] * channels
    return ModelSpec(arch, c, dataset.num_classes, h, mean, std,
                     net_channels=channels if channels != c else 0)


def published_model(model: nn.Module, spec: ModelSpec) -> nn.Module:
    """What a consumer loads from the registry: ``model`` itself (pixels in [0, 1]), or for
    an adopted model (``contract="preprocessed"``) the network alone, which takes the input
    the user's own preprocessing produces, exactly as the model they adopted did."""
    return model[1] if spec.contract == "preprocessed" else model  # type: ignore[index]


def consumer_input(model: nn.Module, spec: ModelSpec, x: torch.Tensor) -> torch.Tensor:
    """Pixels in [0, 1] turned into what :func:`published_model` takes."""
    if spec.contract != "preprocessed":
        return x
    with torch.no_grad():
        return model[0](x)  # type: ignore[index]


def input_contract(spec: ModelSpec) -> dict:
    """The published model's input, for humans and for the registry's tags."""
    mean = spec.mean or [0.5] * spec.channels
    std = spec.std or [0.5] * spec.channels
    steps = ["pixels as float in [0, 1] (torchvision ToTensor)"]
    if spec.channels != spec.in_channels:
        steps.append("gray repeated to 3 channels" if spec.in_channels == 1
                     else "RGB to luma (torchvision rgb_to_grayscale)")
    if spec.size != spec.image_size:
        steps.append(f"resized to {spec.size}x{spec.size} (bilinear, antialiased)")
    steps.append(f"normalised with mean {mean} and std {std}")
    if spec.contract == "pixels":
        return {"input": "pixels", "shape": [spec.in_channels, spec.image_size, spec.image_size],
                "range": [0.0, 1.0], "inside_the_model": steps[1:]}
    return {"input": "preprocessed", "shape": [spec.channels, spec.size, spec.size],
            "preprocessing": steps, "mean": mean, "std": std}


# -- weights ----------------------------------------------------------------------------------


def read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], ModelSpec | None]:
    """A ``state_dict`` saved with ``torch.save``, read with ``weights_only=True`` onto the CPU,
    and the ModelSpec when the file is one of this project's checkpoints (else None).

    Accepts the dict itself, or a dict holding it under ``state_dict`` (this project's
    checkpoints, Lightning's); a ``module.`` prefix on every key (DataParallel) is removed.
    A file that only loads by unpickling code (``torch.save(model)``) is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (whatever torch says: not a weights-only file)
        if "Weights only load failed" in str(e):
            raise WeightsError(
                f"{path} is not a weights-only state_dict: it only loads by unpickling code "
                "or objects (e.g. a whole model saved with torch.save(model)); save "
                "model.state_dict() instead") from None
        raise WeightsError(f"{path} is not a file written by torch.save "
                           f"({e.__class__.__name__})") from None
    spec = None
    if isinstance(payload, dict) and set(payload) == {"spec", "state_dict"}:
        try:
            spec = ModelSpec.from_dict(payload["spec"])
        except CheckpointError as e:
            raise WeightsError(f"{path}: {e}") from None
    return as_state_dict(payload, str(path)), spec


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of :func:`read_weights`."""
    return read_weights(path)[0]


def as_state_dict(payload: object, where: str) -> dict[str, torch.Tensor]:
    """``payload`` as a plain ``{name: tensor}`` dict (see :func:`read_state_dict`)."""
    if isinstance(payload, Mapping) and isinstance(payload.get("state_dict"), Mapping):
        payload = payload["state_dict"]
    if not isinstance(payload, Mapping) or not payload:
        raise WeightsError(f"{where} does not hold a state_dict (a mapping of parameter names "
                           f"to tensors; got {type(payload).__name__})")
    bad = next((k for k, v in payload.items() if not isinstance(k, str)
                or not torch.is_tensor(v)), None)
    if bad is not None:
        raise WeightsError(f"{where} is not a state_dict: entry {bad!r} is not a named tensor")
    state = {str(k): v for k, v in payload.items()}
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(d) for d in t.shape) + ")"


def state_dict_problem(module: nn.Module, state: Mapping[str, torch.Tensor]) -> str | None:
    """Why ``state`` does not fit ``module`` (None if it does): the first missing,
    unexpected or mis-shaped key, and how many more there are."""
    wanted = module.state_dict()
    missing = [k for k in wanted if k not in state]
    unexpected = [k for k in state if k not in wanted]
    shaped = [k for k in wanted if k in state and state[k].shape != wanted[k].shape]
    more = lambda found: f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    if missing:
        return f"missing key {missing[0]!r}{more(missing)}"
    if unexpected:
        return f"unexpected key {unexpected[0]!r}{more(unexpected)}"
    if shaped:
        k = shaped[0]
        return (f"key {k!r} has shape {_shape(state[k])} in the weights, the architecture "
                f"expects {_shape(wanted[k])}{more(shaped)}")
    return None


def class_count_of(arch: str, state: Mapping[str, torch.Tensor], num_classes: int,
                   channels: int) -> int | None:
    """The class count the weights were trained for when it is not ``num_classes`` and the
    weights fit ``arch`` built with it (None otherwise)."""
    try:
        net = build_net(arch, num_classes, channels)
    except ArchitectureError:
        return None
    wanted = net.state_dict()
    for k, t in wanted.items():
        if k in state and state[k].dim() >= 1 and t.dim() >= 1 and t.shape[0] == num_classes \
                and state[k].shape[0] != num_classes and state[k].shape[1:] == t.shape[1:]:
            other = int(state[k].shape[0])
            if other >= 2:
                try:
                    if state_dict_problem(build_net(arch, other, channels), state) is None:
                        return other
                except ArchitectureError:
                    return None
    return None


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
    path: str | os.PathLike, expected_sha256: str | None = None,
    device: torch.device | str | None = None,
) -> tuple[nn.Module, ModelSpec]:
    """Load a checkpoint weights-only; refuse pickled code and hash mismatches. The model is
    moved to ``device`` (default: it stays on the CPU) after the hash check."""
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
    try:
        model = build_model(spec)
    except ArchitectureError as e:
        raise CheckpointError(f"{path}: {e}") from None
    problem = state_dict_problem(model, payload["state_dict"]) \
        if isinstance(payload["state_dict"], Mapping) else "not a state dict"
    if problem:
        raise CheckpointError(f"{path}: weights do not fit a {spec.arch}: {problem}")
    try:
        model.load_state_dict(payload["state_dict"])
    except (RuntimeError, TypeError) as e:
        raise CheckpointError(f"{path}: weights do not fit a {spec.arch}: {str(e)[:200]}") from None
    model.eval()
    if expected_sha256 is not None and weights_sha256(model) != expected_sha256:
        raise CheckpointError(f"{path}: weights sha256 differs from the recorded one (tampered?)")
    if device is not None:
        model.to(device)
    return model, spec
