"""Compiled inner loops (numba) of the switch build's two passes over the data.

Why compiled: each of these loops touches every element of every task vector
once, and written as NumPy/torch array expressions each needs several full-size
temporaries (keys, lookups, boolean masks, index arrays): 6-20 ns per element
on one CPU core against ~1 ns for reading the data and computing τ. As plain
loops they run in one sweep without temporaries.

Determinism: no ``fastmath``, so the compiler may not reorder floating-point
additions; the float64 sums below run in an order fixed by this code (four
interleaved lanes), so they are the same bits on every CPU the build runs on.
``cache=True`` keeps the compiled code next to this file (or in numba's user
cache when the package directory is read-only), so Ray workers load it
instead of compiling it again.

The math each loop implements is documented, with its paper equation, in the
public function that calls it (:mod:`.thresholds`, :mod:`.binarize`) and
specified in docs/MATH.md "Thresholds (P-Discard cut)" and "Switches and knobs".
"""

from __future__ import annotations

import numba
import numpy as np

_jit = numba.njit(cache=True, nogil=True, boundscheck=False)

LANES = 4
"""Interleaved float64 accumulators per sum: breaks the add latency chain without reordering by the compiler."""

_INT32_MIN = -(2**31)  # bit pattern of -0.0


@_jit
def scan_signed_keys(bits, in_window, counts, picked):  # pragma: no cover - compiled
    """Coarse signed-key histogram of float32 bit patterns, their ±0.0 counts and in-window patterns.

    ``counts[(bits >> 16) & 0xFFFF] += 1`` for every element; the patterns whose
    key is flagged in ``in_window`` are copied, in order, to the front of
    ``picked`` (at least as long as ``bits``). Returns (picked, +0.0, −0.0).
    """
    m = 0
    pos_zero = 0
    neg_zero = 0
    for i in range(bits.size):
        b = bits[i]
        key = (b >> 16) & 0xFFFF
        counts[key] += 1
        picked[m] = b
        m += in_window[key]
        pos_zero += b == 0
        neg_zero += b == _INT32_MIN
    return m, pos_zero, neg_zero


@_jit
def switch_levels(t, t_pos, neg_t_neg, levels):  # pragma: no cover - compiled
    """Per element: bit 7 = (t > 0), bits 0-6 = how many of the (t_pos[j], neg_t_neg[j]) pairs keep it.

    An element is kept by pair j when ``t > t_pos[j]`` or ``t < neg_t_neg[j]``.
    The thresholds are tuples: numba compiles one loop per tuple length, whose
    inner loop over the pairs unrolls, so the sweep vectorises (with arrays of
    thresholds it stays scalar, ~4x slower).
    """
    for i in range(t.size):
        v = t[i]
        lev = np.uint8(v > 0) << np.uint8(7)
        for j in range(len(t_pos)):
            lev += np.uint8((v > t_pos[j]) | (v < neg_t_neg[j]))
        levels[i] = lev


@_jit
def kept_positions(levels, j, kept_pos, dropped_pos, signs):  # pragma: no cover - compiled
    """All elements: ascending positions switch ``j`` keeps (levels & 127 > j), their signs (bit 7),
    and the positions it drops.

    Output arrays must be ≥ len(levels) long: each write lands at most at the
    current element's index, and is overwritten until its count moves on
    (no data-dependent branch: kept/dropped are ~50/50 and unpredictable).
    Returns (kept, dropped).
    """
    a = 0
    d = 0
    jj = np.uint8(j)
    for i in range(levels.size):
        x = levels[i]
        kept = (x & np.uint8(127)) > jj
        kept_pos[a] = i
        signs[a] = x >> np.uint8(7)
        dropped_pos[d] = i
        a += kept
        d += not kept
    return a, d


@_jit
def kept_subset(levels, j, prev, n_prev, kept_pos, signs):  # pragma: no cover - compiled
    """Among the first ``n_prev`` positions of ``prev`` (a superset), those switch ``j`` keeps, and their signs."""
    a = 0
    jj = np.uint8(j)
    for q in range(n_prev):
        p = prev[q]
        x = levels[p]
        kept_pos[a] = p
        signs[a] = x >> np.uint8(7)
        a += (x & np.uint8(127)) > jj
    return a


@_jit
def level_sums(t, levels, pos, n, sum_abs, sum_sq):  # pragma: no cover - compiled
    """Σ|t[p]| and Σ t[p]² in float64 per level (bits 0-6 of levels[p]) over the first ``n`` positions.

    ``sum_abs``/``sum_sq`` have shape (levels + 1, LANES): position q goes to
    lane q % LANES, each lane summed in order. One pass over the first
    switch's kept positions gives the sums of every nested switch (switch j
    keeps the levels above j), instead of one pass per switch.
    """
    whole = n - n % LANES
    for q in range(0, whole, LANES):
        for lane in range(LANES):
            p = pos[q + lane]
            a = abs(np.float64(t[p]))
            lv = levels[p] & np.uint8(127)
            sum_abs[lv, lane] += a
            sum_sq[lv, lane] += a * a
    for q in range(whole, n):
        p = pos[q]
        a = abs(np.float64(t[p]))
        lv = levels[p] & np.uint8(127)
        sum_abs[lv, 0] += a
        sum_sq[lv, 0] += a * a
