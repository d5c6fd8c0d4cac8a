"""Global statistics shared by several methods: exact model-wide selections and sums.

No formula lives here: these adapt the radix selection of ``tswitch_ray.switch``
to the multi-round protocol. Two rules keep a sharded run identical to
:func:`merge_in_memory`:

* per-tensor statistics depend only on that tensor (integer histograms, or
  float64 sums from :func:`sum64`);
* the driver combines floats with ``math.fsum`` (exactly rounded, hence
  independent of the order) and integer histograms exactly.

Histograms travel sparse (non-empty buckets only): a dense 65 536-bucket int64
histogram is 512 KiB per task per tensor, the magnitudes of one tensor fill a
few thousand buckets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tswitch_ray.switch import select
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

Sparse = tuple[np.ndarray, np.ndarray]  # (bucket indices int32, counts int64)


def to_sparse(hist: np.ndarray) -> Sparse:
    hist = np.asarray(hist)
    idx = np.flatnonzero(hist).astype(np.int32)
    return idx, hist[idx].astype(np.int64)


def to_dense(parts: Sequence[Sparse], size: int = select.N_BUCKETS) -> np.ndarray:
    out = np.zeros(size, dtype=np.int64)
    for idx, counts in parts:
        np.add.at(out, idx, counts)
    return out


def fine_to_sparse(fines: dict[int, np.ndarray]) -> dict[int, Sparse]:
    return {int(b): to_sparse(h) for b, h in fines.items()}


def fine_to_dense(parts: Sequence[dict[int, Sparse]]) -> dict[int, np.ndarray]:
    buckets = sorted({b for p in parts for b in p})
    return {b: to_dense([p[b] for p in parts if b in p]) for b in buckets}


def exact_sum(values: Sequence[float]) -> float:
    """Exactly rounded float sum: the same whatever the order of ``values``."""
    return math.fsum(float(v) for v in values)


# ------------------------------------------------------------ k-th smallest |τ| over the model


@dataclass(frozen=True)
class MagnitudeRequest:
    """Per task: the wanted 1-based rank of |τ| over the whole model, and its coarse bucket."""

    ranks: tuple[int, ...]  # 0 = nothing to select for this task
    buckets: tuple[int, ...]  # -1 where rank is 0
    coarse: tuple[Sparse, ...]  # summed coarse histograms, kept sparse for round 2


def magnitude_coarse_stats(taus: Sequence[torch.Tensor]) -> list[tuple[Sparse, int]]:
    """Round 1, one tensor: sparse coarse histogram of |τt| (zeros included) and numel, per task."""
    return [(to_sparse(select.coarse_histogram(t)), int(t.numel())) for t in taus]


def magnitude_request(stats: Sequence[list[tuple[Sparse, int]]], rank_of: callable) -> MagnitudeRequest:
    """Driver after round 1: ``rank_of(d)`` maps the model's element count to the wanted rank."""
    n_tasks = len(stats[0]) if stats else 0
    ranks, buckets, coarse = [], [], []
    for t in range(n_tasks):
        dense = to_dense([s[t][0] for s in stats])
        d = sum(s[t][1] for s in stats)
        r = int(rank_of(d))
        ranks.append(r)
        buckets.append(select.refine_buckets(dense, [r])[0][0] if r > 0 else -1)
        coarse.append(to_sparse(dense))
    return MagnitudeRequest(tuple(ranks), tuple(buckets), tuple(coarse))


def magnitude_fine_stats(taus: Sequence[torch.Tensor], req: MagnitudeRequest) -> list[dict[int, Sparse]]:
    """Round 2, one tensor: low-bit histograms of the requested bucket, per task."""
    return [
        fine_to_sparse(select.fine_histograms(t, [b])) if b >= 0 else {}
        for t, b in zip(taus, req.buckets, strict=True)
    ]


def magnitude_resolve(stats: Sequence[list[dict[int, Sparse]]], req: MagnitudeRequest) -> list[float | None]:
    """Driver after round 2: the exact value of each task's rank (None where the rank is 0)."""
    out: list[float | None] = []
    for t, r in enumerate(req.ranks):
        if r <= 0:
            out.append(None)
            continue
        fines = fine_to_dense([s[t] for s in stats])
        out.append(select.resolve(to_dense([req.coarse[t]]), fines, [r])[0])
    return out


# ------------------------------------------------------------ P-Discard thresholds over the model


@dataclass(frozen=True)
class SignedRequest:
    """Per task: the pass-2 work order and the summed pass-1 histograms (sparse)."""

    requests: tuple[RefineRequest, ...]
    hists: tuple[tuple[Sparse, Sparse, int, int], ...]

    def hist(self, t: int) -> SignedHistograms:
        pos, neg, n_pos, n_neg = self.hists[t]
        return SignedHistograms(to_dense([pos]), to_dense([neg]), n_pos, n_neg)


def signed_coarse_stats(name: str, taus: Sequence[torch.Tensor]) -> list[tuple[Sparse, Sparse, int, int]]:
    """Round 1, one tensor: the pass-1 signed histograms of every task, sparse."""
    out = []
    for tau in taus:
        h = signed_histograms(tau, name)
        out.append((to_sparse(h.coarse_pos), to_sparse(h.coarse_neg), h.n_pos, h.n_neg))
    return out


def signed_request(stats: Sequence[list[tuple[Sparse, Sparse, int, int]]], alpha: float) -> SignedRequest:
    n_tasks = len(stats[0]) if stats else 0
    reqs, hists = [], []
    for t in range(n_tasks):
        h = SignedHistograms(
            to_dense([s[t][0] for s in stats]),
            to_dense([s[t][1] for s in stats]),
            sum(s[t][2] for s in stats),
            sum(s[t][3] for s in stats),
        )
        reqs.append(refine_request(h, [alpha]))
        hists.append((to_sparse(h.coarse_pos), to_sparse(h.coarse_neg), h.n_pos, h.n_neg))
    return SignedRequest(tuple(reqs), tuple(hists))


def signed_fine_stats(taus: Sequence[torch.Tensor], req: SignedRequest) -> list[tuple[dict, dict]]:
    """Round 2, one tensor: pass-2 fine histograms of every task, sparse."""
    out = []
    for tau, r in zip(taus, req.requests, strict=True):
        f = signed_fine_histograms(tau, r)
        out.append((fine_to_sparse(f.pos), fine_to_sparse(f.neg)))
    return out


def signed_resolve(stats: Sequence[list[tuple[dict, dict]]], req: SignedRequest, alpha: float) -> list[Thresholds]:
    """Driver after round 2: the model-scope thresholds of every task."""
    out = []
    for t in range(len(req.requests)):
        fine = SignedFine(fine_to_dense([s[t][0] for s in stats]), fine_to_dense([s[t][1] for s in stats]))
        out.append(resolve_thresholds(req.hist(t), fine, [alpha])[0])
    return out
