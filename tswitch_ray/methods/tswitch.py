"""T-Switch as a merge method: one model per task, θt = θ0 + λt·Mt⊙St: docs/MATH.md "Reconstruction"
(paper 000, "Less is More: Efficient Model Merging with Binary Task Switch", eq. 7).

Composition only — thresholds, binarisation, knob and reconstruction are the
functions of ``tswitch_ray.switch`` (docs/MATH.md "Thresholds (P-Discard cut)",
"Switches and knobs", "Reconstruction"; the formulas live there). Options:

* ``alpha`` (0.6, the authors' ViT setting): P-Discard ratio;
* ``scope``: "tensor" (default, the authors' code: thresholds and one knob per
  tensor) or "model" (thresholds and one knob per task over the whole task
  vector: three statistics rounds — coarse histograms, fine histograms, kept
  sums);
* ``knob``: "rms" (default, the authors' code) or "mean";
* ``cut``: "authors" (default for scope "tensor": the int(n·(1−α)) largest of
  each sign plus the ties at the cut, as the authors' code) or "exact" (the
  only rule, and the default, of scope "model"): docs/MATH.md "Cut rules".

The artifact build (``distributed/build.py``) produces the same switches and
stores them; this method rebuilds full weights directly. An eval scores T-Switch
from those stored switches (``needs_artifacts``), so its eval entry takes
``alpha`` and no options: the scope and knob are the build's.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator

from tswitch_ray.methods import _global
from tswitch_ray.methods.registry import MethodInfo, MethodKind, MethodOptions, NoOptions, Number, register
from tswitch_ray.methods.storage import StorageModel, switches_bytes
from tswitch_ray.switch.binarize import KeptStats, KnobMode, binarize, kept_stats, knob
from tswitch_ray.switch.reconstruct import reconstruct
from tswitch_ray.switch.thresholds import Cut, Thresholds, resolve_cut, tensor_thresholds

Tensor = torch.Tensor


class CutOptions(MethodOptions):
    """The threshold options of the methods that cut like P-Discard (T-Switch, P-Discard): scope and cut rule."""

    scope: Literal["tensor", "model"] = "tensor"
    # Not given: the scope's default, "authors" for scope "tensor" (as here), "exact" for "model"
    # (docs/MATH.md "Cut rules"); given, it must suit the scope.
    cut: Cut = "authors"

    @model_validator(mode="before")
    @classmethod
    def _cut_of_scope(cls, data: Any) -> Any:
        # Before, not after, validation: the options are frozen. An unknown scope is left to its own error.
        if isinstance(data, dict) and data.get("scope", "tensor") in ("tensor", "model"):
            data = {**data, "cut": resolve_cut(data.get("cut"), data.get("scope", "tensor"))}
        return data


class TSwitchOptions(CutOptions):
    alpha: Number = Field(0.6, ge=0.0, lt=1.0)  # P-Discard ratio α
    knob: KnobMode = "rms"


class TSwitch(TSwitchOptions):
    """T-Switch reconstruction for every task. Options: ``alpha``, ``scope``, ``knob``, ``cut``."""

    name: ClassVar[str] = "tswitch"
    per_task: ClassVar[bool] = True

    @property
    def _phases(self) -> tuple[str, ...]:
        return ("hist", "fine", "kept") if self.scope == "model" else ()

    @property
    def stat_rounds(self) -> int:
        return len(self._phases)

    def _thresholds(self, name: str, taus: list[Tensor], params: Any) -> list[Thresholds]:
        if self.scope == "model":
            return params["thresholds"]
        return [tensor_thresholds(tau, [self.alpha], name, cut=self.cut)[0] for tau in taus]

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


def tswitch_storage(sizes: StorageModel, alpha: float | None, options: MethodOptions, query_bytes: int) -> int:
    """θ0 plus every task's encoded switches at α, as the artifacts store them."""
    return switches_bytes(sizes, alpha)


register(MethodInfo(
    name="tswitch", aliases=("t_switch",), kind=MethodKind.PER_TASK,
    summary="T-Switch: per task θ0 + knob·mask⊙sign (binary task switches at P-Discard ratio alpha).",
    options=TSwitchOptions, eval_options=NoOptions, factory=TSwitch, scorer="switches", storage=tswitch_storage,
    needs_alpha=True, needs_artifacts=True,
))
