"""Exact radix selection (tswitch_ray.switch.select) against np.sort / torch.kthvalue."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tswitch_ray.switch import select
from tswitch_ray.switch.select import (
    N_BUCKETS,
    add_fine,
    coarse_histogram,
    fine_histograms,
    kth_smallest,
    refine_buckets,
    resolve,
)

# Non-negative float32 values, subnormals and exact zeros included.
_mag = st.floats(min_value=0.0, allow_nan=False, allow_infinity=False, width=32)
# A small pool makes ties (and ties straddling every rank) very likely.
_pool = st.sampled_from([0.0, 1e-45, 1e-40, 1e-8, 0.5, 0.5000001, 1.0, 3.0, 1e30])


def _ref_kth(values: np.ndarray, ranks: list[int]) -> list[float]:
    ordered = np.sort(values.astype(np.float32).ravel())
    return [float(ordered[r - 1]) for r in ranks]


@st.composite
def _magnitudes_and_ranks(draw):
    elems = draw(st.lists(st.one_of(_mag, _pool), min_size=1, max_size=300))
    values = np.array(elems, dtype=np.float32)
    ranks = draw(st.lists(st.integers(1, values.size), min_size=1, max_size=8))
    return values, ranks


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_magnitudes_and_ranks())
def test_kth_smallest_matches_sort_and_kthvalue(case):
    values, ranks = case
    got = kth_smallest(torch.from_numpy(values), ranks)
    assert got == _ref_kth(values, ranks)
    t = torch.from_numpy(values)
    assert got == [torch.kthvalue(t, r).values.item() for r in ranks]


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    st.lists(st.integers(1, 12), min_size=1, max_size=3),
    st.integers(0, 2**31 - 1),
)
def test_kth_smallest_any_shape_and_dtype(dtype, shape, seed):
    rng = np.random.default_rng(seed)
    values = np.abs(rng.standard_normal(shape)).astype(np.float32)
    tensor = torch.from_numpy(values).to(dtype)
    ref_values = tensor.float().numpy()  # the widened values the selection sees
    n = ref_values.size
    ranks = sorted({1, n, int(rng.integers(1, n + 1))})
    assert kth_smallest(tensor, ranks) == _ref_kth(ref_values, ranks)


def test_sign_bit_is_ignored_and_negative_zero_is_zero():
    x = torch.tensor([-0.0, 2.0, -1.5, 0.0, -3.0, 1.0])
    assert kth_smallest(x, [1, 2, 3, 4, 5, 6]) == [0.0, 0.0, 1.0, 1.5, 2.0, 3.0]


def test_many_ranks_use_chunked_fine_pass():
    # More distinct buckets than one fine bincount takes at once (64).
    rng = np.random.default_rng(0)
    values = (np.exp(rng.uniform(-60, 60, 50_000))).astype(np.float32)
    ranks = list(range(1, values.size + 1, 211))
    buckets = {b for b, _ in refine_buckets(coarse_histogram(torch.from_numpy(values)), ranks)}
    assert len(buckets) > 64
    assert kth_smallest(torch.from_numpy(values), ranks) == _ref_kth(values, ranks)


def test_shard_histograms_add_up_to_the_whole():
    rng = np.random.default_rng(1)
    values = np.round(np.abs(rng.standard_normal(10_000)), 3).astype(np.float32)  # many ties
    values[::7] = 0.0
    shards = [torch.from_numpy(p) for p in np.split(values, [1234, 1234, 7000])]  # one empty
    coarse = sum(coarse_histogram(s) for s in shards)
    assert coarse.shape == (N_BUCKETS,) and coarse.dtype == np.int64
    np.testing.assert_array_equal(coarse, coarse_histogram(torch.from_numpy(values)))
    ranks = [1, 1430, 1431, 5000, 9999, 10_000]
    buckets = [b for b, _ in refine_buckets(coarse, ranks)]
    fines: dict[int, np.ndarray] = {}
    for s in shards:
        fines = add_fine(fines, fine_histograms(s, buckets))
    assert resolve(coarse, fines, ranks) == _ref_kth(values, ranks)


def test_refine_buckets_reports_rank_within_bucket():
    coarse = np.zeros(N_BUCKETS, dtype=np.int64)
    coarse[[3, 10, 500]] = [2, 5, 1]
    assert refine_buckets(coarse, [1, 2, 3, 7, 8]) == [(3, 1), (3, 2), (10, 1), (10, 5), (500, 1)]


def test_bad_ranks_and_mismatched_histograms_raise():
    x = torch.tensor([1.0, 2.0, 3.0])
    coarse = coarse_histogram(x)
    with pytest.raises(ValueError):
        refine_buckets(coarse, [0])
    with pytest.raises(ValueError):
        refine_buckets(coarse, [4])
    with pytest.raises(ValueError):  # fine histogram never computed
        resolve(coarse, {}, [1])
    other = torch.tensor([1.0, 1.0])
    b = refine_buckets(coarse, [1])[0][0]
    with pytest.raises(ValueError):  # fine counts from other data
        resolve(coarse, fine_histograms(other, [b]), [1])
    with pytest.raises(TypeError):
        coarse_histogram(torch.tensor([1, 2, 3]))


def test_beyond_two_to_the_24_elements():
    n = 2**24 + 17
    gen = torch.Generator().manual_seed(7)
    # 2^20 distinct values for 2^24 elements: every rank sits among ties.
    x = torch.randint(0, 2**20, (n,), generator=gen).to(torch.float32).mul_(2.0**-20)
    ranks = [1, 5_000_001, 2**24, 2**24 + 1, n]
    got = kth_smallest(x, ranks)
    assert got == [torch.kthvalue(x, r).values.item() for r in ranks]
    part = np.partition(x.numpy(), [r - 1 for r in ranks])
    assert got == [float(part[r - 1]) for r in ranks]


def test_float_bits_does_not_copy_contiguous_fp32():
    x = torch.rand(4, 5)
    assert select.float_bits(x).data_ptr() == x.data_ptr()
