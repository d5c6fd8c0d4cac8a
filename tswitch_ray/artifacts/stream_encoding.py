"""Codec ``rice-v1`` from a packed mask, in blocks: the bytes of :func:`.encoding.encode_kept`.

For tensors built in row blocks (:mod:`tswitch_ray.switch.chunked`): the
switch is held as a packed mask (one bit per element) and packed signs, not
as an array of positions (4-8 bytes per kept element). Encoding walks the
mask twice, a block of positions at a time: once for the exact Rice cost of
every width k (the gap sums Σ (g >> k) add up across blocks, the gap at a
block boundary is taken from the previous block's last position), once to
write the unary and remainder streams at their running bit offsets. The
width chosen and every byte written equal :func:`.encoding.encode_kept`'s
(docs/ARTIFACTS.md "Codec"; docs/MATH.md "Storage and the switch codec").
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from tswitch_ray.artifacts.encoding import _MAX_K, EncodedSwitch, _downhill_k

# Mask bytes unpacked per block: 1 Mi elements; the block's int64 positions, gaps and their temporaries
# take a few tens of MiB (distributed/planner.py ENCODE_BLOCK_BYTES).
_BLOCK_BYTES = 1 << 17


def _coded_blocks(mask_bits: bytes, numel: int, inverted: bool) -> Iterator[np.ndarray]:
    """Ascending coded positions (kept, or dropped when ``inverted``), int64, block by block."""
    packed = np.frombuffer(mask_bits, dtype=np.uint8)
    for start in range(0, packed.size, _BLOCK_BYTES):
        count = min(8 * _BLOCK_BYTES, numel - 8 * start)
        bits = np.unpackbits(packed[start:start + _BLOCK_BYTES], count=count).view(bool)
        yield np.flatnonzero(~bits if inverted else bits) + 8 * start


def _gaps(pos: np.ndarray, last: int) -> np.ndarray:
    return np.diff(pos, prepend=last) - 1


def _or_bits(out: np.ndarray, bit_index: np.ndarray) -> None:
    """Set the (ascending) bits ``bit_index`` of the MSB-first byte array ``out``."""
    if not bit_index.size:
        return
    first = int(bit_index[0]) // 8
    local = np.zeros(int(bit_index[-1]) + 1 - 8 * first, dtype=bool)
    local[bit_index - 8 * first] = True
    packed = np.packbits(local)
    out[first:first + packed.size] |= packed


def _shifted_sums(mask_bits: bytes, numel: int, inverted: bool) -> tuple[int, int, np.ndarray]:
    """(coded positions n, last position, Σ (g >> k) for k = 0 … _MAX_K) over the whole mask."""
    sums = np.zeros(_MAX_K + 1, dtype=np.int64)
    n, last = 0, -1
    for pos in _coded_blocks(mask_bits, numel, inverted):
        if not pos.size:
            continue
        g = _gaps(pos, last)
        for k in range(min(_MAX_K, int(g.max()).bit_length()) + 1):
            sums[k] += int(np.right_shift(g, k).sum())
        n, last = n + pos.size, int(pos[-1])
    return n, last, sums


def _write(mask_bits: bytes, numel: int, inverted: bool, k: int, unary: np.ndarray, rem: np.ndarray) -> None:
    last, bit, field = -1, -1, 0
    weights = np.arange(k - 1, -1, -1, dtype=np.int64)
    for pos in _coded_blocks(mask_bits, numel, inverted):
        if not pos.size:
            continue
        g = _gaps(pos, last)
        terminators = bit + np.cumsum((g >> k) + 1)
        _or_bits(unary, terminators)
        bit, last = int(terminators[-1]), int(pos[-1])
        if k:
            ones = ((g[:, None] >> weights) & 1).astype(bool).reshape(-1)
            _or_bits(rem, field + np.flatnonzero(ones))
            field += k * pos.size


def encode_packed(numel: int, kept: int, mask_bits: bytes, sign_bits: bytes) -> EncodedSwitch:
    """:func:`.encoding.encode_kept` of the switch whose packed mask is ``mask_bits`` (``numel`` bits, MSB
    first) and whose kept elements' packed signs are ``sign_bits``: the same :class:`EncodedSwitch`."""
    numel, kept = int(numel), int(kept)
    inverted = 2 * kept > numel
    n, last, sums = _shifted_sums(mask_bits, numel, inverted)
    if not n:
        return EncodedSwitch(numel=numel, kept=kept, k=0, inverted=inverted, mask_bits=b"", rem_bits=b"",
                             sign_bits=sign_bits)
    total = last + 1 - n
    sums[0] = total
    k = _downhill_k(total / n, lambda w: int(sums[w]) + n * (1 + w))
    unary = np.zeros((int(sums[k]) + n + 7) // 8, dtype=np.uint8)
    rem = np.zeros((n * k + 7) // 8, dtype=np.uint8)
    _write(mask_bits, numel, inverted, k, unary, rem)
    return EncodedSwitch(numel=numel, kept=kept, k=k, inverted=inverted, mask_bits=unary.tobytes(),
                         rem_bits=rem.tobytes(), sign_bits=sign_bits)
