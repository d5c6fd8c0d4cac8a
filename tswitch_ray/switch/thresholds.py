"""Exact positive/negative discard thresholds of P-Discard (paper 000 Sec. 3.2).

Specified in docs/MATH.md "Thresholds (P-Discard cut)" (paper 000 eq. 3).

For a discard ratio α in [0, 1) and the positive elements P of τ (n = |P|),
two cut rules (docs/MATH.md "Cut rules"):

* ``exact``: d = floor(α·n); if d = 0 the threshold is 0, else t⁺ is the
  d-th smallest value of P (1-based, what ``torch.kthvalue(P, d)`` returns),
  so the values tied with it are dropped;
* ``authors`` (lfy-123/Binary-Task-Switch, merge_vit/merge_vit.py
  ``process_matrix``): keep the K = int(n·(1 − α)) largest values of P and
  every value tied with the smallest of them, and all of P when K = 0. The
  cut value c is the (n − K + 1)-th smallest value of P, and t⁺ is the
  float32 just below c, so that τ > t⁺ ⇔ τ ≥ c; d = n − K (0 when K = 0).

Likewise t⁻ over the magnitudes of the negative elements. Zeros belong to
neither side, and an element is kept when τ > t⁺ or −τ > t⁻ whatever the
rule (see :mod:`.binarize`): the rule only moves the thresholds.

Scope "tensor" (:func:`tensor_thresholds`) takes P and N per tensor, as the
authors' code does. Scope "model" (the paper text's reading) takes them over
the whole task vector; it is computed from per-shard pieces that add up:

    hist  = Σ_shards signed_histograms(τ_s)            # pass 1
    req   = refine_request(hist, alphas)               # driver, tiny
    fine  = Σ_shards signed_fine_histograms(τ_s, req)  # pass 2
    ths   = resolve_thresholds(hist, fine, alphas)     # driver, tiny

and the result equals :func:`tensor_thresholds` on the concatenation of all
shards. Scope "model" has cut ``exact`` only: the authors' code cuts per
tensor and defines no model-wide rule (:func:`resolve_cut`). Selection is by
radix histograms (:mod:`.select`); no per-α sort.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from numbers import Real
from typing import Literal, overload

import numpy as np
import torch

from tswitch_ray.errors import ConfigError, ZooError
from tswitch_ray.switch import select

# Keys with the sign bit set are negative values; 0x8000 is the key offset.
_NEG_KEY = 0x8000
_HALF = select.N_BUCKETS // 2
# Buckets of +inf/NaN (exponent all ones) among non-negative magnitude keys.
_NONFINITE_KEY = 0x7F80
_INT32_MIN = -(2**31)  # bit pattern of -0.0


def _validate_alpha(alpha: object) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, Real):
        raise ConfigError(
            f"discard ratio alpha={alpha!r} is not a number; give a value in [0, 1) such as 0.6 "
            "(the fraction of the smallest-magnitude positive and negative entries to drop)."
        )
    value = float(alpha)
    if not (0.0 <= value < 1.0):
        raise ConfigError(
            f"discard ratio alpha={alpha!r} is outside [0, 1); it is the fraction of the "
            "smallest-magnitude positive and negative task-vector entries to drop, so use e.g. "
            "0.6 (the authors' ViT setting). alpha=1 would drop everything."
        )
    return value


def _alpha_list(alphas: float | Iterable[float]) -> list[float]:
    if isinstance(alphas, Real) and not isinstance(alphas, bool):
        alphas = [alphas]  # a lone α is accepted for convenience
    return [_validate_alpha(a) for a in alphas]  # type: ignore[union-attr]


def discard_count(n: int, alpha: float) -> int:
    """d = floor(α·n), the number of smallest-magnitude entries P-Discard drops.

    docs/MATH.md "Thresholds (P-Discard cut)" (paper 000 eq. 3: the α-quantile).
    The product is taken in float64 exactly as ``math.floor(alpha * n)`` in
    Python, *including* its rounding: 0.29 * 100 = 28.999999999999996 in
    float64, so d = 28, not 29.
    We match that on purpose so that every implementation that writes the
    obvious Python expression (tests, reference scripts) agrees bit for bit.
    Raises ``ConfigError`` for α outside [0, 1).
    """
    a = _validate_alpha(alpha)
    n = int(n)
    if n < 0:
        raise ValueError(f"element count must be non-negative, got {n}")
    return int(math.floor(a * n))


Cut = Literal["authors", "exact"]
CUTS: tuple[str, ...] = ("authors", "exact")
"""The cut rules of docs/MATH.md "Cut rules": ``authors`` (ties at the cut kept) and ``exact`` (dropped)."""


def _validate_cut(cut: object) -> str:
    if cut not in CUTS:
        raise ConfigError(
            f"cut rule {cut!r} is not one of {', '.join(CUTS)}: 'authors' keeps the int(n·(1−α)) largest "
            "values of each sign plus every value tied with the cut (the authors' code, the default for "
            "scope 'tensor'); 'exact' drops exactly the floor(α·n) smallest and the ties at the cut."
        )
    return str(cut)


def resolve_cut(cut: str | None, scope: str) -> str:
    """The cut rule of a build or merge: ``cut`` checked against ``scope``, or the scope's default.

    docs/MATH.md "Cut rules": ``authors`` for scope "tensor", ``exact`` for
    scope "model". ``authors`` with scope "model" is a ``ConfigError``: the
    authors' code (merge_vit.py ``process_matrix``) cuts each tensor on its
    own and has no model-wide rule to follow.
    """
    if cut is None:
        return "authors" if scope == "tensor" else "exact"
    cut = _validate_cut(cut)
    if cut == "authors" and scope == "model":
        raise ConfigError(
            "cut 'authors' needs scope 'tensor': the authors' code (lfy-123/Binary-Task-Switch, "
            "merge_vit.py process_matrix) keeps the int(n·(1−α)) largest values of each sign of each "
            "tensor plus the ties at the cut, and has no model-wide cut. Use scope 'model' with cut "
            "'exact' (its default: the paper text's α-quantile over the whole task vector), or scope "
            "'tensor' with cut 'authors'."
        )
    return cut


def keep_count(n: int, alpha: float) -> int:
    """K = int(n·(1 − α)): how many largest values of a sign the ``authors`` cut keeps (before ties).

    docs/MATH.md "Cut rules" (cut ``authors``), transcribing
    lfy-123/Binary-Task-Switch merge_vit/merge_vit.py ``process_matrix``:
    ``num_elements_to_keep = int(len(positive_non_zero) * (1 - k))``, in
    float64 with its rounding, as Python computes it: n = 10, α = 0.8 gives
    int(1.9999999999999996) = 1, not 2, and n = 10, α = 0.9 gives K = 0
    (so the authors keep all ten, see :func:`cut_rank`). Raises
    ``ConfigError`` for α outside [0, 1).
    """
    a = _validate_alpha(alpha)
    n = int(n)
    if n < 0:
        raise ValueError(f"element count must be non-negative, got {n}")
    return int(n * (1.0 - a))


def cut_rank(n: int, alpha: float, cut: str = "exact") -> tuple[int, int]:
    """(d, r) of one sign with n elements: the nominal drop count d and the 1-based rank r of the value
    that sets the threshold (r = 0: no selection, the threshold is 0 and the whole sign is kept).

    docs/MATH.md "Thresholds (P-Discard cut)" and "Cut rules". ``exact``:
    d = r = floor(α·n). ``authors``: K = int(n·(1 − α)); K = 0 keeps every
    element of the sign, as the authors' code does (``process_matrix`` then
    leaves the sign untouched, only logging "Too few positive elements"), and
    so does K = n; else d = n − K and r = d + 1, the rank of the K-th largest.
    """
    if _validate_cut(cut) == "exact":
        d = discard_count(n, alpha)
        return d, d
    k = keep_count(n, alpha)
    if k == 0 or k >= n:
        return 0, 0
    return n - k, n - k + 1


def below(value: float) -> float:
    """The largest float32 below the positive float32 ``value`` (0.0 below the smallest subnormal).

    For float32 x, x > below(c) ⇔ x ≥ c: the strict comparison of
    :func:`.binarize.binarize` then keeps the ties at the ``authors`` cut c
    (docs/MATH.md "Cut rules").
    """
    bits = np.array([value], dtype=np.float32).view(np.uint32)
    if not (0 < int(bits[0]) < 0x7F800000):
        raise ValueError(f"expected a positive finite float32 cut value, got {value!r}")
    return float((bits - np.uint32(1)).view(np.float32)[0])


@dataclass(frozen=True)
class Thresholds:
    """Discard thresholds of one α: keep τ > t_pos or −τ > t_neg.

    n_pos/n_neg count strictly positive/negative elements, d_pos/d_neg the
    nominal drop counts of :func:`cut_rank`. Cut ``exact``: t_pos/t_neg are
    the values of ranks d (0.0 when d = 0). Cut ``authors``: they are the
    float32 just below the K-th largest value (0.0 when the whole sign is kept).
    """

    alpha: float
    t_pos: float
    t_neg: float
    n_pos: int
    n_neg: int
    d_pos: int
    d_neg: int
    cut: str = "exact"


@dataclass(frozen=True, eq=False)
class SignedHistograms:
    """Pass-1 statistics of a task vector (or shard): coarse radix histograms.

    ``coarse_pos`` counts the high 16 bits of the positive values,
    ``coarse_neg`` those of the magnitudes of the negative values (int64,
    shape (65 536,), zeros excluded from both). Shards add with ``+``.
    """

    coarse_pos: np.ndarray
    coarse_neg: np.ndarray
    n_pos: int
    n_neg: int

    def __add__(self, other: SignedHistograms) -> SignedHistograms:
        if not isinstance(other, SignedHistograms):
            return NotImplemented
        return SignedHistograms(
            self.coarse_pos + other.coarse_pos,
            self.coarse_neg + other.coarse_neg,
            self.n_pos + other.n_pos,
            self.n_neg + other.n_neg,
        )

    @classmethod
    def empty(cls) -> SignedHistograms:
        """The neutral element, handy as the start of a sum over shards."""
        zeros = np.zeros(select.N_BUCKETS, dtype=np.int64)
        return cls(zeros, zeros.copy(), 0, 0)

    def __reduce__(self) -> tuple:
        # Dense in memory, sparse on the wire: a shard's histogram fills a few
        # thousand of the 65 536 buckets, so Ray moves ~30 KB instead of 1 MB
        # per task and shard (and nothing lands in the object store).
        return (_histograms_from_sparse, (*_sparse(self.coarse_pos), *_sparse(self.coarse_neg), self.n_pos, self.n_neg))


@dataclass(frozen=True)
class RefineRequest:
    """Which coarse buckets (per sign) hold the wanted ranks: the pass-2 work order."""

    pos: tuple[int, ...] = ()
    neg: tuple[int, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.pos or self.neg)


@dataclass(frozen=True, eq=False)
class SignedFine:
    """Pass-2 statistics: low-16-bit histograms of the requested buckets, per sign.

    Shards add with ``+``.
    """

    pos: dict[int, np.ndarray] = field(default_factory=dict)
    neg: dict[int, np.ndarray] = field(default_factory=dict)

    def __add__(self, other: SignedFine) -> SignedFine:
        if not isinstance(other, SignedFine):
            return NotImplemented
        return SignedFine(select.add_fine(self.pos, other.pos), select.add_fine(self.neg, other.neg))

    def __reduce__(self) -> tuple:
        # Sparse on the wire, as SignedHistograms: 512 KB per dense bucket otherwise.
        return (_fine_from_sparse, ({b: _sparse(h) for b, h in self.pos.items()},
                                    {b: _sparse(h) for b, h in self.neg.items()}))


def _sparse(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    idx = np.flatnonzero(counts).astype(np.int32)
    return idx, counts[idx]


def _dense(idx: np.ndarray, counts: np.ndarray) -> np.ndarray:
    out = np.zeros(select.N_BUCKETS, dtype=np.int64)
    out[idx] = counts
    return out


def _histograms_from_sparse(pi: np.ndarray, pc: np.ndarray, ni: np.ndarray, nc: np.ndarray, n_pos: int,
                            n_neg: int) -> SignedHistograms:
    return SignedHistograms(_dense(pi, pc), _dense(ni, nc), n_pos, n_neg)


def _fine_from_sparse(pos: dict, neg: dict) -> SignedFine:
    return SignedFine({b: _dense(*v) for b, v in pos.items()}, {b: _dense(*v) for b, v in neg.items()})


def _signed_keys(tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    bits = select.float_bits(tau)
    return bits, select.high_keys(bits, signed=True)


def _check_finite(counts: np.ndarray, name: str | None) -> None:
    """Raise ``ZooError`` if the signed coarse ``counts`` hold ±inf or NaN buckets."""
    nonfinite = int(counts[_NONFINITE_KEY:_HALF].sum() + counts[_NEG_KEY + _NONFINITE_KEY :].sum())
    if nonfinite:
        raise ZooError(
            f"task vector of tensor {name or '<unnamed tensor>'!r} holds {nonfinite} non-finite "
            "value(s) (NaN or ±inf), so its discard thresholds are undefined; a checkpoint of "
            "this tensor is corrupt or θt − θ0 overflowed float32. Check the task and base "
            "files for this tensor."
        )


def _zero_counts(bits: torch.Tensor, counts: np.ndarray) -> tuple[int, int]:
    """Exact +0.0 and −0.0 counts of the float32 bit patterns ``bits``, given their signed coarse ``counts``.

    ±0.0 share buckets 0 and 32 768 with the tiniest subnormals, so they are
    counted out, each only when its bucket is not empty (−0.0 is rare). The
    pattern of +0.0 is the integer 0, so on the CPU NumPy's integer
    ``count_nonzero`` (no temporary, ~0.1 ns per element) counts it.
    """
    cpu = bits.device.type == "cpu"
    b = bits.numpy() if cpu else bits
    pos_zero = neg_zero = 0
    if counts[0]:
        pos_zero = b.size - int(np.count_nonzero(b)) if cpu else int(torch.count_nonzero(b == 0))
    if counts[_HALF]:
        neg_zero = int(np.count_nonzero(b == _INT32_MIN)) if cpu else int(torch.count_nonzero(b == _INT32_MIN))
    return pos_zero, neg_zero


def _signed_histograms(bits: torch.Tensor, keys: torch.Tensor, name: str | None) -> SignedHistograms:
    counts = select.histogram_of_keys(keys)
    _check_finite(counts, name)
    pos_zero, neg_zero = _zero_counts(bits, counts)
    pos = np.zeros(select.N_BUCKETS, dtype=np.int64)
    neg = np.zeros(select.N_BUCKETS, dtype=np.int64)
    pos[:_HALF] = counts[:_HALF]
    neg[:_HALF] = counts[_HALF:]
    pos[0] -= pos_zero
    neg[0] -= neg_zero
    return SignedHistograms(pos, neg, int(pos.sum()), int(neg.sum()))


def signed_histograms(tau: torch.Tensor, name: str | None = None) -> SignedHistograms:
    """Pass 1 over a task vector (shard) of any shape: coarse histograms per sign.

    Computed on the tensor's device from its float32 values. ``name`` only
    labels errors: a non-finite value raises ``ZooError``.
    """
    bits, keys = _signed_keys(tau)
    return _signed_histograms(bits, keys, name)


def _ranks(n: int, alphas: Sequence[float], cut: str) -> list[tuple[int, int]]:
    return [cut_rank(n, a, cut) for a in alphas]


def refine_request(hist: SignedHistograms, alphas: float | Iterable[float], cut: str = "exact") -> RefineRequest:
    """The coarse buckets, per sign, that hold the threshold ranks (:func:`cut_rank`) of all α."""
    alphas = _alpha_list(alphas)

    def buckets(coarse: np.ndarray, n: int) -> tuple[int, ...]:
        ranks = [r for _, r in _ranks(n, alphas, cut) if r > 0]
        return tuple(sorted({b for b, _ in select.refine_buckets(coarse, ranks)}))

    return RefineRequest(buckets(hist.coarse_pos, hist.n_pos), buckets(hist.coarse_neg, hist.n_neg))


def _signed_fine(bits: torch.Tensor, keys: torch.Tensor, request: RefineRequest) -> SignedFine:
    if not request:
        return SignedFine()
    wanted = list(request.pos) + [b + _NEG_KEY for b in request.neg]
    fines = select.fine_histograms_of_keys(bits, keys, wanted)
    pos = {b: fines[b] for b in request.pos}
    neg = {b: fines[b + _NEG_KEY] for b in request.neg}
    # Low bits 0 of bucket 0 are exactly ±0.0, which belong to neither side.
    if 0 in pos:
        pos[0][0] = 0
    if 0 in neg:
        neg[0][0] = 0
    return SignedFine(pos, neg)


def signed_fine_histograms(tau: torch.Tensor, request: RefineRequest) -> SignedFine:
    """Pass 2 over a task vector (shard): low-16-bit histograms of the requested buckets."""
    bits, keys = _signed_keys(tau)
    return _signed_fine(bits, keys, request)


@overload
def fine_histograms(tau: torch.Tensor, request: RefineRequest) -> SignedFine: ...
@overload
def fine_histograms(tau: torch.Tensor, request: Iterable[int]) -> dict[int, np.ndarray]: ...
def fine_histograms(tau, request):  # type: ignore[no-untyped-def]
    """Pass 2, by what is asked: signed (a ``RefineRequest``) or over |τ| (bucket ids).

    The package-level name of ARCHITECTURE.md; dispatches to
    :func:`signed_fine_histograms` or :func:`select.fine_histograms`.
    """
    if isinstance(request, RefineRequest):
        return signed_fine_histograms(tau, request)
    return select.fine_histograms(tau, request)


def resolve_thresholds(
    hist: SignedHistograms, fine: SignedFine, alphas: float | Iterable[float], cut: str = "exact"
) -> list[Thresholds]:
    """Exact thresholds of every α (in order) from summed pass-1 and pass-2 statistics.

    docs/MATH.md "Thresholds (P-Discard cut)" (paper 000 eq. 3) and "Cut
    rules": ``exact``, t⁺/t⁻ = the d-th smallest positive value / negative
    magnitude, 0 when d = 0; ``authors``, the float32 just below the K-th
    largest (:func:`below`), 0 when the whole sign is kept.
    """
    alphas = _alpha_list(alphas)
    cut = _validate_cut(cut)

    def side(coarse: np.ndarray, fines: dict[int, np.ndarray], n: int) -> tuple[list[int], list[float]]:
        ranks = _ranks(n, alphas, cut)
        values = iter(select.resolve(coarse, fines, [r for _, r in ranks if r > 0]))
        ts = [next(values) if r > 0 else 0.0 for _, r in ranks]
        if cut == "authors":
            ts = [below(t) if t > 0.0 else 0.0 for t in ts]
        return [d for d, _ in ranks], ts

    d_pos, t_pos = side(hist.coarse_pos, fine.pos, hist.n_pos)
    d_neg, t_neg = side(hist.coarse_neg, fine.neg, hist.n_neg)
    return [
        Thresholds(a, tp, tn, hist.n_pos, hist.n_neg, dp, dn, cut)
        for a, tp, tn, dp, dn in zip(alphas, t_pos, t_neg, d_pos, d_neg)
    ]


def tensor_thresholds(
    tau: torch.Tensor, alphas: float | Iterable[float], name: str | None = None, cut: str = "exact"
) -> list[Thresholds]:
    """Scope "tensor": exact thresholds of one task-vector tensor for all α at once, by the rule ``cut``.

    docs/MATH.md "Thresholds (P-Discard cut)" (paper 000 eq. 3) and "Cut
    rules" (``authors``: lfy-123/Binary-Task-Switch merge_vit.py
    ``process_matrix``; ``exact``: the floor(α·n)-th smallest).

    Two passes over the data whatever the number of α (pass 2 is skipped when
    no α needs a selection). ``name`` only labels errors.
    """
    alphas = _alpha_list(alphas)
    bits, keys = _signed_keys(tau)
    hist = _signed_histograms(bits, keys, name)
    fine = _signed_fine(bits, keys, refine_request(hist, alphas, cut))
    return resolve_thresholds(hist, fine, alphas, cut)


# --- one pass instead of two: a sampled window (Floyd & Rivest 1975) --------------
#
# Pass 2 above exists only because the bucket holding a rank is unknown until
# pass 1 has seen every shard. A small sample predicts it: the sample's
# α-quantile lies, with overwhelming probability, within a few binomial
# standard deviations of the true one (Floyd & Rivest, "Expected time bounds
# for selection", CACM 18(3), 1975). So one full pass gathers the coarse
# histograms *and* the exact bit patterns of the elements in a window of
# buckets around every predicted rank; the exact coarse histogram then says
# which bucket really holds each rank, and when it lies in the window (checked,
# not assumed) the threshold is resolved without a second pass. When it does
# not, the caller runs the ordinary pass 2 for that task: still exact.

SAMPLE_Z = 8.0
"""Half-width of the window in binomial standard deviations of the sample rank."""
SAMPLE_SLACK = 0.002
"""Extra half-width of the window as a fraction of the sample (sampling is not uniform)."""


def window_request(sample: SignedHistograms, alphas: float | Iterable[float], z: float = SAMPLE_Z,
                   slack: float = SAMPLE_SLACK) -> RefineRequest:
    """Coarse buckets, per sign, that hold the α-quantiles of the full data with high probability.

    ``sample`` holds the coarse histograms of a sample of the task vector. For
    a sample of s elements of one sign the rank of the true α-quantile in the
    sample is ≈ α·s with standard deviation σ = √(s·α·(1 − α)); the window is
    every bucket between the sample ranks α·s ∓ (z·σ + slack·s). α = 0 needs
    no window (its threshold is 0). docs/MATH.md "Thresholds (P-Discard cut)"
    (scope "model", Floyd & Rivest 1975).
    """
    alphas = [a for a in _alpha_list(alphas) if a > 0]

    def side(coarse: np.ndarray, s: int) -> tuple[int, ...]:
        if s == 0 or not alphas:
            return ()
        cum = np.cumsum(coarse)
        out: set[int] = set()
        for a in alphas:
            half = z * math.sqrt(s * a * (1.0 - a)) + slack * s
            lo = min(max(1, math.floor(a * s - half)), s)
            hi = min(max(1, math.ceil(a * s + half)), s)
            b_lo, b_hi = np.searchsorted(cum, [lo, hi], side="left")
            out.update(range(int(b_lo), int(b_hi) + 1))
        return tuple(sorted(out))

    return RefineRequest(side(sample.coarse_pos, sample.n_pos), side(sample.coarse_neg, sample.n_neg))


def covers(window: RefineRequest, need: RefineRequest) -> bool:
    """True when every bucket of ``need`` (per sign) was gathered in ``window``."""
    return set(need.pos) <= set(window.pos) and set(need.neg) <= set(window.neg)


@dataclass(frozen=True, eq=False)
class PatternCounts:
    """Counts of distinct float32 bit patterns: sorted unique ``patterns`` (int32), ``counts`` (int64).

    The in-window elements of a task vector (shard); shards add with ``+``.
    """

    patterns: np.ndarray
    counts: np.ndarray

    @classmethod
    def of(cls, patterns: np.ndarray) -> PatternCounts:
        p, c = np.unique(np.asarray(patterns, dtype=np.int32), return_counts=True)
        return cls(p, c.astype(np.int64, copy=False))

    def __add__(self, other: PatternCounts) -> PatternCounts:
        if not isinstance(other, PatternCounts):
            return NotImplemented
        p, inv = np.unique(np.concatenate([self.patterns, other.patterns]), return_inverse=True)
        c = np.zeros(p.size, dtype=np.int64)
        np.add.at(c, inv.reshape(-1), np.concatenate([self.counts, other.counts]))
        return PatternCounts(p, c)

    def fine(self, request: RefineRequest) -> SignedFine:
        """Dense low-16-bit histograms of the requested buckets, as pass 2 would return them."""
        keys = (self.patterns >> 16) & select._LOW_MASK
        low = self.patterns & select._LOW_MASK

        def dense(key: int) -> np.ndarray:
            out = np.zeros(select.N_BUCKETS, dtype=np.int64)
            sel = keys == key
            out[low[sel]] = self.counts[sel]  # patterns are unique, so are their low bits in one bucket
            return out

        pos = {b: dense(b) for b in request.pos}
        neg = {b: dense(b + _NEG_KEY) for b in request.neg}
        # Low bits 0 of bucket 0 are exactly ±0.0, which belong to neither side.
        if 0 in pos:
            pos[0][0] = 0
        if 0 in neg:
            neg[0][0] = 0
        return SignedFine(pos, neg)


class WindowPass:
    """One full pass of scope "model" for one task: coarse histograms plus the in-window elements.

    ``add`` every tensor (shard) of the task vector, then ``result``. The
    coarse counts are accumulated in place (no per-tensor histogram
    objects); the window is a 65 536-entry lookup table over the signed
    coarse key. On the CPU one compiled sweep does both; on CUDA a bincount
    and a gather through the table.
    """

    def __init__(self, window: RefineRequest) -> None:
        self.window = window
        lut = np.zeros(select.N_BUCKETS, dtype=bool)
        lut[list(window.pos)] = True
        lut[[b + _NEG_KEY for b in window.neg]] = True
        self._lut_np = lut.view(np.uint8)
        self._lut = torch.from_numpy(lut)
        self._scratch = np.empty(0, dtype=np.int32)
        self._counts = np.zeros(select.N_BUCKETS, dtype=np.int64)
        self._zeros = [0, 0]
        self._picked: list[np.ndarray] = []
        self._sparse: PatternCounts | None = None
        self._picked_n = 0

    def add(self, tau: torch.Tensor, name: str | None = None) -> None:
        """Count one tensor (any shape) of the task vector; ``name`` labels errors."""
        if tau.device.type == "cpu":
            self._add_cpu(tau, name)
            return
        bits, keys = _signed_keys(tau)
        counts = select.histogram_of_keys(keys)
        _check_finite(counts, name)
        pz, nz = _zero_counts(bits, counts)
        self._counts += counts
        self._zeros[0] += pz
        self._zeros[1] += nz
        if self.window:
            self._hold(bits[self._lut.to(keys.device).index_select(0, keys)].cpu().numpy())

    def _add_cpu(self, tau: torch.Tensor, name: str | None) -> None:
        # One compiled sweep (histogram, ±0.0 counts, in-window patterns) instead
        # of keys, bincount, lookup and flatnonzero temporaries: same numbers.
        from tswitch_ray.switch import _kernels  # numba compiles on first use, not at import

        bits = select.float_bits(tau).numpy()
        if self._scratch.size < bits.size:
            self._scratch = np.empty(bits.size, dtype=np.int32)
        # Counted straight into the running totals: they held no non-finite
        # bucket before this tensor (that would have raised), so any now are its own.
        picked_n, pz, nz = _kernels.scan_signed_keys(bits, self._lut_np, self._counts, self._scratch)
        _check_finite(self._counts, name)
        self._zeros[0] += pz
        self._zeros[1] += nz
        if picked_n:
            self._hold(self._scratch[:picked_n].copy())

    def _hold(self, picked: np.ndarray) -> None:
        """Keep one tensor's in-window patterns until ``result``."""
        if picked.size:
            self._picked.append(picked)
            self._picked_n += picked.size
            if self._picked_n > 4 << 20:  # bound the memory held between tensors
                self._compact()

    def _compact(self) -> None:
        if self._picked:
            new = PatternCounts.of(np.concatenate(self._picked))
            self._sparse = new if self._sparse is None else self._sparse + new
            self._picked, self._picked_n = [], 0

    def result(self) -> tuple[SignedHistograms, PatternCounts]:
        """Coarse histograms (zeros excluded) and the counted in-window bit patterns."""
        self._compact()
        pos = np.zeros(select.N_BUCKETS, dtype=np.int64)
        neg = np.zeros(select.N_BUCKETS, dtype=np.int64)
        pos[:_HALF] = self._counts[:_HALF]
        neg[:_HALF] = self._counts[_HALF:]
        pos[0] -= self._zeros[0]
        neg[0] -= self._zeros[1]
        sparse = self._sparse or PatternCounts(np.zeros(0, np.int32), np.zeros(0, np.int64))
        return SignedHistograms(pos, neg, int(pos.sum()), int(neg.sum())), sparse
