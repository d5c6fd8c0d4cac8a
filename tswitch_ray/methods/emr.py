"""EMR-Merging: Elect, Mask & Rescale: docs/MATH.md "EMR-Merging" (paper 003, Huang et al. 2024,
"EMR-Merging: Tuning-Free High-Performance Model Merging", Sec. 3.2 and Alg. 1).

One unified task vector τuni plus, per task, a 1-bit mask Mt and a scalar
rescaler λt; task t is served by θt = θ0 + λt·Mt⊙τuni.

Reference-code details followed here (github.com/harveyhuang18/EMR_Merging,
and FusionBench after it):

* the elected sign is sign(Σt τt) with a zero sum mapped to −1;
* masks use a strict ``> 0``, so zero entries are never kept;
* λt: the paper writes λt = Σ|τt| / Σ|Mt⊙τuni| over the whole model. The
  8-task code computes Σ over tensors of mean|τt| divided by Σ over tensors of
  mean|Mt⊙τuni| — every tensor weighted equally, not by its size — and the
  paper's 8-task numbers come from it: ``lambda_mode="tensor_mean"`` (default).
  Its 30-ViT script flattens the model first, i.e. plain element sums:
  ``lambda_mode="element_sum"``.

Differences: the sums are accumulated in float64 (the reference uses a float32
accumulator), and a task whose masked unified vector is all zero gets λt = 0
instead of a division by zero.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, Literal, get_args

import numpy as np
import torch

from tswitch_ray.errors import ConfigError
from tswitch_ray.methods.base import sum64, to_base_dtype
from tswitch_ray.methods.registry import MethodInfo, MethodKind, MethodOptions, register
from tswitch_ray.methods.storage import StorageModel

Tensor = torch.Tensor

LambdaMode = Literal["tensor_mean", "element_sum"]
LAMBDA_MODES: tuple[str, ...] = get_args(LambdaMode)


def unified_task_vector(taus: Sequence[Tensor]) -> Tensor:
    """Elect τuni (docs/MATH.md "EMR-Merging"; paper 003 Sec. 3.2 "Electing a unified task vector",
    Alg. 1 lines 2–3).

    γuni = sign(Σt τt) with a zero sum mapped to −1 (reference code);
    εuni = max over t of |τt| among the entries whose sign agrees with γuni,
    0 where none agrees; τuni = γuni ⊙ εuni (fp32; +0.0 where εuni is 0).

    In-place and with two reused buffers: Σ is accumulated in task order in
    fp32 exactly as :func:`signed_sum`; τt·γ (γ = ±1, an exact sign flip) is
    |τt| where the signs agree and ≤ 0 elsewhere, so clamping it at 0 and
    taking the running maximum gives εuni (up to the sign of zeros, which the
    final ``mag > 0`` test discards).
    """
    acc = taus[0].to(torch.float32, copy=True)
    for tau in taus[1:]:
        acc.add_(tau)
    flag = torch.where(acc > 0, 1.0, -1.0)
    mag = torch.zeros_like(flag)
    buf = acc  # Σ is no longer needed: reuse its memory
    for tau in taus:
        torch.mul(tau, flag, out=buf)
        buf.clamp_(min=0.0)
        torch.maximum(mag, buf, out=mag)
    positive = mag > 0
    mag.mul_(flag)
    return torch.where(positive, mag, 0.0)


def task_masks(taus: Sequence[Tensor], tau_uni: Tensor) -> list[Tensor]:
    """Mt = (τt ⊙ τuni > 0) (docs/MATH.md "EMR-Merging"; paper 003 Sec. 3.2 "Task-specific masks"), bool,
    one per task."""
    buf = torch.empty_like(tau_uni)
    return [torch.mul(tau, tau_uni, out=buf) > 0 for tau in taus]


def rescaler_terms(
    taus: Sequence[Tensor], tau_uni: Tensor, masks: Sequence[Tensor], lambda_mode: str = "tensor_mean"
) -> np.ndarray:
    """One tensor's contribution to the rescalers: float64 array [2, T] of
    (Σ|τt|, Σ|Mt⊙τuni|), each divided by the tensor's size for ``tensor_mean``."""
    if lambda_mode not in LAMBDA_MODES:
        raise ConfigError(f"method 'emr': lambda_mode must be one of {LAMBDA_MODES}, got {lambda_mode!r}.")
    n = max(tau_uni.numel(), 1)
    div = float(n) if lambda_mode == "tensor_mean" else 1.0
    abs_uni = tau_uni.abs()
    buf = torch.empty_like(abs_uni)
    out = np.zeros((2, len(taus)), dtype=np.float64)
    for t, (tau, mask) in enumerate(zip(taus, masks, strict=True)):
        out[0, t] = sum64(torch.abs(tau, out=buf)) / div
        torch.mul(abs_uni, mask, out=buf)  # |τuni| where kept, +0.0 elsewhere (|τuni| is finite)
        out[1, t] = sum64(buf) / div
    return out


def rescalers(terms: Iterable[np.ndarray]) -> list[float]:
    """λt = Σ|τt| / Σ|Mt⊙τuni| over the whole model (docs/MATH.md "EMR-Merging"; paper 003 Sec. 3.2
    "Task-specific rescalers", Alg. 1 line 6), from the per-tensor :func:`rescaler_terms`.

    λt = 0 where the denominator is 0 (the task keeps no element).
    """
    stacked = [np.asarray(term, dtype=np.float64) for term in terms]
    if not stacked:
        return []
    out = []
    for t in range(stacked[0].shape[1]):
        # fsum: exactly rounded, so the result does not depend on the tensor order.
        num = math.fsum(float(s[0, t]) for s in stacked)
        den = math.fsum(float(s[1, t]) for s in stacked)
        out.append(num / den if den > 0 else 0.0)
    return out


def emr_task_weights(base: Tensor, tau_uni: Tensor, mask: Tensor, lam: float) -> Tensor:
    """θt = θ0 + λt·Mt⊙τuni (docs/MATH.md "EMR-Merging"; paper 003 Sec. 3.2, inference step), fp32."""
    return base.to(torch.float32) + float(lam) * torch.where(mask, tau_uni, 0.0)


class EMROptions(MethodOptions):
    lambda_mode: LambdaMode = "tensor_mean"


class EMR(EMROptions):
    """EMR-Merging, one model per task. One statistics round gathers the rescaler terms."""

    name: ClassVar[str] = "emr"
    per_task: ClassVar[bool] = True
    stat_rounds: ClassVar[int] = 1

    def tensor_stats(self, round: int, name: str, base: Tensor, taus: list[Tensor], params: Any) -> np.ndarray:
        tau_uni = unified_task_vector(taus)
        return rescaler_terms(taus, tau_uni, task_masks(taus, tau_uni), self.lambda_mode)

    def combine(self, round: int, stats: list[Any], params: Any) -> list[float]:
        return rescalers(stats)

    def merge_tensor(self, name: str, base: Tensor, taus: list[Tensor], params: list[float]) -> list[Tensor]:
        tau_uni = unified_task_vector(taus)
        masks = task_masks(taus, tau_uni)
        return [
            to_base_dtype(emr_task_weights(base, tau_uni, m, lam), base)
            for m, lam in zip(masks, params, strict=True)
        ]


def emr_storage(sizes: StorageModel, alpha: float | None, options: MethodOptions, query_bytes: int) -> int:
    """One unified model, plus per task a 1-bit mask over the float elements (λt is a few bytes)."""
    return sizes.model_bytes + sizes.n_tasks * math.ceil(sizes.float_numel / 8)


register(MethodInfo(
    name="emr", aliases=("emr_merging",), kind=MethodKind.PER_TASK,
    summary="EMR-Merging: one unified task vector, a 1-bit mask and a rescaler per task.",
    options=EMROptions, factory=EMR, scorer="merged-per-task", storage=emr_storage,
))
