"""Compiled (numba) bit writers of codec ``rice-v1`` (specified in :mod:`.encoding` and docs/ARTIFACTS.md).

They take the ascending coded positions and compute the gaps
g_i = p_i − p_{i−1} − 1 (p_{−1} = −1) on the fly, so encoding needs no gap
array and no byte per unary bit (the NumPy formulation needed both: ~3x
slower and O(numel) bytes of temporaries).
"""

from __future__ import annotations

import numba
import numpy as np

_jit = numba.njit(cache=True, nogil=True, boundscheck=False)

# Remainders up to this width go through a 64-bit accumulator (≤ 7 pending
# bits + k must fit); wider ones, never seen in practice, bit by bit.
_FAST_K = 56


@_jit
def shifted_gap_sums(pos, k):  # pragma: no cover - compiled
    """Σ (g >> w) for w = k, …, k + 4 over the gaps of ascending ``pos``: unary zeros of Rice widths k … k + 4.

    Five named accumulators rather than an array: the loop then keeps them in
    registers (an array of runtime length measured several times slower).
    """
    s0 = s1 = s2 = s3 = s4 = 0
    last = -1
    for q in range(pos.size):
        p = pos[q]
        g = (p - last - 1) >> k
        last = p
        s0 += g
        s1 += g >> 1
        s2 += g >> 2
        s3 += g >> 3
        s4 += g >> 4
    return s0, s1, s2, s3, s4


@_jit
def write_unary(pos, k, out):  # pragma: no cover - compiled
    """Set, MSB first in the zeroed ``out`` (uint64 words, big-endian bit order), each gap's unary terminator.

    The current word is kept in a register and stored when the next
    terminator falls into a later word: OR-ing each bit into its byte in
    memory chained every terminator on the previous one's store (~2x slower).
    The caller byte-swaps the words on little-endian machines.
    """
    bit = -1
    last = -1
    word = 0
    acc = np.uint64(0)
    for i in range(pos.size):
        p = pos[i]
        bit += ((p - last - 1) >> k) + 1
        last = p
        w = bit >> 6
        if w != word:
            out[word] = acc
            acc = np.uint64(0)
            word = w
        acc |= np.uint64(1) << np.uint64(63 - (bit & 63))
    if pos.size:
        out[word] = acc


@_jit
def write_remainders(pos, k, out):  # pragma: no cover - compiled
    """Append the k low bits of each gap, MSB first, to the zeroed ``out`` ((len·k + 7) // 8 bytes)."""
    if k == 0:
        return
    o = 0
    last = -1
    if k <= _FAST_K:
        mask = (np.int64(1) << k) - 1
        acc = np.int64(0)
        pending = 0
        for i in range(pos.size):
            p = pos[i]
            acc = (acc << k) | ((p - last - 1) & mask)
            last = p
            pending += k
            while pending >= 8:
                pending -= 8
                out[o] = np.uint8((acc >> pending) & 0xFF)
                o += 1
            acc &= (np.int64(1) << pending) - 1
        if pending:
            out[o] = np.uint8((acc << (8 - pending)) & 0xFF)
        return
    bit = 0
    for i in range(pos.size):
        p = pos[i]
        g = p - last - 1
        last = p
        for b in range(k - 1, -1, -1):
            if (g >> b) & 1:
                out[bit >> 3] |= np.uint8(0x80) >> np.uint8(bit & 7)
            bit += 1
