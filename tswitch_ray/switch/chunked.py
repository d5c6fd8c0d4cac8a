"""Switches of one task-vector tensor computed from row blocks, equal bit for bit to the whole-tensor ones.

Why: a tensor such as a 128 000 × 2048 embedding needs ~1 GiB per fp32 copy
of τ; :func:`.thresholds.tensor_thresholds` and :func:`.binarize.kept_switches`
hold several such copies. Here every pass sees one block of τ at a time and
keeps, per α, only the packed mask (one bit per element) and the packed signs
of the kept elements (docs/MATH.md "Switches and knobs", paper 000 eq. 6;
thresholds: "Thresholds (P-Discard cut)", paper 000 eq. 3).

Exactness:

* thresholds: the coarse and fine histograms of disjoint blocks add up
  (:mod:`.thresholds`), so :class:`BlockThresholds` gives the values of
  :func:`.thresholds.tensor_thresholds` on the whole tensor;
* masks and signs are per element;
* the knob's float64 sums: :func:`.binarize.kept_switches` sums the kept
  values of each nested run's first switch in four interleaved lanes
  (position q of the kept sequence in lane q % 4, the last kept % 4 values in
  lane 0, see :mod:`._kernels`). :class:`BlockSwitches` feeds the same
  sequence to the same kernel in whole groups of four and carries the
  remainder of a block to the next, so each lane adds the same values in the
  same order: the same bits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tswitch_ray.switch.binarize import (
    KeptStats,
    _as_float32,
    _level_stats,
    nested_runs,
)
from tswitch_ray.switch.thresholds import (
    RefineRequest,
    SignedFine,
    SignedHistograms,
    Thresholds,
    refine_request,
    resolve_thresholds,
    signed_fine_histograms,
    signed_histograms,
)


class PackedBits:
    """A bit string of known maximum length, appended to in pieces; packed MSB first (``np.packbits``)."""

    def __init__(self, capacity_bits: int) -> None:
        self.data = np.zeros((int(capacity_bits) + 7) // 8, dtype=np.uint8)
        self.nbits = 0

    def append(self, bits: np.ndarray) -> None:
        """Append a flat boolean (or 0/1 uint8) array."""
        n = int(bits.size)
        if not n:
            return
        head = self.nbits % 8
        if head:
            bits = np.concatenate([np.zeros(head, dtype=np.uint8), bits.astype(np.uint8, copy=False)])
        packed = np.packbits(bits)
        start = self.nbits // 8
        self.data[start:start + packed.size] |= packed
        self.nbits += n

    def tobytes(self) -> bytes:
        return self.data[: (self.nbits + 7) // 8].tobytes()


class BlockThresholds:
    """Scope "tensor" thresholds of one tensor from its τ in blocks: ``add`` every block (pass 1), then,
    when :attr:`request` is not empty, ``add_fine`` every block again (pass 2), then :meth:`result`."""

    def __init__(self, alphas: Sequence[float], cut: str, name: str | None = None) -> None:
        self.alphas, self.cut, self.name = list(alphas), cut, name
        self.hist = SignedHistograms.empty()
        self.fine = SignedFine()
        self._request: RefineRequest | None = None

    def add(self, tau: torch.Tensor) -> None:
        self.hist = self.hist + signed_histograms(tau, self.name)

    @property
    def request(self) -> RefineRequest:
        """The boundary buckets of pass 2, known once every block went through :meth:`add`."""
        if self._request is None:
            self._request = refine_request(self.hist, self.alphas, self.cut)
        return self._request

    def add_fine(self, tau: torch.Tensor) -> None:
        self.fine = self.fine + signed_fine_histograms(tau, self.request)

    def result(self) -> list[Thresholds]:
        return resolve_thresholds(self.hist, self.fine, self.alphas, self.cut)


@dataclass(frozen=True, eq=False)
class PackedSwitch:
    """One α's switch of a whole tensor: packed mask (``numel`` bits), packed signs of the kept elements."""

    numel: int
    kept: int
    mask_bits: bytes
    sign_bits: bytes
    stats: KeptStats


class _Run:
    """State of one nested run of thresholds (see :func:`.binarize.nested_runs`) across blocks."""

    def __init__(self, ths: list[Thresholds], numel: int) -> None:
        from tswitch_ray.switch import _kernels  # numba compiles on first use, not at import

        self.ths = ths
        self.t_pos = _as_float32([th.t_pos for th in ths])
        self.neg_t_neg = _as_float32([-th.t_neg for th in ths])
        shape = (len(ths) + 1, _kernels.LANES)
        self.sum_abs, self.sum_sq = np.zeros(shape), np.zeros(shape)
        self.pending_t = np.zeros(0, dtype=np.float32)
        self.pending_lv = np.zeros(0, dtype=np.uint8)
        self.masks = [PackedBits(numel) for _ in ths]
        self.signs = [PackedBits(numel) for _ in ths]
        self.kept = [0] * len(ths)

    def add(self, t: np.ndarray, levels: np.ndarray) -> None:
        from tswitch_ray.switch import _kernels

        _kernels.switch_levels(t, self.t_pos, self.neg_t_neg, levels)
        counts = levels & np.uint8(127)
        for j in range(len(self.ths)):
            mask = counts > j
            self.masks[j].append(mask)
            self.signs[j].append(levels[mask] >> np.uint8(7))
            self.kept[j] += int(np.count_nonzero(mask))
            if j == 0:
                self._sums(t[mask], levels[mask])

    def _sums(self, values: np.ndarray, levels: np.ndarray) -> None:
        from tswitch_ray.switch import _kernels

        values = np.concatenate([self.pending_t, values])
        levels = np.concatenate([self.pending_lv, levels])
        whole = values.size - values.size % _kernels.LANES
        _kernels.level_sums(values, levels, np.arange(whole, dtype=np.int32), whole, self.sum_abs, self.sum_sq)
        self.pending_t, self.pending_lv = values[whole:].copy(), levels[whole:].copy()

    def finish(self, numel: int) -> list[PackedSwitch]:
        from tswitch_ray.switch import _kernels

        n = self.pending_t.size  # < LANES: lane 0, in order, as the whole-tensor kernel's tail
        _kernels.level_sums(self.pending_t, self.pending_lv, np.arange(n, dtype=np.int32), n,
                            self.sum_abs, self.sum_sq)
        return [PackedSwitch(numel, self.kept[j], self.masks[j].tobytes(), self.signs[j].tobytes(),
                             _level_stats(self.kept[j], self.sum_abs, self.sum_sq, j)) for j in range(len(self.ths))]


class BlockSwitches:
    """:func:`.binarize.kept_switches` of one tensor fed in ascending blocks of its flat τ.

    ``add`` every block in order, then :meth:`result`: one :class:`PackedSwitch`
    per threshold, in the order of ``ths``. Holds per α numel/8 bytes of mask
    and at most as many of signs, plus one block's temporaries.
    """

    def __init__(self, numel: int, ths: list[Thresholds]) -> None:
        self.numel = int(numel)
        self.runs = [_Run(run, self.numel) for run in nested_runs(ths)]
        self.seen = 0
        self._levels = np.empty(0, dtype=np.uint8)

    def add(self, tau: torch.Tensor) -> None:
        flat = tau.reshape(-1)
        flat = flat if flat.dtype == torch.float32 else flat.to(torch.float32)
        t = np.ascontiguousarray(flat.cpu().numpy())
        if self._levels.size < t.size:
            self._levels = np.empty(t.size, dtype=np.uint8)
        for run in self.runs:
            run.add(t, self._levels[: t.size])
        self.seen += t.size

    def result(self) -> list[PackedSwitch]:
        if self.seen != self.numel:
            raise ValueError(f"blocks hold {self.seen} elements, the tensor {self.numel}")
        return [sw for run in self.runs for sw in run.finish(self.numel)]
