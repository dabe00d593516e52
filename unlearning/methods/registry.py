"""The method registry and :func:`unlearn`, the one entry point.

A method is a function ``(model, forget, config, retain, ctx) -> None`` that updates
``model`` in place through ``ctx.step(loss)``; :func:`unlearn` copies the model first, bounds
the loop, checks the objective after every step and stops as soon as it is met.

A method may register a set-up (``prepare``): the work it does before its first step, which
depends on the model, the forget set, the seed and its settings but not on the step budget
(``l2ul``: inverted importance and its anchors). :func:`prepare` returns it with the random
state after it, so a caller can keep it (``tasks.release.prepare_batch``) and hand it to
:func:`unlearn`, which then skips the set-up and gives the same weights bit for bit.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..forget_set import ForgetSet, RetainSample
from ..train import Progress
from .loop import Context, ExampleCount, UnlearnResult

MethodFn = Callable[[nn.Module, ForgetSet, Any, "RetainSample | None", Context], None]
PrepareFn = Callable[[nn.Module, ForgetSet, Any, Context], dict[str, Any]]
# the settings a set-up never reads: attempts that differ only in these share it
BUDGET_FIELDS = ("max_steps",)


@dataclass(frozen=True)
class MethodInfo:
    name: str
    fn: MethodFn
    config_cls: type
    summary: str
    needs_retain: bool = False
    accepts_retain: bool = False
    objectives: tuple[str, ...] = ("misclassify", "relabel")
    prepare: PrepareFn | None = None  # the set-up before the first step, see the module doc


_REGISTRY: dict[str, MethodInfo] = {}


def register(name: str, config_cls: type, summary: str, needs_retain: bool = False,
             accepts_retain: bool = False,
             objectives: tuple[str, ...] = ("misclassify", "relabel"),
             prepare: PrepareFn | None = None):
    def deco(fn: MethodFn) -> MethodFn:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} registered twice")
        _REGISTRY[name] = MethodInfo(name, fn, config_cls, summary, needs_retain,
                                     accepts_retain or needs_retain, objectives, prepare)
        return fn
    return deco


def list_methods() -> list[str]:
    return sorted(_REGISTRY)


class UnknownMethodError(KeyError):
    """A method name the registry does not have. A KeyError, whose ``str`` would be the
    message's repr; this one is the message itself, ready for a one-line error."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def get_method(name: str) -> MethodInfo:
    if name not in _REGISTRY:
        raise UnknownMethodError(f"unknown method {name!r}; choose one of "
                                 f"{', '.join(list_methods())}")
    return _REGISTRY[name]


class MethodConfigError(ValueError):
    """One parameter of a method's config is out of range: ``key`` and why (``detail``);
    ``method`` once known ("invalid l2ul config: lr: must be ...")."""

    def __init__(self, key: str, detail: str, method: str | None = None):
        super().__init__(f"invalid {method} config: {key}: {detail}" if method
                         else f"{key}: {detail}")
        self.key, self.detail, self.method = key, detail, method


# integer parameters that count steps, epochs or rows per batch: at least one
_AT_LEAST_ONE = ("max_steps", "epochs")


def check_ranges(config: Any) -> None:
    """The checks every method config gets (MethodConfigError naming the first key that
    fails): floats finite, a learning rate (``lr``, ``*_lr``) positive, integers not negative,
    ``max_steps``, ``epochs`` and batch sizes at least 1."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, bool):
            continue
        if isinstance(value, float):
            if f.name == "lr" or f.name.endswith("_lr"):
                if not (math.isfinite(value) and value > 0):
                    raise MethodConfigError(f.name, "must be a positive finite number, got "
                                                    f"{value:g}")
            elif not math.isfinite(value):
                raise MethodConfigError(f.name, f"must be a finite number, got {value:g}")
        elif isinstance(value, int):
            low = 1 if f.name in _AT_LEAST_ONE or "batch" in f.name else 0
            if value < low:
                raise MethodConfigError(f.name, f"must be an integer >= {low}, got {value}")


def make_config(name: str, params: dict[str, Any] | None = None):
    """The method's config with ``params`` applied; unknown keys and wrong types are errors,
    and so are values out of range (``check_ranges``, and a config's own ``__post_init__``)."""
    cls = get_method(name).config_cls
    params = dict(params or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise ValueError(f"unknown parameter(s) for {name}: {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(fields))}")
    defaults = cls()
    for key, value in params.items():
        expected = type(getattr(defaults, key))
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            params[key] = float(value)
        elif not isinstance(value, expected) or (expected is not bool and isinstance(value, bool)):
            raise ValueError(f"{name}.{key} must be {expected.__name__}, got {value!r}")
    try:
        config = dataclasses.replace(defaults, **params)
        check_ranges(config)
    except MethodConfigError as e:
        raise MethodConfigError(e.key, e.detail, name) from None
    return config


def _config(method: str, params: dict[str, Any] | Any | None) -> Any:
    config: Any = params if dataclasses.is_dataclass(params) else make_config(method, params)
    try:
        check_ranges(config)
    except MethodConfigError as e:
        raise MethodConfigError(e.key, e.detail, method) from None
    return config


def _start(model: nn.Module, forget: ForgetSet, config: Any, seed: int,
           progress: Progress | None,
           with_retain: bool) -> tuple[nn.Module, torch.Generator, Context]:
    """The seeded copy of ``model`` a method works on, and its loop context."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    work = copy.deepcopy(model)
    for p in work.parameters():
        p.requires_grad_(True)
    return work, g, Context(work, forget, int(config.max_steps), g, progress, with_retain)


def setup_settings(method: str, params: dict[str, Any] | Any | None = None) -> dict[str, Any]:
    """The settings ``method``'s set-up depends on (all but ``BUDGET_FIELDS``): with the
    model, the forget set and the seed, they identify a :func:`prepare` result."""
    config = _config(method, params)
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in BUDGET_FIELDS}


def prepare(method: str, model: nn.Module, forget: ForgetSet,
            params: dict[str, Any] | Any | None = None, seed: int = 0,
            with_retain: bool = False) -> dict[str, Any] | None:
    """``method``'s set-up on ``model`` and ``forget`` (see the module doc), with the random
    state and the model's buffers after it; None when the method has none or the objective
    already holds (no step would run). ``with_retain``: for a run that will get a retain
    sample (``l2ul`` then needs no BatchNorm-inverted anchors). Tensors, numbers and strings
    only: ``torch.save`` keeps it and ``torch.load(weights_only=True)`` reads it back."""
    info = get_method(method)
    if info.prepare is None:
        return None
    config = _config(method, params)
    work, g, ctx = _start(model, forget, config, seed, None, with_retain)
    if ctx.reached:
        return None
    state = info.prepare(work, forget, config, ctx)
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
    return {"method": method, "state": state, "generator": g.get_state(),
            "torch_rng": torch.get_rng_state(), "cuda_rng": cuda,
            "buffers": {n: b.detach().clone() for n, b in work.named_buffers()},
            "info": {k: v for k, v in ctx.info.items() if isinstance(v, (int, float, str, bool))}}


def _resume(work: nn.Module, g: torch.Generator, ctx: Context, prepared: dict[str, Any]) -> None:
    """Continue from a :func:`prepare` result as if the set-up had just run."""
    g.set_state(prepared["generator"])
    torch.set_rng_state(prepared["torch_rng"])
    if prepared.get("cuda_rng") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(prepared["cuda_rng"])
    buffers = dict(work.named_buffers())
    with torch.no_grad():
        for name, value in prepared["buffers"].items():
            buffers[name].copy_(value)
    ctx.info.update(prepared["info"])
    ctx.prepared = prepared["state"]


def unlearn(
    method: str,
    model: nn.Module,
    forget: ForgetSet,
    params: dict[str, Any] | Any | None = None,
    retain: RetainSample | None = None,
    seed: int = 0,
    progress: Progress | None = None,
    prepared: dict[str, Any] | None = None,
) -> UnlearnResult:
    """Run ``method`` on a copy of ``model``; the original is never modified. ``prepared``:
    :func:`prepare`'s result for the same model, forget set, seed, set-up settings and
    ``with_retain`` (the caller keys it so), used instead of running the set-up again."""
    info = get_method(method)
    config = _config(method, params)
    if prepared is not None and prepared.get("method") != method:
        raise ValueError(f"a set-up prepared for {prepared.get('method')!r} cannot run {method!r}")
    if info.needs_retain and retain is None:
        raise ValueError(f"method {method!r} needs a retain sample")
    if retain is not None and not info.accepts_retain:
        raise ValueError(f"method {method!r} does not use a retain sample")
    if bool(forget.is_unseen.any()) and "as-if-unseen" not in info.objectives:
        raise ValueError(f"method {method!r} does not support the as-if-unseen objective "
                         f"(it supports {', '.join(info.objectives)})")
    start = time.perf_counter()
    work, g, ctx = _start(model, forget, config, seed, progress, retain is not None)
    count = ExampleCount(work)
    if not ctx.reached:
        if info.prepare is not None:
            if prepared is not None:
                _resume(work, g, ctx, prepared)
            else:
                ctx.prepared = info.prepare(work, forget, config, ctx)
        info.fn(work, forget, config, retain, ctx)
    work.eval()
    ok = forget.satisfied_by(work)
    count.detach()
    return UnlearnResult(
        model=work, reached=bool(ok.all()), steps=ctx.steps,
        seconds=time.perf_counter() - start, satisfied=int(ok.sum()), total=len(ok),
        info=ctx.info, grad_examples=count.grad, forward_examples=count.forward,
    )
