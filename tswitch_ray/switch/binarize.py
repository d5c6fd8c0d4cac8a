"""Bin-Discard: activation switch M, polarity switch S and knob λ (paper 000 Sec. 3.3).

Paper 000 eq. (5) approximates a task vector by τ ≈ λ · M ⊙ S, with (eq. 6)
M the mask of kept entries (P-Discard, eq. 3), S = sign(τ) on them and λ a
scalar knob. Eq. (7) rebuilds θt = θ0 + λt · Mt ⊙ St (see :mod:`.reconstruct`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from tswitch_ray.errors import ConfigError
from tswitch_ray.switch.thresholds import Thresholds

KnobMode = Literal["rms", "mean"]
KNOB_MODES: tuple[str, ...] = ("rms", "mean")


def _f32(tau: torch.Tensor) -> torch.Tensor:
    # Thresholds are computed from float32 values; compare in the same dtype.
    return tau if tau.dtype == torch.float32 else tau.to(torch.float32)


def binarize(tau: torch.Tensor, th: Thresholds) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation and polarity switches of paper 000 eq. (6), same shape as ``tau``.

    ``mask`` (M): kept = τ > t⁺ or −τ > t⁻, so zeros are never kept (the
    thresholds are ≥ 0). ``positive``: τ > 0, the sign S = +1 where True and
    −1 where False; only meaningful where ``mask``.
    """
    t = _f32(tau)
    # t_pos/t_neg are float32 values (bit patterns from the histograms), so
    # comparing with them as Python floats is exact; −τ > t⁻ ⇔ τ < −t⁻ exactly.
    mask = t > th.t_pos
    mask |= t < -th.t_neg
    positive = t > 0
    return mask, positive


@dataclass(frozen=True)
class KeptStats:
    """Float64 sums over kept entries; shards/tensors add with ``+``."""

    kept: int = 0
    sum_abs: float = 0.0
    sum_sq: float = 0.0

    def __add__(self, other: KeptStats) -> KeptStats:
        if not isinstance(other, KeptStats):
            return NotImplemented
        return KeptStats(self.kept + other.kept, self.sum_abs + other.sum_abs, self.sum_sq + other.sum_sq)


def kept_stats(tau: torch.Tensor, mask: torch.Tensor) -> KeptStats:
    """Count, Σ|τ| and Στ² over the kept entries, accumulated in float64."""
    if mask.shape != tau.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} differs from tau shape {tuple(tau.shape)}")
    kept = _f32(tau)[mask].to(torch.float64)  # only the kept entries, usually a fraction
    if kept.numel() == 0:
        return KeptStats()
    kept.abs_()
    return KeptStats(int(kept.numel()), float(kept.sum()), float(torch.dot(kept, kept)))


def binarize_many(
    tau: torch.Tensor, ths: list[Thresholds]
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, KeptStats]]]:
    """Switches of several α at once: ``positive`` once, then per threshold (mask, kept stats).

    Equal, element for element and bit for bit, to ``binarize`` + ``kept_stats``
    per threshold, but cheaper: thresholds grow with α, so each kept set is a
    subset of the previous one and its values are filtered from the previous
    (smaller) kept values instead of from the whole tensor; the filtered
    values are the same elements in the same order, so the float64 sums are
    the same. Falls back to the whole tensor when thresholds do not grow.
    """
    t = _f32(tau)
    flat = t.reshape(-1)
    positive = t > 0
    out: list[tuple[torch.Tensor, KeptStats]] = []
    prev_vals = flat
    prev: Thresholds | None = None
    for th in ths:
        mask = t > th.t_pos
        mask |= t < -th.t_neg
        if prev is not None and th.t_pos >= prev.t_pos and th.t_neg >= prev.t_neg:
            sel = prev_vals > th.t_pos
            sel |= prev_vals < -th.t_neg
            vals = prev_vals[sel]
        else:
            vals = flat[mask.reshape(-1)]
        prev_vals, prev = vals, th
        if vals.numel() == 0:
            out.append((mask, KeptStats()))
            continue
        v64 = vals.to(torch.float64)
        v64.abs_()
        out.append((mask, KeptStats(int(v64.numel()), float(v64.sum()), float(torch.dot(v64, v64)))))
    return positive, out


@dataclass(frozen=True, eq=False)
class KeptSwitch:
    """One α's switch in compacted form: what the codec and the knob need, nothing more.

    ``positions``: ascending flat indices of the kept elements (M = 1);
    ``positive``: S of each of them (True = +1), same order; ``stats``: their
    :class:`KeptStats`; ``mask``: the full flat M when it was computed anyway
    (the first α of :func:`kept_many`), else None.
    """

    positions: np.ndarray
    positive: np.ndarray
    stats: KeptStats
    mask: np.ndarray | None = None


def _stats_of(vals: np.ndarray) -> KeptStats:
    """:class:`KeptStats` of compacted kept values.

    The same torch float64 ops, on the same elements in the same (flat)
    order, as :func:`kept_stats` and :func:`binarize_many`: identical sums,
    bit for bit (and torch's float64 sum and dot are ~1.7x faster than
    NumPy's here).
    """
    if vals.size == 0:
        return KeptStats()
    v64 = torch.from_numpy(vals).to(torch.float64)
    v64.abs_()
    return KeptStats(int(v64.numel()), float(v64.sum()), float(torch.dot(v64, v64)))


def kept_many(tau: torch.Tensor, ths: list[Thresholds]) -> list[KeptSwitch]:
    """The switches of several α (paper 000 eq. 6) as kept positions, signs and kept statistics.

    Same elements, signs and float64 sums as :func:`binarize_many`, but the
    full tensor is compared and searched once, for the first threshold:
    thresholds grow with α, so each later kept set is a subset of the
    previous one and is filtered from the previous (smaller) kept values and
    positions. NumPy does the compaction (``flatnonzero`` and a gather are
    several times faster than torch's boolean indexing on one CPU thread).
    Falls back to the whole tensor when a threshold does not grow. CPU only.
    """
    flat = _f32(tau).reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    t = flat.numpy()
    out: list[KeptSwitch] = []
    prev: Thresholds | None = None
    pos = vals = None
    tmp = np.empty(t.size, dtype=bool)
    for th in ths:
        # t_pos/t_neg are float32 values, so the comparisons are exact in any
        # width; −τ > t⁻ ⇔ τ < −t⁻ exactly.
        if prev is not None and th.t_pos >= prev.t_pos and th.t_neg >= prev.t_neg:
            sel = vals > th.t_pos
            sel |= vals < -th.t_neg
            # flatnonzero + take: NumPy's boolean indexing is ~5x slower.
            keep = np.flatnonzero(sel)
            pos, vals = pos.take(keep), vals.take(keep)
            mask = None
        else:
            mask = np.greater(t, th.t_pos)
            mask |= np.less(t, -th.t_neg, out=tmp)
            pos = np.flatnonzero(mask)
            vals = t.take(pos)
        prev = th
        out.append(KeptSwitch(pos, vals > 0, _stats_of(vals), mask))
    return out


def knob(stats: KeptStats, mode: KnobMode | str = "rms") -> float:
    """The switch knob λ of paper 000 eqs. (5)–(7) from kept-entry statistics.

    ``"rms"`` (default, the authors' code): λ = ‖τ⊙M‖₂ / √kept, the
    root-mean-square of the kept magnitudes. ``"mean"``: λ = Σ|τ⊙M| / kept,
    the least-squares scalar for λ·M⊙S ≈ τ. No kept entry gives λ = 0.0.
    """
    if mode not in KNOB_MODES:
        raise ConfigError(
            f"knob mode {mode!r} is not one of {', '.join(KNOB_MODES)}: 'rms' (the authors' "
            "code, the default) or 'mean' (least-squares scale of the kept magnitudes)."
        )
    if stats.kept == 0:
        return 0.0
    if mode == "rms":
        return math.sqrt(stats.sum_sq / stats.kept)
    return stats.sum_abs / stats.kept
