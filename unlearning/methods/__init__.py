"""Unlearning methods behind one registry; importing this package registers them all."""

from ..forget_set import ForgetSet, RetainSample
from ..objectives import OBJECTIVES
from . import (  # noqa: F401  (registration side effect)
    baselines,
    boundary_shrink,
    finetune,
    jit,
    l2ul,
    l2ul_reference,
    retrain,
    salun,
    scrub,
    ssd,
)
from .loop import UnlearnResult
from .registry import (
    MethodConfigError,
    MethodInfo,
    get_method,
    list_methods,
    make_config,
    prepare,
    setup_settings,
    unlearn,
)

__all__ = [
    "OBJECTIVES", "ForgetSet", "MethodConfigError", "MethodInfo", "RetainSample", "UnlearnResult", "get_method",
    "list_methods", "make_config", "prepare", "setup_settings", "unlearn",
]
