"""T-Switch as a merge method: one model per task, θt = θ0 + λt·Mt⊙St (paper 000 eq. 7).

Composition only — thresholds, binarisation, knob and reconstruction are the
functions of ``tswitch_ray.switch`` (the formulas live there). Options:

* ``alpha`` (0.6, the authors' ViT setting): P-Discard ratio;
* ``scope``: "tensor" (default, the authors' code: thresholds and one knob per
  tensor) or "model" (thresholds and one knob per task over the whole task
  vector: three statistics rounds — coarse histograms, fine histograms, kept
  sums);
* ``knob``: "rms" (default, the authors' code) or "mean".

The artifact build (``distributed/build.py``) produces the same switches and
stores them; this method rebuilds full weights directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from tswitch_ray.errors import ConfigError
from tswitch_ray.methods import _global
from tswitch_ray.switch.binarize import KNOB_MODES, KeptStats, binarize, kept_stats, knob
from tswitch_ray.switch.reconstruct import reconstruct
from tswitch_ray.switch.thresholds import Thresholds, tensor_thresholds

Tensor = torch.Tensor


@dataclass
class TSwitch:
    """T-Switch reconstruction for every task. Options: ``alpha``, ``scope``, ``knob``."""

    alpha: float = 0.6
    scope: str = "tensor"
    knob: str = "rms"
    name: ClassVar[str] = "tswitch"
    per_task: ClassVar[bool] = True
    _phases: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0.0 <= self.alpha < 1.0:
            raise ConfigError(f"method 'tswitch': option alpha must be a number in [0, 1), got {self.alpha!r}.")
        if self.scope not in ("tensor", "model"):
            raise ConfigError(f"method 'tswitch': option scope must be 'tensor' or 'model', got {self.scope!r}.")
        if self.knob not in KNOB_MODES:
            raise ConfigError(f"method 'tswitch': option knob must be one of {KNOB_MODES}, got {self.knob!r}.")
        self._phases = ("hist", "fine", "kept") if self.scope == "model" else ()

    @property
    def stat_rounds(self) -> int:
        return len(self._phases)

    def _thresholds(self, name: str, taus: list[Tensor], params: Any) -> list[Thresholds]:
        if self.scope == "model":
            return params["thresholds"]
        return [tensor_thresholds(tau, [self.alpha], name)[0] for tau in taus]

    def tensor_stats(self, round: int, name: str, base: Tensor, taus: list[Tensor], params: Any) -> Any:
        phase = self._phases[round]
        if phase == "hist":
            return _global.signed_coarse_stats(name, taus)
        if phase == "fine":
            return _global.signed_fine_stats(taus, params["request"])
        out = []
        for tau, th in zip(taus, params["thresholds"], strict=True):
            s = kept_stats(tau, binarize(tau, th)[0])
            out.append((s.kept, s.sum_abs, s.sum_sq))
        return out

    def combine(self, round: int, stats: list[Any], params: Any) -> dict[str, Any]:
        phase = self._phases[round]
        if phase == "hist":
            return {"request": _global.signed_request(stats, self.alpha)}
        if phase == "fine":
            return {"thresholds": _global.signed_resolve(stats, params["request"], self.alpha)}
        knobs = []
        for t in range(len(params["thresholds"])):
            total = KeptStats(
                sum(s[t][0] for s in stats),
                _global.exact_sum([s[t][1] for s in stats]),
                _global.exact_sum([s[t][2] for s in stats]),
            )
            knobs.append(knob(total, self.knob))
        return {**params, "knobs": knobs}

    def merge_tensor(self, name: str, base: Tensor, taus: list[Tensor], params: Any) -> list[Tensor]:
        out = []
        for t, (tau, th) in enumerate(zip(taus, self._thresholds(name, taus, params), strict=True)):
            mask, positive = binarize(tau, th)
            lam = params["knobs"][t] if self.scope == "model" else knob(kept_stats(tau, mask), self.knob)
            out.append(reconstruct(base, mask, positive, lam))
        return out
