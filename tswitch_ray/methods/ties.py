"""TIES-Merging: trim, elect sign, disjoint merge: docs/MATH.md "TIES-Merging" (Yadav et al. 2023,
"TIES-Merging: Resolving Interference When Merging Models", Sec. 3 / Alg. 1).

Details follow the reference implementation (prateeksha10/ties-merging,
``ties_merging_utils.py``), which FusionBench reuses:

* **Trim** (``trim_scope="model"``, default): each task vector is flattened over
  the *whole model*; with d elements (zeros included) and K = k/100, the
  reference computes r = d − int(d·K) and keeps |τ| ≥ the r-th smallest |τ|
  (``torch.kthvalue``), so **ties at the cut are kept** and slightly more than
  k % may survive. ``trim_scope="tensor"`` applies the same rule per tensor.
  k = 100 keeps everything. Selection is exact radix selection
  (``tswitch_ray.switch.select``), so it works beyond 2^24 elements.
* **Elect**: γ = sign(Σt trimmed τt). Where the sum is exactly 0 the reference
  substitutes the *majority sign* sign(Σ γ) over the whole model (its
  ``resolve_zero_signs(..., "majority")``) — one more statistics round. If even
  that is 0, the reference's ``torch.where(γ > 0, τ > 0, τ < 0)`` keeps the
  negative entries; we reproduce it.
* **Disjoint merge**: ``merge="mean"`` (default, the paper) averages the
  trimmed entries whose sign agrees with γ over their count (count clamped at
  1); ``merge="sum"`` adds them (FusionBench's default).
* θ = θ0 + s·merged with s = 0.3 (``scale``; paper 000 Table 5 uses 0.3, the
  TIES paper tunes it on validation data).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from tswitch_ray.methods import _global
from tswitch_ray.methods.base import signed_sum, to_base_dtype
from tswitch_ray.methods.registry import MethodInfo, MethodKind, MethodOptions, Number, register
from tswitch_ray.methods.storage import one_model_bytes
from tswitch_ray.switch.select import kth_smallest

Tensor = torch.Tensor


def trim_rank(d: int, k: float) -> int:
    """The 1-based rank r = d − int(d·k/100) whose |τ| value is TIES' trim threshold
    (reference ``topk_values_mask``); 0 means keep everything."""
    return d - int(d * (float(k) / 100.0))


def trim(tau: Tensor, threshold: float | None) -> Tensor:
    """TIES step 1, Trim (docs/MATH.md "TIES-Merging"; Yadav et al. 2023 Sec. 3, Alg. 1 step 1):
    keep |τ| ≥ threshold (ties at the cut kept, as the reference); ``None`` keeps everything."""
    if threshold is None:
        return tau
    return torch.where(tau.abs() >= threshold, tau, 0.0)


def elect_sign(trimmed: list[Tensor], majority: float) -> Tensor:
    """TIES step 2, Elect (docs/MATH.md "TIES-Merging"; Alg. 1 step 2): γ = sign(Σt trimmed τt), a zero
    sum replaced by the model-wide majority sign (reference ``resolve_zero_signs``)."""
    gamma = torch.sign(signed_sum(trimmed))
    return torch.where(gamma == 0, torch.full_like(gamma, float(majority)), gamma)


def disjoint_merge(trimmed: list[Tensor], gamma: Tensor, merge: str = "mean") -> Tensor:
    """TIES step 3, Disjoint merge (docs/MATH.md "TIES-Merging"; Alg. 1 step 3): the mean (or sum) over t of the
    entries of trimmed τt whose sign agrees with γ (γ > 0: τ > 0, else τ < 0), fp32."""
    total = torch.zeros_like(gamma)
    count = torch.zeros_like(gamma)
    for tau in trimmed:
        agree = torch.where(gamma > 0, tau > 0, tau < 0)
        total = total + torch.where(agree, tau, 0.0)
        count = count + agree.to(torch.float32)
    if merge == "sum":
        return total
    return total / count.clamp(min=1.0)


class TiesOptions(MethodOptions):
    k: Number = Field(20.0, ge=0.0, le=100.0)  # percent of entries kept
    trim_scope: Literal["model", "tensor"] = "model"
    merge: Literal["mean", "sum"] = "mean"
    scale: Number = 0.3


class Ties(TiesOptions):
    """TIES-Merging (one merged model). Options: ``k`` (percent kept, 20), ``trim_scope``
    ("model" | "tensor"), ``merge`` ("mean" | "sum"), ``scale`` (0.3)."""

    name: ClassVar[str] = "ties"
    per_task: ClassVar[bool] = False
    @property
    def _phases(self) -> tuple[str, ...]:
        return ("coarse", "fine", "majority") if self.trim_scope == "model" else ("majority",)

    @property
    def stat_rounds(self) -> int:
        return len(self._phases)

    def _thresholds(self, taus: list[Tensor], params: dict[str, Any]) -> list[float | None]:
        if self.trim_scope == "model":
            return params["thresholds"]
        out: list[float | None] = []
        for tau in taus:
            r = trim_rank(tau.numel(), self.k)
            out.append(kth_smallest(tau, [r])[0] if r > 0 else None)
        return out

    def _trimmed(self, taus: list[Tensor], params: dict[str, Any]) -> list[Tensor]:
        return [trim(tau, th) for tau, th in zip(taus, self._thresholds(taus, params), strict=True)]

    def tensor_stats(self, round: int, name: str, base: Tensor, taus: list[Tensor], params: Any) -> Any:
        phase = self._phases[round]
        if phase == "coarse":
            return _global.magnitude_coarse_stats(taus)
        if phase == "fine":
            return _global.magnitude_fine_stats(taus, params["request"])
        gamma = torch.sign(signed_sum(self._trimmed(taus, params)))
        return int(gamma.sum(dtype=torch.int64).item()) if gamma.numel() else 0

    def combine(self, round: int, stats: list[Any], params: Any) -> dict[str, Any]:
        phase = self._phases[round]
        if phase == "coarse":
            return {"request": _global.magnitude_request(stats, lambda d: trim_rank(d, self.k))}
        if phase == "fine":
            return {"thresholds": _global.magnitude_resolve(stats, params["request"])}
        majority = float((sum(stats) > 0) - (sum(stats) < 0))
        return {**(params or {}), "majority": majority}

    def merge_tensor(self, name: str, base: Tensor, taus: list[Tensor], params: dict[str, Any]) -> Tensor:
        trimmed = self._trimmed(taus, params)
        gamma = elect_sign(trimmed, params["majority"])
        merged = disjoint_merge(trimmed, gamma, self.merge)
        return to_base_dtype(base.to(torch.float32) + float(self.scale) * merged, base)


register(MethodInfo(
    name="ties", aliases=("ties_merging",), kind=MethodKind.ONE_MODEL,
    summary="TIES-Merging: trim to the top k %, elect signs, disjoint mean.",
    options=TiesOptions, factory=Ties, scorer="merged-one", storage=one_model_bytes,
))
