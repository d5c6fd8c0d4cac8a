"""Compiled (numba) kernels of θ0 + λ·M⊙S (docs/MATH.md "Reconstruction", paper 000 eq. 7) from a switch's
coded positions and packed signs, one pass over θ0.

They produce exactly the bytes of :func:`tswitch_ray.switch.reconstruct.reconstruct` (the fp32 tensor sum
(±λ) + θ0, then θ0's dtype): kept elements are θ0 ± λ rounded once in fp32 (then once to bf16, with
torch's rounding), every other element is θ0 bit for bit — the tensor path adds −0.0 there, which leaves
every value, signed zeros and NaN payloads included, unchanged.
"""

from __future__ import annotations

import numba
import numpy as np

_jit = numba.njit(cache=True, nogil=True, boundscheck=False)


@_jit
def apply_f32(theta, pos, signs, inverted, lam, out):  # pragma: no cover - compiled
    """``out`` = θ0 + λ·M⊙S for flat float32 θ0 (eq. 7), exactly as the fp32 tensor sum: kept elements are
    θ0 ± λ rounded once to fp32, the others θ0 bit for bit. ``out`` may be ``theta``."""
    neg = -lam
    numel = theta.size
    if not inverted:
        start = 0
        for j in range(pos.size):
            p = pos[j]
            for e in range(start, p):
                out[e] = theta[e]
            s = lam if (signs[j >> 3] >> (7 - (j & 7))) & 1 else neg
            out[p] = theta[p] + s
            start = p + 1
        for e in range(start, numel):
            out[e] = theta[e]
        return
    j = 0
    c = 0
    for e in range(numel):
        if c < pos.size and pos[c] == e:
            out[e] = theta[e]
            c += 1
            continue
        s = lam if (signs[j >> 3] >> (7 - (j & 7))) & 1 else neg
        out[e] = theta[e] + s
        j += 1


@_jit
def _bf16_round(x):  # pragma: no cover - compiled
    """fp32 -> bf16 bits, round to nearest even (torch's conversion of every number; NaN is left to the caller)."""
    u = np.int64(np.float32(x).view(np.uint32))
    return np.uint16((u + 0x7FFF + ((u >> 16) & 1)) >> 16)


@_jit
def _bf16_value(bits):  # pragma: no cover - compiled
    return np.uint32(np.int64(bits) << 16).view(np.float32)


@_jit
def apply_bf16(theta, pos, signs, inverted, lam, out):  # pragma: no cover - compiled
    """:func:`apply_f32` for bfloat16 θ0 given as its uint16 bits: θ0 ± λ in fp32, rounded once to bf16.

    Returns the number of kept elements whose sum is NaN: torch's NaN bits
    differ between its scalar and vector conversions, so the caller redoes a
    tensor with any through torch rather than guess them.
    """
    nans = 0
    neg = -lam
    numel = theta.size
    if not inverted:
        start = 0
        for j in range(pos.size):
            p = pos[j]
            for e in range(start, p):
                out[e] = theta[e]
            s = lam if (signs[j >> 3] >> (7 - (j & 7))) & 1 else neg
            v = _bf16_value(theta[p]) + s
            nans += v != v
            out[p] = _bf16_round(v)
            start = p + 1
        for e in range(start, numel):
            out[e] = theta[e]
        return nans
    j = 0
    c = 0
    for e in range(numel):
        if c < pos.size and pos[c] == e:
            out[e] = theta[e]
            c += 1
            continue
        s = lam if (signs[j >> 3] >> (7 - (j & 7))) & 1 else neg
        v = _bf16_value(theta[e]) + s
        nans += v != v
        out[e] = _bf16_round(v)
        j += 1
    return nans
