"""Task Arithmetic (Ilharco et al. 2023, "Editing models with task arithmetic")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from tswitch_ray.errors import ConfigError
from tswitch_ray.methods.base import LocalMethod, signed_sum, to_base_dtype

Tensor = torch.Tensor


def task_arithmetic(base: Tensor, taus: list[Tensor], scale: float) -> Tensor:
    """θ = θ0 + s·Σt τt (Task Arithmetic; paper 002 eq. 4, paper 000 baseline (5)).

    The sum runs in task order in fp32; the result is fp32.
    """
    return base.to(torch.float32) + float(scale) * signed_sum(taus)


@dataclass
class TaskArithmetic(LocalMethod):
    """One merged model θ0 + s·Στt; ``scale`` s = 0.3 (paper 000 Table 5)."""

    scale: float = 0.3
    name: ClassVar[str] = "ta"
    per_task: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if not isinstance(self.scale, (int, float)):
            raise ConfigError(f"method 'ta': option scale must be a number, got {self.scale!r}.")

    def merge_tensor(self, name: str, base: Tensor, taus: list[Tensor], params: Any) -> Tensor:
        return to_base_dtype(task_arithmetic(base, taus, self.scale), base)
