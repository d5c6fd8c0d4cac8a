"""Compact, lossless encoding of one binary task switch (mask + signs).

Codec ``rice-v1`` (full specification in docs/ARTIFACTS.md, "Codec"; its
rationale and the entropy bound in docs/MATH.md "Storage and the switch codec"):

* The *coded set* is the set of kept positions, or — when more than half of
  the elements are kept — the set of *dropped* positions (``inverted``), so
  the gaps coded below are always the runs of the majority value.
* Each coded position ``p_i`` (ascending) is preceded by a gap
  ``g_i = p_i - p_{i-1} - 1`` (with ``p_{-1} = -1``) of elements that are not
  in the coded set. The tail after the last coded position is implied by
  ``numel`` and not stored.
* Every gap is written as a Rice code of parameter ``k``: the quotient
  ``g >> k`` in unary (that many 0 bits, then a terminating 1 bit) into the
  *unary stream*, the remainder ``g & (2^k - 1)`` as exactly ``k`` bits
  (most significant first) into the *remainder stream*.
* The sign of every kept element (1 = positive), in ascending position order,
  goes into the *sign stream*.
* Each stream is packed MSB-first into bytes (``np.packbits``) and padded with
  0 bits to a whole byte.

Keeping the three streams apart keeps decoding simple: a compiled loop reads
each terminator (a table lookup per byte) and its remainder with one
accumulator, in cache-sized blocks (:func:`decode_positions`); on a device the
same is vectorised torch (:func:`torch_positions`: the terminators are
``nonzero`` of the unpacked unary stream, the remainders a reshape of the
unpacked remainder stream). For i.i.d. masks
the gaps are geometric, for which a Rice code with the best ``k`` is within a
few percent of the entropy (Gallager & van Voorhis 1975); ``k`` is chosen by
exact cost on the actual gaps, so non-i.i.d. masks get the best Rice code too.

Memory: encoding holds O(numel) bytes of temporaries (8-17 bytes per coded
position); decoding on the CPU holds one block of positions (512 KiB), on a
device one byte per unary bit and 8 per coded position; tensors are encoded
one at a time.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from tswitch_ray.errors import ArtifactError

CODEC_NAME = "rice-v1"

# Largest Rice parameter a gap can need: gaps are < numel < 2**63.
_MAX_K = 62


@dataclass(frozen=True)
class EncodedSwitch:
    """One encoded switch: everything needed to rebuild (mask, positive).

    ``mask_bits`` is the unary stream of the Rice-coded gaps, ``rem_bits`` the
    fixed-width remainder stream and ``sign_bits`` one bit per kept element.
    """

    numel: int
    kept: int
    k: int
    inverted: bool
    mask_bits: bytes
    rem_bits: bytes
    sign_bits: bytes
    codec: str = CODEC_NAME

    @property
    def coded(self) -> int:
        """Number of coded positions (kept ones, or dropped ones when inverted)."""
        return self.numel - self.kept if self.inverted else self.kept

    @property
    def nbytes(self) -> int:
        """Bytes of payload (the three streams), excluding the small header fields."""
        return len(self.mask_bits) + len(self.rem_bits) + len(self.sign_bits)

    @property
    def nbits(self) -> int:
        """Stored payload size in bits (whole bytes, padding included)."""
        return 8 * self.nbytes

    def sha256(self) -> str:
        """Digest of the payload, see :func:`payload_sha256`."""
        return payload_sha256(self.mask_bits, self.rem_bits, self.sign_bits)


def payload_sha256(mask_bits: bytes, rem_bits: bytes, sign_bits: bytes) -> str:
    """sha256 (hex) over the three streams, each prefixed by its length.

    The 8-byte little-endian length prefixes make the digest unambiguous
    (moving a byte from one stream to the next changes it).
    """
    h = hashlib.sha256()
    for stream in (mask_bits, rem_bits, sign_bits):
        h.update(len(stream).to_bytes(8, "little"))
        h.update(stream)
    return h.hexdigest()


def entropy_bound_bits(numel: int, kept: int) -> float:
    """Entropy bound in bits for a switch: numel·H(kept/numel) + kept (one bit per sign).

    This is H(α) + (1 − α) bits per element for a kept fraction 1 − α
    (docs/MATH.md "Storage and the switch codec"); the bound for i.i.d. masks
    with that kept fraction.
    """
    if numel == 0:
        return 0.0
    p = kept / numel
    h = 0.0 if p in (0.0, 1.0) else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))
    return numel * h + kept


def _rice_cost(gaps: np.ndarray, k: int, total: int | None = None) -> int:
    """Exact Rice cost in bits of ``gaps`` with parameter ``k`` (before byte padding).

    ``total`` (= gaps.sum(), if the caller knows it) makes k = 0 free.
    """
    shifted = int(total) if (k == 0 and total is not None) else int(np.right_shift(gaps, k).sum())
    return shifted + gaps.size * (1 + k)


def best_rice_k(gaps: np.ndarray, total: int | None = None) -> int:
    """The ``k`` minimising the exact Rice cost of ``gaps`` (docs/MATH.md "Storage and the switch codec").

    Start from the geometric-distribution estimate k ≈ log2(mean·ln 2) and walk
    downhill; the cost is unimodal in k for all practical gap sets, and each
    step is one vectorised pass over the gaps. ``total`` is ``gaps.sum()``
    when the caller knows it without a pass (the gaps of ascending positions
    p sum to p[-1] + 1 − len(p)): the mean and the k = 0 cost are then free,
    and equal to what a pass would give (integer sums below 2^53 are exact in
    float64), so the chosen k is the same.
    """
    if gaps.size == 0:
        return 0
    mean = float(gaps.mean()) if total is None else int(total) / gaps.size
    return _downhill_k(mean, lambda k: _rice_cost(gaps, k, total))


def _downhill_k(mean: float, cost_of: Callable[[int], int]) -> int:
    """The walk of :func:`best_rice_k`, given the mean gap and the exact cost of any k."""
    k = 0 if mean < 1 else min(_MAX_K, max(0, round(math.log2(mean * math.log(2)))))
    cost = cost_of(k)
    for step in (-1, 1):
        while 0 <= k + step <= _MAX_K:
            c = cost_of(k + step)
            if c >= cost:
                break
            k, cost = k + step, c
    return k


def _unpack_fixed(data: bytes, count: int, k: int) -> np.ndarray:
    """The ``count`` k-bit values (MSB first) of a remainder stream, as int64."""
    out = np.zeros(count, dtype=np.int64)
    if k == 0 or count == 0:
        return out
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=count * k).reshape(count, k)
    # A loop over the k bit columns (k <= 62), each step vectorised over all values:
    # several times faster than padding to a machine word and repacking.
    for j in range(k):
        out <<= 1
        out |= bits[:, j]
    return out


def encode_switch(mask: np.ndarray, positive: np.ndarray) -> EncodedSwitch:
    """Encode a switch losslessly with codec ``rice-v1`` (docs/MATH.md "Storage and the switch codec").

    ``mask`` (kept) and ``positive`` (sign of τ) are boolean arrays of the same
    size, flattened in C order if not already flat. Only the signs of kept
    elements are stored; ``positive`` outside the mask is ignored.
    """
    mask = np.ascontiguousarray(mask, dtype=bool).reshape(-1)
    positive = np.ascontiguousarray(positive, dtype=bool).reshape(-1)
    if mask.size != positive.size:
        raise ValueError(f"mask has {mask.size} elements but positive has {positive.size}")
    kept_pos = np.flatnonzero(mask)
    return encode_kept(int(mask.size), kept_pos, positive[kept_pos], mask)


def encode_kept(numel: int, kept_pos: np.ndarray, kept_positive: np.ndarray,
                mask: np.ndarray | None = None, dropped_pos: np.ndarray | None = None) -> EncodedSwitch:
    """:func:`encode_switch` from the kept positions, byte for byte the same result.

    ``kept_pos`` are the ascending flat indices of the kept elements and
    ``kept_positive`` the sign (True or 1 = positive) of each of them, in the
    same order. The build computes exactly these (compacted, a fraction of the
    tensor) and so never scatters a full mask only to search it again. When
    more than half the elements are kept the *dropped* positions are coded:
    pass them as ``dropped_pos`` (ascending) or the full flat boolean ``mask``
    if at hand; else they are derived from ``kept_pos``. The streams are
    written by compiled loops (:mod:`._rice_kernels`).
    """
    from tswitch_ray.artifacts import _rice_kernels as rk  # numba compiles on first use, not at import

    numel = int(numel)
    kept_pos = _positions(kept_pos)
    kept_positive = np.asarray(kept_positive).reshape(-1)
    if kept_positive.size != kept_pos.size:
        raise ValueError(f"{kept_pos.size} kept positions but {kept_positive.size} signs")
    kept = int(kept_pos.size)
    # Code the minority value's positions: gaps are then runs of the majority,
    # which is what a Rice code of geometric gaps is efficient for.
    inverted = 2 * kept > numel
    if not inverted:
        coded = kept_pos
    elif dropped_pos is not None:
        coded = _positions(dropped_pos)
    else:
        if mask is None:
            mask = np.zeros(numel, dtype=bool)
            mask[kept_pos] = True
        coded = np.flatnonzero(~np.asarray(mask, dtype=bool).reshape(-1))
    n = int(coded.size)
    if n:
        total = int(coded[-1]) + 1 - n  # Σ gaps of ascending positions, without a pass
        shifted: dict[int, int] = {0: total}

        def cost(k: int) -> int:
            if k not in shifted:
                # The walk visits a few neighbouring widths: get five per pass over the positions.
                first = max(0, k - 2)
                sums = rk.shifted_gap_sums(coded, first)
                shifted.update((first + i, int(v)) for i, v in enumerate(sums))
            return shifted[k] + n * (1 + k)

        k = _downhill_k(total / n, cost)
        unary_bits = cost(k) - n * k  # Σ (g >> k) zeros and n ones
        words = np.zeros((unary_bits + 63) // 64, dtype=np.uint64)
        rk.write_unary(coded, k, words)
        unary = words.astype(">u8", copy=False).view(np.uint8)[: (unary_bits + 7) // 8]
        rem = np.zeros((n * k + 7) // 8, dtype=np.uint8)
        rk.write_remainders(coded, k, rem)
        mask_bits, rem_bits = unary.tobytes(), rem.tobytes()
    else:
        k, mask_bits, rem_bits = 0, b"", b""
    return EncodedSwitch(numel=numel, kept=kept, k=k, inverted=bool(inverted), mask_bits=mask_bits,
                         rem_bits=rem_bits, sign_bits=np.packbits(kept_positive).tobytes())


def _positions(pos: np.ndarray) -> np.ndarray:
    """Flat contiguous int32 or int64 positions (the compiled writers take either without a copy)."""
    pos = np.asarray(pos)
    if pos.dtype not in (np.int32, np.int64):
        pos = pos.astype(np.int64)
    return np.ascontiguousarray(pos).reshape(-1)


def _corrupt(enc: EncodedSwitch, cause: str) -> ArtifactError:
    return ArtifactError(
        f"Encoded switch ({enc.codec}, numel={enc.numel}, kept={enc.kept}, k={enc.k}) cannot be decoded: {cause}. "
        "The payload is corrupt or was written by an incompatible codec; rebuild the artifacts."
    )


# Positions decoded per block: 512 KiB of int64, in cache while the block is applied.
POSITION_BLOCK = 1 << 16


@dataclass(frozen=True)
class SwitchPositions:
    """A checked switch, decoded on demand to its ascending coded positions and its packed sign stream.

    The coded positions are the kept elements' flat indices, or the dropped
    ones' when ``inverted``; :attr:`signs` (uint8, MSB first) holds one bit
    per kept element in ascending order (1 = positive). :meth:`blocks` decodes
    them a block at a time (compiled), so eq. 7 is applied without a full-size
    mask or position array (:func:`tswitch_ray.switch.reconstruct.reconstruct_into`).
    """

    enc: EncodedSwitch
    block: int = POSITION_BLOCK

    @property
    def numel(self) -> int:
        return int(self.enc.numel)

    @property
    def kept(self) -> int:
        return int(self.enc.kept)

    @property
    def inverted(self) -> bool:
        return bool(self.enc.inverted)

    @property
    def signs(self) -> np.ndarray:
        return np.frombuffer(self.enc.sign_bits, dtype=np.uint8)

    def blocks(self) -> Iterator[np.ndarray]:
        """The coded positions (int64) in ascending blocks; each block is valid until the next is drawn."""
        from tswitch_ray.artifacts import _rice_kernels as rk  # numba compiles on first use, not at import

        enc, n = self.enc, self.enc.coded
        unary, rem = np.frombuffer(enc.mask_bits, dtype=np.uint8), np.frombuffer(enc.rem_bits, dtype=np.uint8)
        state = np.zeros(rk.STATE_SIZE, dtype=np.int64)
        state[rk._LAST] = -1
        buf = np.empty(min(self.block, max(n, 1)), dtype=np.int64)
        done = 0
        while done < n:
            got = rk.coded_positions(unary, rem, int(enc.k), int(enc.numel), n, state, buf)
            if got == -rk.DECODE_BEYOND:
                raise _corrupt(enc, "a decoded position is beyond numel")
            if got <= 0:  # the checks of decode_positions make this unreachable for any payload
                raise _corrupt(enc, f"unary stream does not hold {n} terminators")
            done += got
            yield buf[:got]

    def positions(self) -> np.ndarray:
        """All coded positions, ascending (8 bytes each)."""
        out = np.empty(self.enc.coded, dtype=np.int64)
        at = 0
        for b in self.blocks():
            out[at:at + b.size] = b
            at += b.size
        return out

    def positions_on(self, device: torch.device) -> torch.Tensor:
        """All coded positions as an int64 tensor on ``device``: compiled on the CPU, elsewhere
        :func:`torch_positions` on the device (only the encoded streams cross to it)."""
        if device.type == "cpu":
            return torch.from_numpy(self.positions())
        return torch_positions(self.enc, device)

    def planes(self) -> tuple[np.ndarray, np.ndarray]:
        """Flat boolean ``(mask, positive)``; ``positive`` is False outside the mask."""
        from tswitch_ray.artifacts import _rice_kernels as rk

        mask = np.zeros(self.numel, dtype=bool)
        positive = np.zeros(self.numel, dtype=bool)
        rk.scatter_switch(self.positions(), self.signs, self.inverted, mask, positive)
        return mask, positive


def torch_positions(enc: EncodedSwitch, device: torch.device) -> torch.Tensor:
    """The coded positions of a checked ``enc`` (see :func:`decode_positions`), decoded on ``device`` by
    vectorised torch ops: terminators are ``nonzero`` of the unpacked unary bits, remainders a reshape of
    the unpacked remainder bits, positions a cumulative sum of the gaps. For CUDA, where it runs in parallel."""
    n, k = enc.coded, int(enc.k)
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=device)

    def bits(stream: bytes) -> torch.Tensor:
        raw = torch.frombuffer(bytearray(stream), dtype=torch.uint8).to(device)
        return ((raw.unsqueeze(1) >> shifts) & 1).reshape(-1)

    term = torch.nonzero(bits(enc.mask_bits)).reshape(-1)
    gaps = torch.diff(term, prepend=term.new_tensor([-1])) - 1
    if k:
        weights = torch.tensor([1 << b for b in range(k - 1, -1, -1)], dtype=torch.int64, device=device)
        rem = bits(enc.rem_bits)[: n * k].reshape(n, k).to(torch.int64)
        gaps = (gaps << k) | (rem * weights).sum(dim=1)
    pos = torch.cumsum(gaps + 1, dim=0) - 1
    if int(pos[-1]) >= enc.numel:
        raise _corrupt(enc, "a decoded position is beyond numel")
    return pos


def _check_streams(enc: EncodedSwitch) -> np.ndarray:
    """The unary stream as bytes, after checking every stream length against the header fields."""
    if enc.codec != CODEC_NAME:
        raise _corrupt(enc, f"unknown codec {enc.codec!r} (this reader knows {CODEC_NAME!r})")
    numel, kept, k = int(enc.numel), int(enc.kept), int(enc.k)
    if not (0 <= kept <= numel) or not (0 <= k <= _MAX_K):
        raise _corrupt(enc, "header fields out of range")
    coded = enc.coded
    unary = np.frombuffer(enc.mask_bits, dtype=np.uint8)
    terminators = int(np.bitwise_count(unary).sum(dtype=np.int64))
    if terminators != coded:
        raise _corrupt(enc, f"unary stream has {terminators} terminators, expected {coded}")
    if coded and unary[-1] == 0:
        raise _corrupt(enc, "unary stream has trailing bytes")
    if coded == 0 and enc.mask_bits:
        raise _corrupt(enc, "unary stream should be empty")
    if len(enc.rem_bits) != (coded * k + 7) // 8:
        raise _corrupt(enc, f"remainder stream has {len(enc.rem_bits)} bytes, expected {(coded * k + 7) // 8}")
    if len(enc.sign_bits) != (kept + 7) // 8:
        raise _corrupt(enc, f"sign stream has {len(enc.sign_bits)} bytes, expected {(kept + 7) // 8}")
    return unary


def decode_positions(enc: EncodedSwitch) -> SwitchPositions:
    """The checked :class:`SwitchPositions` of ``enc``, decoded on demand (compiled, in cache-sized blocks).

    Every stream length is checked against the header fields here, so a
    truncated or padded payload raises :class:`ArtifactError` instead of
    decoding garbage.
    """
    _check_streams(enc)
    return SwitchPositions(enc)


def decode_switch(enc: EncodedSwitch) -> tuple[np.ndarray, np.ndarray]:
    """Decode to flat boolean arrays ``(mask, positive)``; ``positive`` is False outside the mask.

    Checked as :func:`decode_positions`, which does the decoding.
    """
    return decode_positions(enc).planes()
