"""The storage formulas several methods share (one checkpoint; θ0 plus switches).

The sizes they are computed from are :class:`~tswitch_ray.methods.registry.StorageModel`
(pure data, read from headers and manifests by ``eval.weights.storage_model``),
re-exported here; each method's own formula is the ``storage`` of its registry
entry, and :meth:`StorageModel.bytes_for` looks it up by name.
"""

from __future__ import annotations

from tswitch_ray.methods.registry import MethodOptions, StorageModel

__all__ = ["StorageModel", "one_model_bytes", "switches_bytes"]


def one_model_bytes(sizes: StorageModel, alpha: float | None, options: MethodOptions, query_bytes: int) -> int:
    """One checkpoint serves every task (the base, and every one-model merge)."""
    return sizes.model_bytes


def switches_bytes(sizes: StorageModel, alpha: float | None) -> int:
    """θ0 plus the encoded switches of every task at ``alpha``; -1 when no artifact has that α."""
    if alpha is None or alpha not in sizes.switch_bytes:
        return -1
    return sizes.model_bytes + sizes.switch_bytes[alpha]
