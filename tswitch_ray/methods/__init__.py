"""Merging methods as pure tensor math behind one streaming protocol (see :mod:`.base`), and the
registry that names them (see :mod:`.registry`).

Every module of this package that is not private (``_name``) is imported here,
and each registers its method(s) at import: adding a method is adding a file.
``registered()`` lists them; ``get_method(name, **options)`` builds a merge
(one-model or per-task) from its name or an alias and validated options.
Eval-time methods (Auto-Switch in :mod:`.autoswitch`, WEMoE in :mod:`.wemoe`)
depend on the inputs at inference time, so they are building blocks for
``eval`` rather than state-dict merges; ``base`` and ``individual``
(:mod:`.reference`) are the zoo's own checkpoints.
"""

from __future__ import annotations

import importlib
import pkgutil

from tswitch_ray.methods.base import MergeMethod, compute_params, merge_in_memory, stable_seed
from tswitch_ray.methods.registry import (
    MethodInfo,
    MethodKind,
    MethodOptions,
    get_method,
    get_method_info,
    register,
    registered,
    validate_options,
)
from tswitch_ray.methods.storage import StorageModel

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "MergeMethod",
    "MethodInfo",
    "MethodKind",
    "MethodOptions",
    "StorageModel",
    "compute_params",
    "get_method",
    "get_method_info",
    "merge_in_memory",
    "register",
    "registered",
    "stable_seed",
    "validate_options",
]
