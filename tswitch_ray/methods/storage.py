"""What storing a method's weights costs: the sizes it is counted from, and the shared formulas.

:class:`StorageModel` is pure data (read from headers and manifests by
``eval.weights.storage_model``); each method's formula is the ``storage`` of its
registry entry, and :meth:`StorageModel.bytes_for` looks it up by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tswitch_ray.methods.registry import MethodOptions, get_method_info, validate_options


@dataclass
class StorageModel:
    """Sizes, from headers and manifests only, that every method's storage is counted from."""

    n_tasks: int
    model_bytes: int  # one checkpoint as stored (base dtype)
    float_numel: int  # elements of the tensors that carry task vectors
    mlp_numel: int  # of which in transformer MLPs (WEMoE's experts)
    dtype_bytes: float  # mean bytes per element of the float tensors
    switch_bytes: dict[float, int] = field(default_factory=dict)  # encoded switches, all tasks, per α

    def bytes_for(self, method: str, alpha: float | None = None, options: Mapping[str, Any] | None = None,
                  query_bytes: int = 0) -> int:
        """Bytes to store what serves all tasks (base included where a method needs it); -1: unknown."""
        info = get_method_info(method)
        opts = validate_options(info.name, options or {}, for_eval=True)
        return info.storage(self, alpha, opts, query_bytes)


def one_model_bytes(sizes: StorageModel, alpha: float | None, options: MethodOptions, query_bytes: int) -> int:
    """One checkpoint serves every task (the base, and every one-model merge)."""
    return sizes.model_bytes


def switches_bytes(sizes: StorageModel, alpha: float | None) -> int:
    """θ0 plus the encoded switches of every task at ``alpha``; -1 when no artifact has that α."""
    if alpha is None or alpha not in sizes.switch_bytes:
        return -1
    return sizes.model_bytes + sizes.switch_bytes[alpha]
