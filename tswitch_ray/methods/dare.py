"""DARE merging: Drop And REscale, then Task Arithmetic: docs/MATH.md "DARE" (Yu et al. 2024,
"Language Models are Super Mario", Sec. 4.1).

Each entry of τt is dropped with probability p and survivors are rescaled by
1/(1−p) (``tswitch_ray.switch.transforms.dare``); the DARE'd vectors are then
merged by Task Arithmetic, θ0 + s·Σt DARE(τt) (s = 0.3, p = 0.5 as in paper
000 Table 5).

Reproducibility: the draw of task t on tensor ``name`` is seeded with
``stable_seed(seed, t, name)`` (SHA-256 of the three), so results depend on
neither the sharding nor the tensor order, only on the device type (CPU and
CUDA generators differ).

``rescale_to_sum_norm=True`` applies paper 000's eq. 4 norm matching
(``pdiscard.norm_matched_merge``, docs/MATH.md "P-Discard merge") instead of plain Task Arithmetic: the
DARE-Random control of paper 000 Table 1.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field

from tswitch_ray.methods import _global
from tswitch_ray.methods.base import signed_sum, stable_seed, to_base_dtype
from tswitch_ray.methods.pdiscard import NormScope, norm_matched_merge, norm_ratio, norm_terms
from tswitch_ray.methods.registry import Integer, MethodInfo, MethodKind, MethodOptions, Number, register
from tswitch_ray.methods.storage import one_model_bytes
from tswitch_ray.methods.task_arithmetic import task_arithmetic
from tswitch_ray.switch.transforms import dare

Tensor = torch.Tensor


def dare_task_vectors(name: str, taus: list[Tensor], p: float, seed: int) -> list[Tensor]:
    """DARE(τt) for every task of one tensor (docs/MATH.md "DARE"), each with its (seed, task, name) seed."""
    return [dare(tau, p, stable_seed(seed, t, name)) for t, tau in enumerate(taus)]


class DareOptions(MethodOptions):
    p: Number = Field(0.5, ge=0.0, lt=1.0)  # drop probability
    seed: Integer = 0
    scale: Number = 0.3
    rescale_to_sum_norm: bool = False
    norm_scope: NormScope = "model"


class Dare(DareOptions):
    """DARE + Task Arithmetic (one merged model). Options: ``p`` (0.5), ``seed`` (0),
    ``scale`` (0.3), ``rescale_to_sum_norm`` (False), ``norm_scope`` ("model" | "tensor")."""

    name: ClassVar[str] = "dare"
    per_task: ClassVar[bool] = False

    @property
    def stat_rounds(self) -> int:
        return 1 if self.rescale_to_sum_norm and self.norm_scope == "model" else 0

    def tensor_stats(self, round: int, name: str, base: Tensor, taus: list[Tensor], params: Any) -> Any:
        return norm_terms(taus, dare_task_vectors(name, taus, self.p, self.seed))

    def combine(self, round: int, stats: list[Any], params: Any) -> dict[str, Any]:
        return {"ratio": norm_ratio(_global.exact_sum([s[0] for s in stats]), _global.exact_sum([s[1] for s in stats]))}

    def merge_tensor(self, name: str, base: Tensor, taus: list[Tensor], params: Any) -> Tensor:
        dropped = dare_task_vectors(name, taus, self.p, self.seed)
        if not self.rescale_to_sum_norm:
            return to_base_dtype(task_arithmetic(base, dropped, self.scale), base)
        ratio = params["ratio"] if self.norm_scope == "model" else norm_ratio(*norm_terms(taus, dropped))
        return to_base_dtype(norm_matched_merge(base, signed_sum(dropped), ratio, self.scale), base)


register(MethodInfo(
    name="dare", kind=MethodKind.ONE_MODEL,
    summary="DARE: drop with probability p, rescale by 1/(1-p), then Task Arithmetic.",
    options=DareOptions, factory=Dare, scorer="merged-one", storage=one_model_bytes,
))
