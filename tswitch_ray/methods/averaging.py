"""Weight averaging (Wortsman et al. 2022, "model soups"; baseline (4) of paper 000)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from tswitch_ray.methods.base import LocalMethod, signed_sum, to_base_dtype

Tensor = torch.Tensor


def weight_average(base: Tensor, taus: list[Tensor]) -> Tensor:
    """θ = θ0 + (1/T)·Σt τt, i.e. the mean of the T fine-tuned weights (paper 000 baseline
    "Weight-Averaging"; paper 003 Sec. 1). Computed in fp32, returned in fp32."""
    return base.to(torch.float32) + signed_sum(taus) / float(len(taus))


@dataclass
class Averaging(LocalMethod):
    """One merged model: the average of the fine-tuned models."""

    name: ClassVar[str] = "avg"
    per_task: ClassVar[bool] = False

    def merge_tensor(self, name: str, base: Tensor, taus: list[Tensor], params: Any) -> Tensor:
        return to_base_dtype(weight_average(base, taus), base)
