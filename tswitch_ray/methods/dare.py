"""DARE merging: Drop And REscale, then Task Arithmetic (Yu et al. 2024, Sec. 4.1).

Each entry of τt is dropped with probability p and survivors are rescaled by
1/(1−p) (``tswitch_ray.switch.transforms.dare``); the DARE'd vectors are then
merged by Task Arithmetic, θ0 + s·Σt DARE(τt) (s = 0.3, p = 0.5 as in paper
000 Table 5).

Reproducibility: the draw of task t on tensor ``name`` is seeded with
``stable_seed(seed, t, name)`` (SHA-256 of the three), so results depend on
neither the sharding nor the tensor order, only on the device type (CPU and
CUDA generators differ).

``rescale_to_sum_norm=True`` applies paper 000's eq. 4 norm matching
(``pdiscard.norm_matched_merge``) instead of plain Task Arithmetic: the
DARE-Random control of paper 000 Table 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from tswitch_ray.errors import ConfigError
from tswitch_ray.methods import _global
from tswitch_ray.methods.base import signed_sum, stable_seed, to_base_dtype
from tswitch_ray.methods.pdiscard import NORM_SCOPES, norm_matched_merge, norm_ratio, norm_terms
from tswitch_ray.methods.task_arithmetic import task_arithmetic
from tswitch_ray.switch.transforms import dare

Tensor = torch.Tensor


def dare_task_vectors(name: str, taus: list[Tensor], p: float, seed: int) -> list[Tensor]:
    """DARE(τt) for every task of one tensor, each with its (seed, task, name) seed."""
    return [dare(tau, p, stable_seed(seed, t, name)) for t, tau in enumerate(taus)]


@dataclass
class Dare:
    """DARE + Task Arithmetic (one merged model). Options: ``p`` (0.5), ``seed`` (0),
    ``scale`` (0.3), ``rescale_to_sum_norm`` (False), ``norm_scope`` ("model" | "tensor")."""

    p: float = 0.5
    seed: int = 0
    scale: float = 0.3
    rescale_to_sum_norm: bool = False
    norm_scope: str = "model"
    name: ClassVar[str] = "dare"
    per_task: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if isinstance(self.p, bool) or not isinstance(self.p, (int, float)) or not 0.0 <= self.p < 1.0:
            raise ConfigError(f"method 'dare': option p (drop probability) must be in [0, 1), got {self.p!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"method 'dare': option seed must be an integer, got {self.seed!r}.")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)):
            raise ConfigError(f"method 'dare': option scale must be a number, got {self.scale!r}.")
        if self.norm_scope not in NORM_SCOPES:
            raise ConfigError(f"method 'dare': option norm_scope must be one of {NORM_SCOPES}, got {self.norm_scope!r}.")

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
