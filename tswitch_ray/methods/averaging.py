"""Weight averaging: docs/MATH.md "Weight averaging" (Wortsman et al. 2022, "Model soups";
baseline (4) of the T-Switch paper, paper 000)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from tswitch_ray.methods.base import LocalMethod, signed_sum, to_base_dtype
from tswitch_ray.methods.registry import MethodInfo, MethodKind, NoOptions, register
from tswitch_ray.methods.storage import one_model_bytes

Tensor = torch.Tensor


def weight_average(base: Tensor, taus: list[Tensor]) -> Tensor:
    """θ = θ0 + (1/T)·Σt τt, i.e. the mean of the T fine-tuned weights (docs/MATH.md "Weight averaging";
    paper 000 baseline "Weight-Averaging"; paper 003 Sec. 1). Computed in fp32, returned in fp32."""
    return base.to(torch.float32) + signed_sum(taus) / float(len(taus))


class Averaging(NoOptions, LocalMethod):
    """One merged model: the average of the fine-tuned models."""

    name: ClassVar[str] = "avg"
    per_task: ClassVar[bool] = False
    # Each output element depends on the same element of θ0 and of every τ only: row blocks give the same bytes.
    elementwise: ClassVar[bool] = True

    def merge_tensor(self, name: str, base: Tensor, taus: list[Tensor], params: Any) -> Tensor:
        return to_base_dtype(weight_average(base, taus), base)


register(MethodInfo(
    name="avg", aliases=("averaging", "average", "weight_averaging"), kind=MethodKind.ONE_MODEL,
    summary="Weight averaging: the mean of the fine-tuned models.",
    factory=Averaging, scorer="merged-one", storage=one_model_bytes,
))
