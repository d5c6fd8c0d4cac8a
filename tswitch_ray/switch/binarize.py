"""Bin-Discard: activation switch M, polarity switch S and knob λ (paper 000 Sec. 3.3).

Specified in docs/MATH.md "Switches and knobs" (paper 000 eqs. 5–6); the cut in
"Thresholds (P-Discard cut)" (paper 000 eq. 3).

Paper 000 eq. (5) approximates a task vector by τ ≈ λ · M ⊙ S, with (eq. 6)
M the mask of kept entries (P-Discard, eq. 3), S = sign(τ) on them and λ a
scalar knob. Eq. (7) rebuilds θt = θ0 + λt · Mt ⊙ St (see :mod:`.reconstruct`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
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

    docs/MATH.md "Switches and knobs" (paper 000 eq. 6) and "Thresholds
    (P-Discard cut)" (paper 000 eq. 3).

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
    """Count, Σ|τ| and Στ² over the kept entries, accumulated in float64.

    The statistics of the knob: docs/MATH.md "Switches and knobs" (paper 000 eq. 5).
    """
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

    docs/MATH.md "Switches and knobs" (paper 000 eq. 6).

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
    ``positive``: S of each of them (1 = +1, 0 = −1, uint8), same order;
    ``dropped``: ascending flat indices of the dropped elements when more
    than half are kept (the codec then codes those), else None; ``stats``:
    their :class:`KeptStats`.
    """

    positions: np.ndarray
    positive: np.ndarray
    stats: KeptStats
    dropped: np.ndarray | None = None


class SwitchScratch:
    """Buffers of :func:`kept_switches`, reused across tensors (grown to the largest one seen).

    Fresh multi-megabyte arrays per tensor and task cost page faults: computing
    τ into a fresh tensor measured 1.6 ns per element against 0.8 ns into a
    reused one.
    """

    def __init__(self) -> None:
        self._allocate(0)

    def reserve(self, numel: int) -> None:
        if self.levels.size < numel:
            self._allocate(numel)

    def _allocate(self, numel: int) -> None:
        self.levels = np.empty(numel, dtype=np.uint8)
        # int32 positions where they fit: half the memory traffic of int64 (~5 % faster, measured).
        index = np.int32 if numel < 2**31 else np.int64
        self.kept = (np.empty(numel, dtype=index), np.empty(numel, dtype=index))
        self.dropped = np.empty(numel, dtype=index)
        self.signs = np.empty(numel, dtype=np.uint8)


def nested(ths: list[Thresholds]) -> bool:
    """True when every kept set is a subset of the previous one (both thresholds never decrease).

    Always the case for cut ``exact`` and ascending α (d = floor(α·n) grows
    with α, and so does the d-th smallest value). Cut ``authors`` keeps a
    whole sign once K = int(n·(1 − α)) reaches 0 (docs/MATH.md "Cut rules"),
    so on a sign of few elements a larger α can keep more: not nested.
    """
    return all(b.t_pos >= a.t_pos and b.t_neg >= a.t_neg for a, b in zip(ths, ths[1:]))


def nested_runs(ths: list[Thresholds]) -> list[list[Thresholds]]:
    """``ths`` cut, in order, into the longest runs that are each :func:`nested`."""
    runs: list[list[Thresholds]] = []
    for th in ths:
        if runs and nested([runs[-1][-1], th]):
            runs[-1].append(th)
        else:
            runs.append([th])
    return runs


MAX_SWITCHES = 127
"""Most nested switches :func:`kept_switches` computes in one sweep (a level byte holds 0-127)."""


def _as_float32(values: list[float]) -> tuple:
    # Compared in float32, as binarize does (torch rounds a Python scalar to
    # the tensor's dtype): exact for the build's thresholds, which are bit
    # patterns of τ, and the same cut as binarize for any other value.
    return tuple(np.float32(v) for v in values)


def _level_stats(kept: int, sum_abs: np.ndarray, sum_sq: np.ndarray, j: int) -> KeptStats:
    """KeptStats of switch j from per-level lane sums: levels above j, in a fixed order (lanes pairwise, top down)."""
    if not kept:
        return KeptStats()
    sa = sq = 0.0
    for lv in range(sum_abs.shape[0] - 1, j, -1):
        sa += float((sum_abs[lv, 0] + sum_abs[lv, 1]) + (sum_abs[lv, 2] + sum_abs[lv, 3]))
        sq += float((sum_sq[lv, 0] + sum_sq[lv, 1]) + (sum_sq[lv, 2] + sum_sq[lv, 3]))
    return KeptStats(kept, sa, sq)


def kept_switches(tau: torch.Tensor, ths: list[Thresholds], scratch: SwitchScratch | None = None
                  ) -> Iterator[KeptSwitch]:
    """The switches of paper 000 eq. (6) for nested thresholds, one :class:`KeptSwitch` per threshold.

    docs/MATH.md "Switches and knobs" (paper 000 eq. 6).

    Element for element the masks and signs of :func:`binarize` per
    threshold (kept = τ > t⁺ or τ < −t⁻, S = τ > 0), as kept positions; the
    kept statistics equal :func:`kept_stats` up to float64 rounding (the sums
    run in four interleaved lanes in a fixed order, see :mod:`._kernels`, so
    they are the same bits on every CPU, not the bits of torch's order).

    One vectorised sweep gives every element a level byte (how many
    thresholds keep it, and its sign); switch j's kept positions are then
    searched among switch j−1's, within each run of :func:`nested_runs`
    (one run for the thresholds of ascending α, except where cut
    ``authors`` keeps a whole small sign at a larger α: one sweep per run).
    The arrays yielded live in ``scratch`` and are valid until the next one
    is yielded. CPU (a CUDA τ is copied over first).
    """
    if len(ths) > MAX_SWITCHES:
        raise ValueError(f"at most {MAX_SWITCHES} thresholds per sweep, got {len(ths)}")
    flat = _f32(tau).reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    t = np.ascontiguousarray(flat.numpy())
    scratch = scratch or SwitchScratch()
    for run in nested_runs(ths):
        yield from _nested_switches(t, run, scratch)


def _nested_switches(t: np.ndarray, ths: list[Thresholds], scratch: SwitchScratch) -> Iterator[KeptSwitch]:
    """:func:`kept_switches` of one nested run over the flat float32 ``t``."""
    from tswitch_ray.switch import _kernels  # numba compiles on first use, not at import

    numel = int(t.size)
    scratch.reserve(numel)
    levels = scratch.levels[:numel]
    _kernels.switch_levels(t, _as_float32([th.t_pos for th in ths]), _as_float32([-th.t_neg for th in ths]), levels)
    shape = (len(ths) + 1, _kernels.LANES)
    sum_abs, sum_sq = np.zeros(shape), np.zeros(shape)
    n_prev = -1
    for j in range(len(ths)):
        pos, signs = scratch.kept[j % 2], scratch.signs
        dropped = None
        if n_prev < 0:
            kept, n_dropped = _kernels.kept_positions(levels, j, pos, scratch.dropped, signs)
        else:
            kept = _kernels.kept_subset(levels, j, scratch.kept[(j + 1) % 2], n_prev, pos, signs)
            n_dropped = -1
        if 2 * kept > numel:
            # The codec codes the minority: this switch's dropped positions. For
            # j > 0 (a later α below ~0.5, rare) this sweeps again: searching the
            # previous kept set first is the cheaper order in the common case.
            if n_dropped < 0:
                _, n_dropped = _kernels.kept_positions(levels, j, pos, scratch.dropped, signs)
            dropped = scratch.dropped[:n_dropped]
        if j == 0:
            _kernels.level_sums(t, levels, pos, kept, sum_abs, sum_sq)
        stats = _level_stats(int(kept), sum_abs, sum_sq, j)
        yield KeptSwitch(pos[:kept], signs[:kept], stats, dropped)
        n_prev = kept


def knob(stats: KeptStats, mode: KnobMode | str = "rms") -> float:
    """The switch knob λ of paper 000 eqs. (5)–(7) from kept-entry statistics.

    docs/MATH.md "Switches and knobs" (paper 000 eqs. 5–6).

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
