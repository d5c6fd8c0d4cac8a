"""Compiled (numba) kernels of θ0 + λ·M⊙S (docs/MATH.md "Reconstruction", paper 000 eq. 7) from a switch's
coded positions (a block at a time) and packed signs.

They produce exactly the bytes of :func:`tswitch_ray.switch.reconstruct.reconstruct` (the fp32 tensor sum
(±λ) + θ0, then θ0's dtype): kept elements are θ0 ± λ rounded once in fp32 (then once to bf16, with
torch's rounding), every other element is θ0 bit for bit — the tensor path adds −0.0 there, which leaves
every value, signed zeros and NaN payloads included, unchanged.
"""

from __future__ import annotations

import numba
import numpy as np

_jit = numba.njit(cache=True, nogil=True, boundscheck=False)


def _sign(signs, j, lam, neg):  # pragma: no cover - compiled
    return lam if (signs[j >> 3] >> (7 - (j & 7))) & 1 else neg


_sign = _jit(_sign)


@_jit
def _bf16_round(x):  # pragma: no cover - compiled
    """fp32 -> bf16 bits, round to nearest even (torch's conversion of every number; NaN is left to the caller)."""
    u = np.int64(np.float32(x).view(np.uint32))
    return np.uint16((u + 0x7FFF + ((u >> 16) & 1)) >> 16)


@_jit
def _bf16_value(bits):  # pragma: no cover - compiled
    return np.uint32(np.int64(bits) << 16).view(np.float32)


@_jit
def kept_f32(theta, pos, j, signs, lam, out):  # pragma: no cover - compiled
    """``out[p] = θ0[p] ± λ`` (fp32, one rounding) for the kept positions ``pos``, the j-th kept element first."""
    neg = -lam
    for i in range(pos.size):
        p = pos[i]
        out[p] = theta[p] + _sign(signs, j + i, lam, neg)


@_jit
def kept_bf16(theta, pos, j, signs, lam, out):  # pragma: no cover - compiled
    """:func:`kept_f32` for bf16 bits: θ0 ± λ in fp32, rounded once to bf16. Returns how many sums are NaN:
    torch's NaN bits differ between its scalar and vector conversions, so the caller redoes those tensors."""
    neg = -lam
    nans = 0
    for i in range(pos.size):
        p = pos[i]
        v = _bf16_value(theta[p]) + _sign(signs, j + i, lam, neg)
        nans += v != v
        out[p] = _bf16_round(v)
    return nans


@_jit
def between_f32(theta, pos, prev, j, signs, lam, out, stop):  # pragma: no cover - compiled
    """Inverted switches (``pos`` are dropped positions): elements after ``prev`` and between the dropped
    ones are kept, ``θ0 ± λ``; dropped ones are θ0. With ``stop`` > 0, also fills the kept run up to it.
    Returns the last dropped position and the next kept element's index."""
    neg = -lam
    for i in range(pos.size):
        p = pos[i]
        for e in range(prev + 1, p):
            out[e] = theta[e] + _sign(signs, j, lam, neg)
            j += 1
        out[p] = theta[p]
        prev = p
    for e in range(prev + 1, stop):
        out[e] = theta[e] + _sign(signs, j, lam, neg)
        j += 1
    return prev, j


@_jit
def between_bf16(theta, pos, prev, j, signs, lam, out, stop):  # pragma: no cover - compiled
    """:func:`between_f32` for bf16 bits; also returns how many sums are NaN (see :func:`kept_bf16`)."""
    neg = -lam
    nans = 0
    for i in range(pos.size):
        p = pos[i]
        for e in range(prev + 1, p):
            v = _bf16_value(theta[e]) + _sign(signs, j, lam, neg)
            nans += v != v
            out[e] = _bf16_round(v)
            j += 1
        out[p] = theta[p]
        prev = p
    for e in range(prev + 1, stop):
        v = _bf16_value(theta[e]) + _sign(signs, j, lam, neg)
        nans += v != v
        out[e] = _bf16_round(v)
        j += 1
    return prev, j, nans
