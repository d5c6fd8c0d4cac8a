"""The merge-method protocol and its single-process driver.

The pipeline streams checkpoints tensor by tensor and shards tensors across
workers, so a method never sees the whole model at once. A method that needs a
statistic of the whole task vector (a top-k threshold, a norm, a per-task
rescaler) declares ``stat_rounds`` global-statistics rounds:

    params = None
    for r in range(method.stat_rounds):
        stats = [method.tensor_stats(r, name, base, taus, params) for name in tensors]
        params = method.combine(r, stats, params)        # on the driver
    out[name] = method.merge_tensor(name, base, taus, params)

``tensor_stats`` runs wherever the tensor lives and returns something small and
picklable; ``combine`` receives the stats of *all* tensors in one fixed order
(the order of the tensor list, whatever the sharding) and must be deterministic
in that order, so that a sharded run reproduces :func:`merge_in_memory` byte for
byte. The methods here are stronger than that: a per-tensor float statistic
comes from :func:`sum64` (independent of the thread count) and the driver adds
them with ``math.fsum`` (exactly rounded), so the result does not even depend
on the tensor order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import torch

from tswitch_ray.errors import ConfigError, ZooError
from tswitch_ray.switch.taskvec import task_vector

Tensor = torch.Tensor


@runtime_checkable
class MergeMethod(Protocol):
    """What every merging method implements (see the module docstring)."""

    name: str
    per_task: bool
    stat_rounds: int

    def tensor_stats(
        self, round: int, name: str, base: Tensor, taus: list[Tensor], params: Any
    ) -> Any: ...

    def combine(self, round: int, stats: list[Any], params: Any) -> Any: ...

    def merge_tensor(
        self, name: str, base: Tensor, taus: list[Tensor], params: Any
    ) -> Tensor | list[Tensor]: ...


class LocalMethod:
    """Mix-in for methods without global statistics (``stat_rounds = 0``)."""

    stat_rounds: ClassVar[int] = 0

    def tensor_stats(
        self, round: int, name: str, base: Tensor, taus: list[Tensor], params: Any
    ) -> Any:
        raise RuntimeError(f"{type(self).__name__} has no statistics rounds")

    def combine(self, round: int, stats: list[Any], params: Any) -> Any:
        raise RuntimeError(f"{type(self).__name__} has no statistics rounds")


# --------------------------------------------------------------------------- helpers


def to_base_dtype(x32: Tensor, base: Tensor) -> Tensor:
    """Cast an fp32 result back to the base tensor's dtype (and keep its shape)."""
    return x32.to(base.dtype).reshape(base.shape)


def sum64(x: Tensor) -> float:
    """Sum of ``x`` in float64, reproducible whatever the thread count.

    torch's CPU reductions split the work by thread count, so the last bits of
    a float sum can differ between a driver and a Ray worker; NumPy's pairwise
    sum is single-threaded and depends only on the data. On CUDA the reduction
    order is fixed for a given device and shape, so torch is used there.
    """
    if x.numel() == 0:
        return 0.0
    if x.is_cuda:
        return float(x.to(torch.float64).sum().item())
    return float(np.sum(x.detach().reshape(-1).numpy(), dtype=np.float64))


def sumsq64(x: Tensor) -> float:
    """Σ x² with the squares and the sum in float64, reproducible like :func:`sum64`."""
    if x.numel() == 0:
        return 0.0
    if x.is_cuda:
        x64 = x.to(torch.float64)
        return float(torch.dot(x64.reshape(-1), x64.reshape(-1)).item())
    x64 = x.detach().reshape(-1).numpy().astype(np.float64)
    # np.sum is pairwise and single-threaded (np.dot may go through a threaded BLAS).
    return float(np.sum(x64 * x64))


def stable_seed(seed: int, task_index: int, tensor_name: str) -> int:
    """A 63-bit seed that depends only on (seed, task index, tensor name).

    Derived from a SHA-256 digest rather than Python's ``hash`` (salted per
    process) so that any worker, in any sharding order, draws the same mask.
    """
    digest = hashlib.sha256(f"{int(seed)}\x00{int(task_index)}\x00{tensor_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def signed_sum(taus: Sequence[Tensor]) -> Tensor:
    """Σt τt accumulated in task order in fp32 (a fixed order keeps it bitwise reproducible)."""
    acc = taus[0].clone()
    for tau in taus[1:]:
        acc = acc + tau
    return acc


# --------------------------------------------------------------------------- driver


def _check_inputs(base_sd: Mapping[str, Tensor], task_sds: Sequence[Mapping[str, Tensor]]) -> None:
    if len(task_sds) == 0:
        raise ConfigError("merge: no task models were given; a merge needs at least one fine-tuned model.")
    for i, sd in enumerate(task_sds):
        for name, base in base_sd.items():
            if name not in sd:
                raise ZooError(
                    f"merge: task model #{i} has no tensor '{name}', which the base model has; "
                    "every task model must contain every merged tensor."
                )
            if tuple(sd[name].shape) != tuple(base.shape):
                raise ZooError(
                    f"merge: tensor '{name}' of task model #{i} has shape {tuple(sd[name].shape)} "
                    f"but the base has {tuple(base.shape)}; the models are not the same architecture."
                )


def compute_params(
    method: MergeMethod,
    base_sd: Mapping[str, Tensor],
    task_sds: Sequence[Mapping[str, Tensor]],
) -> Any:
    """Run the statistics rounds of ``method`` over in-memory state dicts; return the merge params."""
    _check_inputs(base_sd, task_sds)
    params: Any = None
    for r in range(method.stat_rounds):
        stats = []
        for name, base in base_sd.items():
            taus = [task_vector(sd[name], base, name) for sd in task_sds]
            stats.append(method.tensor_stats(r, name, base, taus, params))
        params = method.combine(r, stats, params)
    return params


def merge_in_memory(
    method: MergeMethod,
    base_sd: Mapping[str, Tensor],
    task_sds: Sequence[Mapping[str, Tensor]],
) -> dict[str, Tensor] | list[dict[str, Tensor]]:
    """Merge whole state dicts in one process: the reference the Ray executor must match.

    Tensors stay on the device they are given on (the caller picks it with
    ``tswitch_ray.device.pick_device``). Returns one state dict, or for
    ``per_task`` methods one state dict per task in task order. Tensor order is
    the base state dict's order.
    """
    params = compute_params(method, base_sd, task_sds)
    if method.per_task:
        outs: list[dict[str, Tensor]] = [{} for _ in task_sds]
        for name, base in base_sd.items():
            taus = [task_vector(sd[name], base, name) for sd in task_sds]
            merged = method.merge_tensor(name, base, taus, params)
            for t, tensor in enumerate(merged):
                outs[t][name] = tensor
        return outs
    out: dict[str, Tensor] = {}
    for name, base in base_sd.items():
        taus = [task_vector(sd[name], base, name) for sd in task_sds]
        out[name] = method.merge_tensor(name, base, taus, params)
    return out
