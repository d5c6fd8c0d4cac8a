"""Exact k-th smallest selection over float32 magnitudes by radix histograms.

Why radix histograms instead of sorting or ``torch.kthvalue``:

* one histogram pass answers *every* rank at once (all discard ratios α of a
  build share it), where ``kthvalue`` costs a full selection per rank;
* histograms of disjoint shards add elementwise, so a threshold over a whole
  model spanning many tensors and Ray workers is exact without ever gathering
  the values in one place;
* it has no size limit (``torch.quantile`` refused inputs above 2^24
  elements in older torch releases; 2.14.1 accepts them, but still sorts
  per call) and is exact (no interpolation, no float rounding of ranks).

The thresholds this serves are specified in docs/MATH.md "Thresholds
(P-Discard cut)" (paper 000 eq. 3); TIES' trim and E-WEMoE's pruning use the
same selection (docs/MATH.md "TIES-Merging", "WEMoE and E-WEMoE").

Principle: for non-negative IEEE-754 float32 values, the int32 bit pattern is
monotonic in the value. Pass 1 counts the high 16 bits (sign, exponent and 7
mantissa bits) in 65 536 buckets; a cumulative sum tells which bucket holds
the wanted rank and the rank inside it. Pass 2 counts the low 16 bits of the
elements of just those buckets. Bucket and low bits together are the exact bit
pattern of the answer, so the result is bit-identical to ``torch.kthvalue``.

The sign bit is ignored everywhere in this module, so selection runs over
|x|: callers may pass a signed tensor (e.g. TIES over |τ|) without making an
``abs()`` copy, and -0.0 counts as 0. NaN bit patterns lie above +inf, so NaN
sorts last, as in ``torch.sort``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch

N_BUCKETS = 1 << 16
"""Buckets of the coarse (high 16 bits) and fine (low 16 bits) histograms."""

_LOW_MASK = 0xFFFF
_MAGNITUDE_KEY_MASK = 0x7FFF  # high 16 bits with the sign bit cleared
# Cap on buckets resolved by one bincount: its output is buckets × 65 536 int64
# (32 MiB at 64); more buckets are processed in chunks of this size.
_FINE_CHUNK = 64


def float_bits(x: torch.Tensor) -> torch.Tensor:
    """Flat int32 view of ``x`` as float32 (a copy only if ``x`` is not contiguous fp32)."""
    if not x.is_floating_point():
        raise TypeError(f"expected a floating-point tensor, got {x.dtype}")
    flat = x.reshape(-1)
    if flat.dtype != torch.float32:
        flat = flat.to(torch.float32)
    return flat.view(torch.int32)


def high_keys(bits: torch.Tensor, *, signed: bool) -> torch.Tensor:
    """High 16 bits of each bit pattern as int32 in [0, 65 536).

    ``signed=False`` clears the sign bit (keys of |x|, in [0, 32 768));
    ``signed=True`` keeps it, so negative values land in [32 768, 65 536)
    keyed by their magnitude plus 32 768.
    """
    keys = bits >> 16  # arithmetic shift: negative patterns give negative keys
    keys.bitwise_and_(_LOW_MASK if signed else _MAGNITUDE_KEY_MASK)
    return keys


def histogram_of_keys(keys: torch.Tensor) -> np.ndarray:
    """Counts of each 16-bit key, int64 numpy array of shape (65 536,)."""
    counts = torch.bincount(keys, minlength=N_BUCKETS)
    return counts.cpu().numpy().astype(np.int64, copy=False)


def fine_histograms_of_keys(
    bits: torch.Tensor, keys: torch.Tensor, buckets: Iterable[int]
) -> dict[int, np.ndarray]:
    """Low-16-bit histograms of the elements whose key is in ``buckets``.

    Building block shared by the unsigned and the signed (threshold) paths,
    which differ only in how keys are formed.
    """
    wanted = sorted({int(b) for b in buckets})
    for b in wanted:
        if not 0 <= b < N_BUCKETS:
            raise ValueError(f"bucket {b} outside [0, {N_BUCKETS})")
    result: dict[int, np.ndarray] = {}
    if not wanted:
        return result
    device = keys.device
    # A lookup table from key to slot (or -1) is one gather over the data,
    # where torch.isin would compare every element with every wanted bucket.
    lut = torch.full((N_BUCKETS,), -1, dtype=torch.int32, device=device)
    lut[torch.tensor(wanted, dtype=torch.long, device=device)] = torch.arange(
        len(wanted), dtype=torch.int32, device=device
    )
    slots = lut.index_select(0, keys)
    for start in range(0, len(wanted), _FINE_CHUNK):
        chunk = wanted[start : start + _FINE_CHUNK]
        if len(wanted) <= _FINE_CHUNK:
            selected = slots >= 0
        else:
            selected = (slots >= start) & (slots < start + len(chunk))
        # The selected elements are a small fraction (a few buckets out of
        # ~32k), so these gathers are cheap; one nonzero serves both.
        if selected.device.type == "cpu":
            # NumPy's flatnonzero is ~7x faster than torch.nonzero on one CPU thread.
            where = torch.from_numpy(np.flatnonzero(selected.numpy()))
        else:
            where = torch.nonzero(selected).reshape(-1)
        slot = slots.index_select(0, where).to(torch.long) - start
        low = (bits.index_select(0, where) & _LOW_MASK).to(torch.long)
        flat = torch.bincount(slot * N_BUCKETS + low, minlength=len(chunk) * N_BUCKETS)
        table = flat.cpu().numpy().astype(np.int64, copy=False).reshape(len(chunk), N_BUCKETS)
        for i, b in enumerate(chunk):
            result[b] = table[i].copy()
    return result


def coarse_histogram(mags: torch.Tensor) -> np.ndarray:
    """Pass 1: counts of the high 16 bits of |mags| as float32, int64 array (65 536,).

    Histograms of disjoint shards add elementwise. Runs on the tensor's device.
    """
    return histogram_of_keys(high_keys(float_bits(mags), signed=False))


def refine_buckets(coarse: np.ndarray, ranks: Sequence[int]) -> list[tuple[int, int]]:
    """For each 1-based rank: (coarse bucket holding it, 1-based rank within that bucket)."""
    coarse = np.asarray(coarse, dtype=np.int64)
    if coarse.shape != (N_BUCKETS,):
        raise ValueError(f"coarse histogram must have shape ({N_BUCKETS},), got {coarse.shape}")
    cum = np.cumsum(coarse)
    total = int(cum[-1])
    r = np.asarray([int(k) for k in ranks], dtype=np.int64)
    if r.size == 0:
        return []
    bad = r[(r < 1) | (r > total)]
    if bad.size:
        raise ValueError(f"rank {int(bad[0])} outside [1, {total}] (1-based, over {total} elements)")
    # First bucket whose cumulative count reaches the rank holds it.
    bucket = np.searchsorted(cum, r, side="left")
    before = np.where(bucket > 0, cum[np.maximum(bucket - 1, 0)], 0)
    return [(int(b), int(k)) for b, k in zip(bucket, r - before)]


def fine_histograms(mags: torch.Tensor, buckets: Iterable[int]) -> dict[int, np.ndarray]:
    """Pass 2: low-16-bit histograms (int64, (65 536,)) of |mags| in the given buckets.

    Histograms of disjoint shards add elementwise (see :func:`add_fine`).
    """
    bits = float_bits(mags)
    return fine_histograms_of_keys(bits, high_keys(bits, signed=False), buckets)


def add_fine(a: Mapping[int, np.ndarray], b: Mapping[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Elementwise sum of two fine-histogram dicts (a bucket missing from one counts as zeros)."""
    out = {k: np.asarray(v, dtype=np.int64).copy() for k, v in a.items()}
    for k, v in b.items():
        if k in out:
            out[k] += np.asarray(v, dtype=np.int64)
        else:
            out[k] = np.asarray(v, dtype=np.int64).copy()
    return out


def resolve(
    coarse: np.ndarray, fines: Mapping[int, np.ndarray], ranks: Sequence[int]
) -> list[float]:
    """Exact values of the given 1-based ranks from the (summed) histograms.

    The order statistics of docs/MATH.md "Thresholds (P-Discard cut)" (paper 000 eq. 3).

    Raises ``ValueError`` if a needed fine histogram is missing or does not
    add up to its coarse bucket (histograms from different data).
    """
    coarse = np.asarray(coarse, dtype=np.int64)
    values: list[float] = []
    for bucket, within in refine_buckets(coarse, ranks):
        if bucket not in fines:
            raise ValueError(f"no fine histogram for coarse bucket {bucket}; refine it first")
        cum = np.cumsum(np.asarray(fines[bucket], dtype=np.int64))
        if cum.shape != (N_BUCKETS,) or int(cum[-1]) != int(coarse[bucket]):
            raise ValueError(
                f"fine histogram of bucket {bucket} counts {int(cum[-1])} elements but the "
                f"coarse histogram counts {int(coarse[bucket])}: they come from different data"
            )
        low = int(np.searchsorted(cum, within, side="left"))
        pattern = np.array([(bucket << 16) | low], dtype=np.uint32)
        values.append(float(pattern.view(np.float32)[0]))
    return values


def kth_smallest(mags: torch.Tensor, ranks: Sequence[int]) -> list[float]:
    """Exact k-th smallest |mags| for every 1-based rank in ``ranks``, in two passes.

    The order statistic of docs/MATH.md "Thresholds (P-Discard cut)".

    Bit-identical to ``torch.kthvalue(mags.flatten(), k).values`` for
    non-negative inputs (of any size: no 2^24 limit); -0.0 is returned as 0.0.
    """
    bits = float_bits(mags)
    keys = high_keys(bits, signed=False)
    coarse = histogram_of_keys(keys)
    ranks = [int(k) for k in ranks]
    needed = {b for b, _ in refine_buckets(coarse, ranks)}
    fines = fine_histograms_of_keys(bits, keys, needed)
    return resolve(coarse, fines, ranks)
