"""``params.yaml`` loaded into one validated, frozen config object.

One section per step, nested mappings of scalars only (DVC reads the same file). Unknown
keys, missing sections and wrong types are errors that name the key; the unlearning
method's own parameters are checked against the method's config (``make_config``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError


class ParamsError(ValueError):
    """params.yaml is missing, unreadable or invalid; the message names the key."""


def _checks_registries(info: ValidationInfo) -> bool:
    """Whether names and parameters are checked against the dataset, architecture and method
    registries. Listings skip it: they run none of them, and the registries import torch."""
    return not info.context or info.context.get("check_registries", True)


class _Section(BaseModel):
    # floats are finite everywhere (NaN passes every comparison; .inf trains nothing)
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class DatasetParams(_Section):
    name: str = "digits"
    data_dir: str = ""  # empty: the dataset's default location
    # image-folder / index-file only: resize every image to a square of this side (0: keep
    # the files' size, which must then be one for all), and channels (0: 1 for grayscale
    # files, 3 otherwise)
    image_size: int = Field(default=0, ge=0, le=4096)
    channels: int = Field(default=0, ge=0, le=3)

    @field_validator("name")
    @classmethod
    def _known(cls, name: str, info: ValidationInfo) -> str:
        if not _checks_registries(info):
            return name
        from unlearning.datasets import list_datasets

        if name not in list_datasets():
            raise ValueError(f"unknown dataset {name!r}; choose one of "
                             f"{', '.join(list_datasets())}")
        return name

    @field_validator("channels")
    @classmethod
    def _channels(cls, channels: int) -> int:
        if channels not in (0, 1, 3):
            raise ValueError(f"must be 1, 3 or 0 (from the images), got {channels}")
        return channels


class PretrainParams(_Section):
    arch: str = "small-cnn"
    epochs: int = Field(default=30, ge=1, le=10_000)
    batch_size: int = Field(default=128, ge=1, le=65_536)
    lr: float = Field(default=0.05, gt=0)
    momentum: float = Field(default=0.9, ge=0, le=1)
    weight_decay: float = Field(default=5e-4, ge=0, le=1)
    seed: int = Field(default=0, ge=0, le=2**63 - 1)
    augment: bool = False

    @field_validator("arch")
    @classmethod
    def _known(cls, arch: str, info: ValidationInfo) -> str:
        if not _checks_registries(info):
            return arch
        from unlearning.models import arch_kind

        arch_kind(arch)  # a malformed name is an error here; pretraining builds (imports) it
        return arch


class ValidationParams(_Section):
    max_batch_size: int = Field(default=256, ge=1, le=100_000)  # (a manifest's row cap)


EXACT_RETRAIN = "retrain-exact"  # the escalation's last resort (tasks/escalation.py)


class FallbackEntry(_Section):
    """One step of the escalation policy (``unlearn.fallback``): a method and its params,
    optionally only for batches whose objectives are all in ``objectives``."""
    model_config = ConfigDict(allow_inf_nan=True)

    method: str
    params: dict[str, int | float | bool | str] = Field(default_factory=dict)
    objectives: list[str] | None = None


def retain_problem(method: str, retain_fraction: float) -> str | None:
    """Why ``method`` cannot run with ``unlearn.retain_fraction`` as set, or None: a method
    that needs a retain sample gets none at 0, and one that takes none cannot use it."""
    from unlearning.methods import get_method

    info = get_method(method)
    if info.needs_retain and retain_fraction <= 0:
        return (f"{method} needs a retain sample: set unlearn.retain_fraction (at most 0.01), "
                f"or use {EXACT_RETRAIN} for exact retraining")
    if retain_fraction > 0 and not info.accepts_retain:
        return (f"{method} takes no retain sample, and unlearn.retain_fraction is "
                f"{retain_fraction}: set it to 0 or use a method that takes one")
    return None


def _check_fallback(entries: list[FallbackEntry], retain_fraction: float) -> None:
    """Every entry names a method the pipeline can run, with params its config knows."""
    from unlearning.methods import OBJECTIVES, MethodConfigError, make_config

    for i, entry in enumerate(entries):
        key = f"fallback[{i}]"
        for objective in entry.objectives or ():
            if objective not in OBJECTIVES:
                raise ValueError(f"{key}.objectives: unknown objective {objective!r}; use "
                                 f"{', '.join(OBJECTIVES)}")
        if entry.method == EXACT_RETRAIN:
            if entry.params:
                raise ValueError(f"{key}.params.{next(iter(entry.params))}: {EXACT_RETRAIN} "
                                 "takes no params (it retrains with params.yaml's pretrain "
                                 "recipe)")
            continue
        try:
            problem = retain_problem(entry.method, retain_fraction)
        except (KeyError, ValueError):
            raise ValueError(f"{key}.method: unknown method {entry.method!r}; use "
                             f"{EXACT_RETRAIN} or one of `unlearn methods`") from None
        if problem:
            raise ValueError(f"{key}.method: {problem}")
        try:
            make_config(entry.method, entry.params)
        except MethodConfigError as e:
            raise ValueError(f"{key}.params.{e.key}: {e.detail}") from None
        except (KeyError, ValueError) as e:
            raise ValueError(f"{key}.params: {e}") from None


class UnlearnParams(_Section):
    # the method's params are checked by its config (make_config), with messages that name
    # the key; NaN/inf reach it rather than a union error from pydantic
    model_config = ConfigDict(allow_inf_nan=True)

    method: str = "l2ul"
    seed: int = Field(default=0, ge=0, le=2**63 - 1)  # mixed with each batch id
    include_earlier: bool = True  # batches unlearned since the last exact model join the forget set
    params: dict[str, int | float | bool | str] = Field(default_factory=dict)
    # tried in turn when a release fails its gates (tasks/escalation.py); empty: none
    fallback: list[FallbackEntry] = Field(default_factory=list)
    # consolidation (tasks/consolidation.py): after a batch is released, an exact retrain of
    # the whole deletion history becomes the new base once this many rows were deleted since
    # the last exact model, or once this many held-out points were lost since it (0: off)
    consolidate_every: int = Field(default=0, ge=0, le=100_000_000)
    consolidate_drop: float = Field(default=0.0, ge=0, le=100, allow_inf_nan=False)
    # a retain sample for the methods that take one (l2ul): this share of the training rows,
    # never a row of a deleted batch, drawn per batch (release.retain_sample); 0: forget set
    # only, the paper's setting; at most 0.01 (1%)
    retain_fraction: float = Field(default=0.0, ge=0, le=0.01, allow_inf_nan=False)

    @model_validator(mode="after")
    def _method_params(self, info: ValidationInfo) -> UnlearnParams:
        if not _checks_registries(info):
            return self
        from unlearning.methods import MethodConfigError, make_config

        try:
            make_config(self.method, self.params)
        except MethodConfigError as e:  # a value out of range: named as unlearn.params.KEY
            raise PydanticCustomError("method_param", "{detail}",
                                      {"key": e.key, "detail": e.detail}) from None
        except (KeyError, ValueError) as e:
            raise ValueError(str(e)) from None
        problem = retain_problem(self.method, self.retain_fraction)
        if problem:
            raise ValueError(f"method: {problem}")
        _check_fallback(self.fallback, self.retain_fraction)
        return self


class EvaluateParams(_Section):
    mia: bool = True  # membership-inference metrics (reported, not gated)
    mia_max_per_side: int = Field(default=500, ge=10, le=1_000_000)


class GatesParams(_Section):
    min_objective_rate: float = Field(default=100.0, ge=0, le=100)
    max_test_drop: float = Field(default=3.0, ge=0, le=100)
    min_earlier_objective_rate: float = Field(default=100.0, ge=0, le=100)
    # as-if-unseen rows: the class-matched membership AUC against held-out data must be
    # within this many standard errors of chance (0.5), on either side
    max_membership_z: float = Field(default=3.0, gt=0)
    require_finite_weights: bool = True
    # the whole history, not only each step: held-out accuracy lost since the base model (the
    # last exact model: pretrained or adopted), and what the base itself must reach (percent;
    # chance is 10% on the bundled 10-class sets, 1% on CIFAR-100)
    max_cumulative_drop: float = Field(default=10.0, ge=0, le=100)
    min_base_accuracy: float = Field(default=20.0, ge=0, le=100)


class RegistryParams(_Section):
    model_name: str = Field(default="forget-classifier", min_length=1, max_length=200)
    experiment: str = Field(default="unlearning", min_length=1, max_length=200)

    @field_validator("model_name")
    @classmethod
    def _model_name(cls, name: str) -> str:
        # MLflow refuses "/" and ":" in a registered model's name only when it first
        # registers one; the registry's searches put the name inside a quoted filter, where a
        # quote or a backslash would change the query. Refused here, before anything runs.
        return _checked_name(name, forbidden="/:'\\\"",
                             allowed="letters, digits, spaces inside, '-', '_' or '.'")

    @field_validator("experiment")
    @classmethod
    def _experiment(cls, name: str) -> str:
        # An experiment is looked up by name, never through a filter, and workspace-style
        # names such as /Users/me/unlearning are common: only what no name can hold is refused.
        return _checked_name(name, forbidden="", allowed="printable characters")


def _checked_name(name: str, forbidden: str, allowed: str) -> str:
    bad = sorted({c for c in name if c in forbidden or not c.isprintable()})
    if bad or name != name.strip():
        what = ("leading or trailing spaces" if not bad
                else "the character(s) " + " ".join(repr(c) for c in bad))
        raise ValueError(f"{name!r} holds {what}; use {allowed}")
    return name


class RuntimeParams(_Section):
    torch_threads: int = Field(default=1, ge=0, le=256)  # 0: torch's default
    device: str = "auto"  # auto (a GPU when torch sees one) | cpu | cuda | cuda:N

    @field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        if device not in ("auto", "cpu", "cuda") and not (
                device.startswith("cuda:") and device[5:].isdigit()):
            raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
        return device

    def apply(self) -> None:
        import torch

        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)

    def torch_device(self):
        """The torch device models run on (``unlearning.devices.resolve_device``); raises
        DeviceError for cuda without a GPU."""
        from unlearning.devices import resolve_device

        return resolve_device(self.device)


class PipelineParams(_Section):
    # factories, not instances: building these defaults checks names against the registries,
    # which import torch, and a listing that loads params.yaml must not pay for that
    dataset: DatasetParams = Field(default_factory=DatasetParams)
    pretrain: PretrainParams = Field(default_factory=PretrainParams)
    validation: ValidationParams = ValidationParams()
    unlearn: UnlearnParams = Field(default_factory=UnlearnParams)
    evaluate: EvaluateParams = EvaluateParams()
    gates: GatesParams = GatesParams()
    registry: RegistryParams = RegistryParams()
    runtime: RuntimeParams = RuntimeParams()

    def sha256(self) -> str:
        """Hash of the effective parameters (canonical JSON), recorded on every release."""
        blob = json.dumps(self.model_dump(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def flat(self) -> dict[str, Any]:
        """``{"unlearn.params.lr": 1e-4, ...}`` for MLflow params."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = value

        walk("", self.model_dump())
        return out

    def with_overrides(self, section: str, **values: Any) -> PipelineParams:
        """A copy with some keys of one section replaced (validated like the file)."""
        data = self.model_dump()
        data[section].update({k: v for k, v in values.items() if v is not None})
        return parse_params(data, source="command line")


def _describe(e: ValidationError, source: str) -> str:
    parts = []
    for err in e.errors():
        key = ".".join(str(p) for p in err["loc"] if p or p == 0)  # 0: a list index
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown key {key!r}")
        elif err["type"] == "method_param":  # make_config's own check, on one key
            ctx = err.get("ctx") or {}
            parts.append(f"{key}.params.{ctx.get('key')}: {ctx.get('detail')}")
        elif err["type"] == "value_error":
            parts.append(f"{key}: {err['msg'].removeprefix('Value error, ')}")
        else:
            parts.append(f"{key}: {err['msg'].lower()} (got {err.get('input')!r})")
    return f"{source}: " + "; ".join(parts)


def parse_params(data: Any, source: str = "params",
                 check_registries: bool = True) -> PipelineParams:
    """Validate a params mapping. ``check_registries=False`` leaves the dataset name, the
    architecture and the methods' own parameters unchecked (their registries import torch),
    for commands that only read the state."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ParamsError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    try:
        return PipelineParams.model_validate(data, context={"check_registries": check_registries})
    except ValidationError as e:
        raise ParamsError(_describe(e, source)) from None


def load_params(path: str | Path, check_registries: bool = True) -> PipelineParams:
    """Read and validate a params file; raise ParamsError with a one-line reason.
    ``check_registries=False``: see ``parse_params``."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ParamsError(f"cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    except (UnicodeDecodeError, RecursionError) as e:
        raise ParamsError(f"{path} is not readable YAML text ({e.__class__.__name__})") from None
    if data is None:  # an empty (or truncated) file must not silently mean "all defaults"
        raise ParamsError(f"{path} is empty: expected one mapping per step (see params.yaml)")
    return parse_params(data, source=str(path), check_registries=check_registries)
