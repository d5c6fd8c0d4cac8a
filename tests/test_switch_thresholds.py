"""Exact P-Discard thresholds (scope tensor and model) against a plain-NumPy np.sort reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tswitch_ray.errors import ConfigError, ZooError
from tswitch_ray.switch import (
    RefineRequest,
    SignedFine,
    SignedHistograms,
    Thresholds,
    discard_count,
    fine_histograms,
    refine_request,
    resolve_thresholds,
    signed_fine_histograms,
    signed_histograms,
    task_vector,
    tensor_thresholds,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
KINDS = ["normal", "ties", "zeros", "all_pos", "all_neg", "all_zero", "wide", "subnormal"]


def ref_thresholds(tau: np.ndarray, alpha: float) -> Thresholds:
    """The rule of docs/MATH.md "Thresholds (P-Discard cut)" (paper 000 eq. 3), written with np.sort."""
    x = np.asarray(tau, dtype=np.float32).ravel()
    pos = np.sort(x[x > 0])
    neg = np.sort(-x[x < 0])
    d_pos = math.floor(alpha * pos.size)
    d_neg = math.floor(alpha * neg.size)
    t_pos = float(pos[d_pos - 1]) if d_pos else 0.0
    t_neg = float(neg[d_neg - 1]) if d_neg else 0.0
    return Thresholds(alpha, t_pos, t_neg, int(pos.size), int(neg.size), d_pos, d_neg)


def make_delta(kind: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Task-vector-like values (float64) of a given character."""
    n = int(np.prod(shape))
    if kind == "normal":
        v = rng.standard_normal(n) * 1e-3
    elif kind == "ties":
        v = rng.integers(-3, 4, n) * 0.25  # 7 distinct values, zeros included
    elif kind == "zeros":
        v = rng.standard_normal(n) * (rng.random(n) < 0.3)
    elif kind == "all_pos":
        v = np.abs(rng.standard_normal(n)) + 1e-3
    elif kind == "all_neg":
        v = -np.abs(rng.standard_normal(n)) - 1e-3
    elif kind == "all_zero":
        v = np.zeros(n)
    elif kind == "wide":
        v = rng.choice([-1.0, 1.0], n) * np.exp(rng.uniform(-30, 10, n))  # e^10 < fp16 max
    else:  # subnormal float32 magnitudes and exact zeros next to each other
        v = rng.integers(-40, 41, n) * 1e-45
    return v.reshape(shape)


@st.composite
def task_vectors(draw):
    """(θt, θ0) in a storage dtype, and the fp32 task vector a reader would compute."""
    dtype = draw(st.sampled_from(DTYPES))
    kind = draw(st.sampled_from(KINDS))
    shape = tuple(draw(st.lists(st.integers(1, 9), min_size=1, max_size=3)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    base_scale = draw(st.sampled_from([0.0, 1e-2]))
    theta_0 = torch.from_numpy(rng.standard_normal(shape) * base_scale).to(dtype)
    theta_t = (theta_0.double() + torch.from_numpy(make_delta(kind, shape, rng))).to(dtype)
    ref_tau = theta_t.float().numpy() - theta_0.float().numpy()  # one fp32 rounding
    return theta_t, theta_0, ref_tau


_alphas = st.lists(
    st.one_of(st.sampled_from([0.0, 0.1, 0.5, 0.6, 0.9, 0.99]), st.floats(0.0, 0.999)),
    min_size=1,
    max_size=6,
)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(task_vectors(), _alphas)
def test_tensor_thresholds_match_reference(tv, alphas):
    theta_t, theta_0, ref_tau = tv
    tau = task_vector(theta_t, theta_0)
    assert tau.dtype == torch.float32 and tau.shape == theta_0.shape
    np.testing.assert_array_equal(tau.numpy(), ref_tau)
    got = tensor_thresholds(tau, alphas)
    assert got == [ref_thresholds(ref_tau, a) for a in alphas]


_f32 = st.floats(allow_nan=False, allow_infinity=False, width=32)
_pool = st.sampled_from([0.0, -0.0, 1e-45, -1e-45, 0.75, -0.75, 2.0, -2.0])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(_f32, _pool), min_size=1, max_size=200), _alphas)
def test_thresholds_on_arbitrary_float32_values(values, alphas):
    tau = np.array(values, dtype=np.float32)
    got = tensor_thresholds(torch.from_numpy(tau), alphas)
    assert got == [ref_thresholds(tau, a) for a in alphas]


@settings(max_examples=80, deadline=None)
@given(st.sampled_from(KINDS), st.integers(0, 2**32 - 1), _alphas)
def test_model_scope_over_three_shards_equals_concatenation(kind, seed, alphas):
    rng = np.random.default_rng(seed)
    shapes = [(int(rng.integers(1, 20)), int(rng.integers(1, 20))), (int(rng.integers(1, 50)),), (3, 2, 4)]
    shards = [torch.from_numpy(make_delta(kind, s, rng)).float() for s in shapes]
    # Driver: sum pass-1 stats, ask for buckets, sum pass-2 stats, resolve.
    hist = sum((signed_histograms(s) for s in shards), SignedHistograms.empty())
    request = refine_request(hist, alphas)
    fine = SignedFine()
    for s in shards:
        fine = fine + signed_fine_histograms(s, request)
    got = resolve_thresholds(hist, fine, alphas)
    whole = torch.cat([s.reshape(-1) for s in shards])
    assert got == tensor_thresholds(whole, alphas)
    assert got == [ref_thresholds(whole.numpy(), a) for a in alphas]


def test_model_scope_through_the_fine_histograms_seam():
    rng = np.random.default_rng(3)
    shards = [torch.from_numpy(rng.standard_normal(n)).float() for n in (100, 1, 37)]
    from tswitch_ray.switch import SignedFine, refine_request, signed_histograms

    hist = signed_histograms(shards[0]) + signed_histograms(shards[1]) + signed_histograms(shards[2])
    req = refine_request(hist, [0.3, 0.7])
    fine = SignedFine()
    for s in shards:
        fine = fine + fine_histograms(s, req)
    assert resolve_thresholds(hist, fine, [0.3, 0.7]) == tensor_thresholds(torch.cat(shards), [0.3, 0.7])


def test_n_equals_one_and_alpha_zero():
    for v, n_pos, n_neg in [(2.5, 1, 0), (-2.5, 0, 1), (0.0, 0, 0)]:
        (th0, th9) = tensor_thresholds(torch.tensor([v]), [0.0, 0.9])
        assert th0 == Thresholds(0.0, 0.0, 0.0, n_pos, n_neg, 0, 0)
        assert th9 == Thresholds(0.9, 0.0, 0.0, n_pos, n_neg, 0, 0)  # floor(0.9·1) = 0


def test_discard_count_is_python_float64_floor():
    rng = np.random.default_rng(5)
    for _ in range(2000):
        alpha = float(rng.random())
        n = int(rng.integers(0, 10**9))
        assert discard_count(n, alpha) == math.floor(alpha * n)
    # float64 rounding is kept on purpose: 0.29·100 = 28.999999999999996
    assert discard_count(100, 0.29) == 28
    assert discard_count(10, 0.3) == 3
    assert discard_count(0, 0.5) == 0


@pytest.mark.parametrize("alpha", [-0.1, 1.0, 1.5, float("nan"), float("inf"), True, "0.5", None])
def test_alpha_outside_unit_interval_is_a_config_error(alpha):
    with pytest.raises(ConfigError, match="alpha"):
        discard_count(10, alpha)
    with pytest.raises(ConfigError, match="alpha"):
        tensor_thresholds(torch.ones(4), [0.5, alpha])


def test_single_alpha_is_accepted():
    tau = torch.tensor([1.0, 2.0, -1.0, -2.0])
    assert tensor_thresholds(tau, 0.5) == tensor_thresholds(tau, [0.5])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_task_vector_is_a_zoo_error(bad):
    tau = torch.tensor([1.0, -2.0, bad, 0.5])
    with pytest.raises(ZooError, match="blocks.0.mlp.weight"):
        tensor_thresholds(tau, [0.5], name="blocks.0.mlp.weight")
    with pytest.raises(ZooError):
        signed_histograms(tau)


def test_no_refinement_needed_when_every_count_is_zero():
    hist = signed_histograms(torch.tensor([0.0, 1.0, -1.0]))
    request = refine_request(hist, [0.0, 0.5])  # floor(0.5·1) = 0 on both sides
    assert request == RefineRequest() and not request
    assert not signed_fine_histograms(torch.tensor([0.0, 1.0, -1.0]), request).pos


def test_threshold_keeps_the_designed_fraction_with_ties():
    # Ties at the cut: the exact rule keeps strictly above the d-th smallest.
    tau = torch.tensor([1.0, 1.0, 1.0, 2.0, -1.0, -1.0, -3.0, 0.0])
    (th,) = tensor_thresholds(tau, [0.5])
    assert (th.t_pos, th.d_pos, th.n_pos) == (1.0, 2, 4)
    assert (th.t_neg, th.d_neg, th.n_neg) == (1.0, 1, 3)


def test_large_tensor_thresholds_against_partition():
    rng = np.random.default_rng(11)
    tau = (rng.standard_normal(2**24 + 17).astype(np.float32) * np.float32(1e-3))
    tau[::5] = 0.0
    alphas = [0.0, 0.3, 0.6, 0.9]
    got = tensor_thresholds(torch.from_numpy(tau), alphas)
    pos = tau[tau > 0]
    neg = -tau[tau < 0]
    for th, a in zip(got, alphas):
        dp, dn = math.floor(a * pos.size), math.floor(a * neg.size)
        assert (th.n_pos, th.n_neg, th.d_pos, th.d_neg) == (pos.size, neg.size, dp, dn)
        if dp:
            assert th.t_pos == float(np.partition(pos, dp - 1)[dp - 1])
            assert th.t_neg == float(np.partition(neg, dn - 1)[dn - 1])
        else:
            assert th.t_pos == 0.0 and th.t_neg == 0.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    from tswitch_ray.switch import kth_smallest

    gen = torch.Generator().manual_seed(4)
    tau = torch.randn(300_000, generator=gen).mul_(1e-3)
    tau[::4] = 0.0
    alphas = [0.0, 0.2, 0.6, 0.95]
    assert tensor_thresholds(tau.cuda(), alphas) == tensor_thresholds(tau, alphas)
    ranks = [1, 12345, 300_000]
    assert kth_smallest(tau.abs().cuda(), ranks) == kth_smallest(tau.abs(), ranks)


@settings(max_examples=80, deadline=None)
@given(st.sampled_from(KINDS), st.integers(0, 2**32 - 1), _alphas, st.sampled_from([1, 3, 1000]))
def test_window_pass_equals_two_passes_or_says_it_missed(kind, seed, alphas, stride):
    """Sampled window + one pass: exact when the window covers the ranks, and a miss is detected.

    ``stride`` 1 samples everything (the window must cover), 3 a third, 1000
    next to nothing (misses happen; ``covers`` must report them).
    """
    from tswitch_ray.switch.thresholds import WindowPass, covers, window_request

    rng = np.random.default_rng(seed)
    shapes = [(int(rng.integers(1, 40)), int(rng.integers(1, 40))), (int(rng.integers(1, 90)),), (3, 2, 4)]
    shards = [torch.from_numpy(make_delta(kind, s, rng)).float() for s in shapes]
    sample = WindowPass(RefineRequest())
    for s in shards:
        sample.add(s.reshape(-1)[::stride].contiguous())
    window = window_request(sample.result()[0], alphas)
    passes = [WindowPass(window) for _ in shards]
    for p, s in zip(passes, shards):
        p.add(s, "t")
    results = [p.result() for p in passes]
    hist = sum((h for h, _ in results), SignedHistograms.empty())
    picked = results[0][1] + results[1][1] + results[2][1]
    two_pass = sum((signed_histograms(s) for s in shards), SignedHistograms.empty())
    np.testing.assert_array_equal(hist.coarse_pos, two_pass.coarse_pos)
    np.testing.assert_array_equal(hist.coarse_neg, two_pass.coarse_neg)
    assert (hist.n_pos, hist.n_neg) == (two_pass.n_pos, two_pass.n_neg)
    need = refine_request(hist, alphas)
    whole = torch.cat([s.reshape(-1) for s in shards])
    if stride == 1:
        assert covers(window, need)
    if covers(window, need):
        assert resolve_thresholds(hist, picked.fine(need), alphas) == [ref_thresholds(whole.numpy(), a) for a in alphas]
    else:
        assert stride > 1


def test_window_pass_flags_non_finite_and_pickles_sparse():
    import pickle

    from tswitch_ray.switch.thresholds import WindowPass

    p = WindowPass(RefineRequest((1,), ()))
    with pytest.raises(ZooError, match="blocks.1.bias"):
        p.add(torch.tensor([1.0, float("nan")]), "blocks.1.bias")
    h = signed_histograms(torch.linspace(-1, 1, 10_001))
    back = pickle.loads(pickle.dumps(h))
    np.testing.assert_array_equal(back.coarse_pos, h.coarse_pos)
    np.testing.assert_array_equal(back.coarse_neg, h.coarse_neg)
    assert (back.n_pos, back.n_neg) == (h.n_pos, h.n_neg)
    assert len(pickle.dumps(h)) < 100_000  # sparse on the wire, not 2 x 512 KB
    f = signed_fine_histograms(torch.linspace(-1, 1, 10_001), refine_request(h, [0.5]))
    back_f = pickle.loads(pickle.dumps(f))
    assert f.pos.keys() == back_f.pos.keys() and all((f.pos[b] == back_f.pos[b]).all() for b in f.pos)
