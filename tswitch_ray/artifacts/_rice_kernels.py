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


# Decode status codes of :func:`coded_positions` (the caller words the error).
DECODE_OK = 0
DECODE_FEW_TERMINATORS = 1  # the unary stream ended before ``n`` terminators
DECODE_TRAILING = 2  # bytes after the byte of the last terminator
DECODE_BEYOND = 3  # a position ≥ numel
DECODE_MANY = 4  # more than ``n`` terminators

# Index of the highest set bit of a byte (0 = LSB); a table beats a bit loop by ~2x on dense unary streams.
_HIGH_BIT = np.array([0] + [int(b).bit_length() - 1 for b in range(1, 256)], dtype=np.int64)


# Slots of the decoder state that :func:`coded_positions` resumes from (an int64 array of STATE_SIZE).
_BYTE, _USED, _Q, _ACC, _HAVE, _REM, _LAST, _DONE = range(8)
STATE_SIZE = 8


@_jit
def coded_positions(unary, rem, k, numel, n, state, out):  # pragma: no cover - compiled
    """Decode the next ``out.size`` (at most) of the ``n`` ascending coded positions of a rice-v1 switch.

    Inverse of :func:`write_unary` and :func:`write_remainders`: the gap
    quotient is the count of 0 bits before each 1 of the unary stream, the
    remainder the next k bits of the remainder stream. Resumes from ``state``
    (zeros to start) and leaves it for the next call, so a tensor's positions
    are decoded in blocks that stay in cache. Returns the count written, or
    ``-DECODE_*`` on a corrupt stream. The caller checks the stream lengths
    first (the remainder stream must hold ``n·k`` bits): nothing here reads
    past either stream.
    """
    byte_i, used, q, acc = state[_BYTE], state[_USED], state[_Q], state[_ACC]
    have, r_i, last, i = state[_HAVE], state[_REM], state[_LAST], state[_DONE]
    nbytes = unary.size
    mask = (np.int64(1) << k) - 1 if k <= _FAST_K else np.int64(0)
    c = 0
    while i < n and c < out.size:
        if byte_i >= nbytes:
            return -DECODE_FEW_TERMINATORS
        b = np.int64(unary[byte_i]) & ((np.int64(1) << (8 - used)) - 1)  # the byte's unspent bits
        if b == 0:
            q += 8 - used
            byte_i += 1
            used = 0
            continue
        high = _HIGH_BIT[b]  # the next terminator
        q += 7 - used - high
        used = 8 - high
        if k == 0:
            g = q
        elif k <= _FAST_K:
            while have < k:
                acc = (acc << 8) | np.int64(rem[r_i])
                r_i += 1
                have += 8
            have -= k
            g = (q << k) | ((acc >> have) & mask)
            acc &= (np.int64(1) << have) - 1
        else:
            g = q
            for _ in range(k):
                g = (g << 1) | ((np.int64(rem[r_i >> 3]) >> (7 - (r_i & 7))) & 1)
                r_i += 1
        last += g + 1
        if last >= numel:
            return -DECODE_BEYOND
        out[c] = last
        c += 1
        i += 1
        q = 0
        if used == 8:
            byte_i += 1
            used = 0
    if i == n:
        if used and (np.int64(unary[byte_i]) & ((np.int64(1) << (8 - used)) - 1)) != 0:
            return -DECODE_MANY
        if byte_i + (1 if used else 0) < nbytes:
            return -DECODE_TRAILING
    state[_BYTE], state[_USED], state[_Q], state[_ACC] = byte_i, used, q, acc
    state[_HAVE], state[_REM], state[_LAST], state[_DONE] = have, r_i, last, i
    return c


@_jit
def scatter_switch(pos, signs, inverted, mask, positive):  # pragma: no cover - compiled
    """Fill the zeroed flat bool ``mask`` and ``positive`` from the coded positions and the packed sign stream."""
    numel = mask.size
    if not inverted:
        for j in range(pos.size):
            p = pos[j]
            mask[p] = True
            positive[p] = (signs[j >> 3] >> (7 - (j & 7))) & 1
        return
    j = 0
    c = 0
    for e in range(numel):
        if c < pos.size and pos[c] == e:
            c += 1
            continue
        mask[e] = True
        positive[e] = (signs[j >> 3] >> (7 - (j & 7))) & 1
        j += 1
