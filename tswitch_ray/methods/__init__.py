"""Merging methods as pure tensor math behind one streaming protocol (see :mod:`.base`).

``get_method(name, **options)`` builds a method from its CLI/config name:

=========== ============================================= =========
name        method                                        outputs
=========== ============================================= =========
avg         weight averaging                              one model
ta          Task Arithmetic                               one model
ties        TIES-Merging                                  one model
dare        DARE + Task Arithmetic                        one model
pdiscard    P-Discard merge (paper 000 eq. 4)             one model
emr         EMR-Merging (paper 003)                       per task
tswitch     T-Switch reconstruction (paper 000)           per task
=========== ============================================= =========

Auto-Switch (:mod:`.autoswitch`) and WEMoE (:mod:`.wemoe`) depend on inputs at
inference time, so they are building blocks for ``eval`` rather than
state-dict merges.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tswitch_ray.errors import ConfigError
from tswitch_ray.methods.averaging import Averaging
from tswitch_ray.methods.base import MergeMethod, compute_params, merge_in_memory, stable_seed
from tswitch_ray.methods.dare import Dare
from tswitch_ray.methods.emr import EMR
from tswitch_ray.methods.pdiscard import PDiscard
from tswitch_ray.methods.task_arithmetic import TaskArithmetic
from tswitch_ray.methods.ties import Ties
from tswitch_ray.methods.tswitch import TSwitch

METHODS: dict[str, type] = {
    "avg": Averaging,
    "ta": TaskArithmetic,
    "ties": Ties,
    "dare": Dare,
    "pdiscard": PDiscard,
    "emr": EMR,
    "tswitch": TSwitch,
}

ALIASES: dict[str, str] = {
    "averaging": "avg",
    "average": "avg",
    "weight_averaging": "avg",
    "task_arithmetic": "ta",
    "ties_merging": "ties",
    "p_discard": "pdiscard",
    "emr_merging": "emr",
    "t_switch": "tswitch",
}


def method_options(name: str) -> dict[str, Any]:
    """The options of a method and their defaults."""
    cls = METHODS[ALIASES.get(name, name)]
    return {
        f.name: f.default
        for f in dataclasses.fields(cls)
        if f.init and f.default is not dataclasses.MISSING
    }


def get_method(name: str, **options: Any) -> MergeMethod:
    """The method called ``name`` (or an alias) with ``options``; ``ConfigError`` on an
    unknown name or option."""
    key = ALIASES.get(str(name).lower().replace("-", "_"), str(name).lower().replace("-", "_"))
    if key not in METHODS:
        raise ConfigError(
            f"unknown merge method {name!r}; choose one of {', '.join(METHODS)}."
        )
    known = method_options(key)
    unknown = sorted(set(options) - set(known))
    if unknown:
        listed = ", ".join(f"{k}={v!r}" for k, v in known.items()) or "none"
        raise ConfigError(
            f"merge method {key!r} has no option(s) {', '.join(unknown)}; its options are: {listed}."
        )
    return METHODS[key](**options)


__all__ = [
    "ALIASES",
    "METHODS",
    "MergeMethod",
    "compute_params",
    "get_method",
    "merge_in_memory",
    "method_options",
    "stable_seed",
]
