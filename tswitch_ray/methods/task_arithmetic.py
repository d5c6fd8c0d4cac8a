"""Task Arithmetic: docs/MATH.md "Task Arithmetic" (Ilharco et al. 2023, "Editing models with task
arithmetic")."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from tswitch_ray.methods.base import LocalMethod, signed_sum, to_base_dtype
from tswitch_ray.methods.registry import MethodInfo, MethodKind, MethodOptions, Number, register
from tswitch_ray.methods.storage import one_model_bytes

Tensor = torch.Tensor


def task_arithmetic(base: Tensor, taus: list[Tensor], scale: float) -> Tensor:
    """θ = θ0 + s·Σt τt (docs/MATH.md "Task Arithmetic"; paper 002 eq. 4, paper 000 baseline (5)).

    The sum runs in task order in fp32; the result is fp32.
    """
    return base.to(torch.float32) + float(scale) * signed_sum(taus)


class TaskArithmeticOptions(MethodOptions):
    scale: Number = 0.3  # s; 0.3 as in paper 000 Table 5


class TaskArithmetic(TaskArithmeticOptions, LocalMethod):
    """One merged model θ0 + s·Στt; ``scale`` s = 0.3 (paper 000 Table 5)."""

    name: ClassVar[str] = "ta"
    per_task: ClassVar[bool] = False
    # Each output element depends on the same element of θ0 and of every τ only: row blocks give the same bytes.
    elementwise: ClassVar[bool] = True

    def merge_tensor(self, name: str, base: Tensor, taus: list[Tensor], params: Any) -> Tensor:
        return to_base_dtype(task_arithmetic(base, taus, self.scale), base)


register(MethodInfo(
    name="ta", aliases=("task_arithmetic",), kind=MethodKind.ONE_MODEL,
    summary="Task Arithmetic: θ0 + scale·Σ task vectors.",
    options=TaskArithmeticOptions, factory=TaskArithmetic, scorer="merged-one", storage=one_model_bytes,
))
