"""P-Discard merging and the norm-matched merge it uses: docs/MATH.md "P-Discard merge" (paper 000,
"Less is More: Efficient Model Merging with Binary Task Switch", Sec. 3.2, eq. 4).

Paper 000 merges P-Discarded task vectors P(τt) (eq. 3: drop the fraction α
of smallest positive and of smallest-magnitude negative entries) "using the
following merging scheme to eliminate the effects of the discrepancy in merged
vector lengths" — eq. 4, whose body is missing from our copy of the paper.
Our reading, the most defensible one we see: rescale the merged discarded
vector to the length of the merged full task vectors,

    θ = θ0 + s · (‖Σt τt‖₂ / ‖Σt P(τt)‖₂) · Σt P(τt),

so that curves over α compare directions at equal length. The norms are over
the whole model by default (``norm_scope="model"``, one statistics round) or
per tensor (``norm_scope="tensor"``). The same rescaling is offered to DARE
(``rescale_to_sum_norm``) as the paper's DARE-Random control of Table 1.

Threshold scope as for T-Switch: ``scope="tensor"`` (default, the authors'
code) or ``"model"`` (two more statistics rounds); ``cut`` as for T-Switch,
``"authors"`` (default for scope "tensor") or ``"exact"`` (docs/MATH.md "Cut
rules"). α = 0.6 (the authors' ViT setting) and s = 0.3 (Task Arithmetic's coefficient) by default; a merged
vector of zero length gets ratio 0.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from tswitch_ray.methods import _global
from tswitch_ray.methods.base import signed_sum, sumsq64, to_base_dtype
from tswitch_ray.methods.registry import MethodInfo, MethodKind, Number, register
from tswitch_ray.methods.storage import one_model_bytes
from tswitch_ray.methods.tswitch import CutOptions
from tswitch_ray.switch.thresholds import Thresholds, tensor_thresholds
from tswitch_ray.switch.transforms import p_discard

Tensor = torch.Tensor

NormScope = Literal["model", "tensor"]


def norm_ratio(sumsq_full: float, sumsq_processed: float) -> float:
    """‖Σt τt‖₂ / ‖Σt P(τt)‖₂ from the two sums of squares (docs/MATH.md "P-Discard merge";
    paper 000 eq. 4, our reading);
    0 when the processed sum is all zero."""
    if sumsq_processed <= 0.0:
        return 0.0
    return math.sqrt(sumsq_full) / math.sqrt(sumsq_processed)


def norm_matched_merge(base: Tensor, processed_sum: Tensor, ratio: float, scale: float) -> Tensor:
    """θ = θ0 + s·ratio·Σt P(τt) (docs/MATH.md "P-Discard merge"; paper 000 eq. 4, our reading), fp32."""
    return base.to(torch.float32) + (float(scale) * float(ratio)) * processed_sum


def norm_terms(taus: list[Tensor], processed: list[Tensor]) -> tuple[float, float]:
    """One tensor's (‖Σt τt‖², ‖Σt P(τt)‖²), float64, thread-count independent."""
    full = signed_sum(taus)
    proc = signed_sum(processed)
    return sumsq64(full), sumsq64(proc)


class PDiscardOptions(CutOptions):
    alpha: Number = Field(0.6, ge=0.0, lt=1.0)  # discard ratio α
    scale: Number = 0.3
    norm_scope: NormScope = "model"


class PDiscard(PDiscardOptions):
    """P-Discard merge (one merged model). Options: ``alpha`` (0.6), ``scale`` (0.3),
    ``scope`` ("tensor" | "model", thresholds), ``cut`` ("authors" | "exact"),
    ``norm_scope`` ("model" | "tensor")."""

    name: ClassVar[str] = "pdiscard"
    per_task: ClassVar[bool] = False

    @property
    def _phases(self) -> tuple[str, ...]:
        phases = ("hist", "fine") if self.scope == "model" else ()
        return phases + (("norm",) if self.norm_scope == "model" else ())

    @property
    def stat_rounds(self) -> int:
        return len(self._phases)

    def thresholds(self, name: str, taus: list[Tensor], params: dict[str, Any] | None) -> list[Thresholds]:
        if self.scope == "model":
            return params["thresholds"]  # type: ignore[index]
        return [tensor_thresholds(tau, [self.alpha], name, cut=self.cut)[0] for tau in taus]

    def processed(self, name: str, taus: list[Tensor], params: dict[str, Any] | None) -> list[Tensor]:
        return [p_discard(tau, th) for tau, th in zip(taus, self.thresholds(name, taus, params), strict=True)]

    def tensor_stats(self, round: int, name: str, base: Tensor, taus: list[Tensor], params: Any) -> Any:
        phase = self._phases[round]
        if phase == "hist":
            return _global.signed_coarse_stats(name, taus)
        if phase == "fine":
            return _global.signed_fine_stats(taus, params["request"])
        return norm_terms(taus, self.processed(name, taus, params))

    def combine(self, round: int, stats: list[Any], params: Any) -> dict[str, Any]:
        phase = self._phases[round]
        if phase == "hist":
            return {"request": _global.signed_request(stats, self.alpha)}
        if phase == "fine":
            return {"thresholds": _global.signed_resolve(stats, params["request"], self.alpha)}
        ratio = norm_ratio(_global.exact_sum([s[0] for s in stats]), _global.exact_sum([s[1] for s in stats]))
        return {**(params or {}), "ratio": ratio}

    def merge_tensor(self, name: str, base: Tensor, taus: list[Tensor], params: Any) -> Tensor:
        processed = self.processed(name, taus, params)
        if self.norm_scope == "model":
            ratio = params["ratio"]
        else:
            ratio = norm_ratio(*norm_terms(taus, processed))
        return to_base_dtype(norm_matched_merge(base, signed_sum(processed), ratio, self.scale), base)


register(MethodInfo(
    name="pdiscard", aliases=("p_discard",), kind=MethodKind.ONE_MODEL,
    summary="P-Discard merge: drop the fraction alpha of smallest entries per sign, norm-matched sum.",
    options=PDiscardOptions, factory=PDiscard, scorer="merged-one", storage=one_model_bytes,
))
