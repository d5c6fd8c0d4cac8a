"""Binarize, knobs, reconstruction and transforms against plain-NumPy references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tswitch_ray.errors import ArtifactError, ConfigError, ZooError
from tswitch_ray.switch import (
    KeptStats,
    Thresholds,
    bin_discard,
    binarize,
    dare,
    kept_stats,
    knob,
    p_discard,
    reconstruct,
    task_vector,
    tensor_thresholds,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def ref_thresholds(x: np.ndarray, alpha: float) -> tuple[float, float]:
    x = x.ravel()
    pos, neg = np.sort(x[x > 0]), np.sort(-x[x < 0])
    dp, dn = math.floor(alpha * pos.size), math.floor(alpha * neg.size)
    return (float(pos[dp - 1]) if dp else 0.0, float(neg[dn - 1]) if dn else 0.0)


def ref_switch(x: np.ndarray, alpha: float, mode: str):
    """Mask, sign and knob of docs/MATH.md "Switches and knobs" (paper 000 eqs. 5–6) written with np.sort
    and float64 sums."""
    t_pos, t_neg = ref_thresholds(x, alpha)
    mask = (x > t_pos) | (-x > t_neg)
    kept = np.abs(x[mask].astype(np.float64))
    if kept.size == 0:
        lam = 0.0
    elif mode == "rms":
        lam = float(np.sqrt(np.sum(kept**2) / kept.size))
    else:
        lam = float(np.mean(kept))
    return mask, x > 0, lam


@st.composite
def cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(1, 8), min_size=1, max_size=3)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["normal", "ties", "all_pos", "all_neg", "all_zero"]))
    n = int(np.prod(shape))
    delta = {
        "normal": lambda: rng.standard_normal(n) * 1e-2,
        "ties": lambda: rng.integers(-2, 3, n) * 0.125,
        "all_pos": lambda: np.abs(rng.standard_normal(n)) + 0.01,
        "all_neg": lambda: -np.abs(rng.standard_normal(n)) - 0.01,
        "all_zero": lambda: np.zeros(n),
    }[kind]().reshape(shape)
    theta_0 = torch.from_numpy(rng.standard_normal(shape)).to(dtype)
    theta_t = (theta_0.double() + torch.from_numpy(delta)).to(dtype)
    alpha = draw(st.sampled_from([0.0, 0.3, 0.6, 0.9]))
    mode = draw(st.sampled_from(["rms", "mean"]))
    return theta_t, theta_0, alpha, mode


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=0.0)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_switch_pipeline_matches_reference(case):
    theta_t, theta_0, alpha, mode = case
    tau = task_vector(theta_t, theta_0)
    x = theta_t.float().numpy() - theta_0.float().numpy()
    ref_mask, ref_pos, ref_lam = ref_switch(x, alpha, mode)

    (th,) = tensor_thresholds(tau, [alpha])
    mask, positive = binarize(tau, th)
    assert mask.dtype == torch.bool and mask.shape == tau.shape
    np.testing.assert_array_equal(mask.numpy(), ref_mask)
    np.testing.assert_array_equal(positive.numpy()[ref_mask], ref_pos[ref_mask])
    assert not mask[tau == 0].any()

    stats = kept_stats(tau, mask)
    assert stats.kept == int(ref_mask.sum())
    lam = knob(stats, mode)
    assert _close(lam, ref_lam) or lam == ref_lam == 0.0

    # Reconstruction: θ0 + λ·M⊙S in fp32, then θ0's dtype.
    rebuilt = reconstruct(theta_0, mask, positive, lam)
    assert rebuilt.dtype == theta_0.dtype and rebuilt.shape == theta_0.shape
    sign = np.where(ref_pos, 1.0, -1.0).astype(np.float32)
    ref32 = theta_0.float().numpy() + np.float32(ref_lam) * sign * ref_mask
    ref = torch.from_numpy(ref32).to(theta_0.dtype)
    torch.testing.assert_close(rebuilt.float(), ref.float(), rtol=1e-6, atol=0.0)

    # Transforms (eqs. 3 and 5): float32, same shape.
    np.testing.assert_array_equal(p_discard(tau, th).numpy(), np.where(ref_mask, x, 0.0).astype(np.float32))
    binary = bin_discard(tau, th, mode)
    assert binary.dtype == torch.float32
    ref_bin = (np.float32(ref_lam) * sign * ref_mask).astype(np.float32)
    np.testing.assert_allclose(binary.numpy(), ref_bin, rtol=1e-6, atol=0.0)


def test_kept_stats_add_across_tensors():
    rng = np.random.default_rng(2)
    parts = [torch.from_numpy(rng.standard_normal(n)).float() for n in (50, 1, 333)]
    th = Thresholds(0.5, 0.4, 0.3, 0, 0, 1, 1)  # any thresholds: stats only look at the mask
    total = KeptStats()
    for p in parts:
        total = total + kept_stats(p, binarize(p, th)[0])
    whole = torch.cat(parts)
    one = kept_stats(whole, binarize(whole, th)[0])
    assert total.kept == one.kept
    assert _close(total.sum_abs, one.sum_abs) and _close(total.sum_sq, one.sum_sq)
    x = whole.numpy().astype(np.float64)
    kept = x[(x > 0.4) | (-x > 0.3)]
    assert _close(one.sum_abs, float(np.abs(kept).sum())) and _close(one.sum_sq, float((kept**2).sum()))


def test_knob_modes_and_empty():
    stats = KeptStats(kept=4, sum_abs=6.0, sum_sq=14.0)  # magnitudes 1, 1, 2, 2... rms √3.5
    assert knob(stats) == math.sqrt(14.0 / 4)
    assert knob(stats, "mean") == 1.5
    assert knob(KeptStats(), "rms") == 0.0 and knob(KeptStats(), "mean") == 0.0
    with pytest.raises(ConfigError, match="median"):
        knob(stats, "median")


def test_zero_never_kept_even_with_zero_thresholds():
    tau = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 3.0])
    mask, positive = binarize(tau, Thresholds(0.0, 0.0, 0.0, 3, 1, 0, 0))
    assert mask.tolist() == [False, False, True, True, True]
    assert positive.tolist() == [False, False, True, False, True]


def test_reconstruct_keeps_base_untouched_and_checks_shape():
    theta_0 = torch.zeros(3)
    mask = torch.tensor([True, False, True])
    positive = torch.tensor([True, True, False])
    out = reconstruct(theta_0, mask, positive, 0.5)
    assert out.tolist() == [0.5, 0.0, -0.5] and theta_0.tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ArtifactError, match="shape"):
        reconstruct(torch.zeros(4), mask, positive, 0.5)


def test_task_vector_is_fp32_and_leaves_inputs_alone():
    theta_t = torch.tensor([1.5, 2.0])
    theta_0 = torch.tensor([1.0, 3.0])
    tau = task_vector(theta_t, theta_0)
    assert tau.tolist() == [0.5, -1.0] and theta_t.tolist() == [1.5, 2.0]
    half = task_vector(theta_t.half(), theta_0.bfloat16())
    assert half.dtype == torch.float32 and half.tolist() == [0.5, -1.0]
    with pytest.raises(ZooError, match="visual.proj"):
        task_vector(torch.zeros(2, 3), torch.zeros(3, 2), name="visual.proj")
    with pytest.raises(ZooError, match="floating"):
        task_vector(torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64))


def test_dare_is_seeded_unbiased_and_drops_p():
    gen = torch.Generator().manual_seed(0)
    tau = torch.randn(200_000, generator=gen)
    p = 0.7
    a, b = dare(tau, p, seed=123), dare(tau, p, seed=123)
    assert torch.equal(a, b)
    assert not torch.equal(a, dare(tau, p, seed=124))
    dropped = (a == 0).double().mean().item()
    assert abs(dropped - p) < 0.005  # binomial sd ≈ 0.001
    kept = a != 0
    torch.testing.assert_close(a[kept], tau[kept] / (1 - p))
    # Mean preserved in expectation: on a constant vector the mean is c·(kept/n)/(1−p).
    c = torch.full((200_000,), 2.0)
    assert abs(dare(c, p, seed=5).mean().item() - 2.0) < 0.03
    assert torch.equal(dare(tau, 0.0, seed=1), tau)
    assert dare(tau.reshape(400, 500), p, seed=123).shape == (400, 500)
    for bad in (1.0, -0.1, 2):
        with pytest.raises(ConfigError, match="DARE"):
            dare(tau, bad, seed=0)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(), st.lists(st.sampled_from([0.0, 0.3, 0.5, 0.6, 0.9, 0.99]), min_size=1, max_size=4, unique=True))
def test_kept_switches_equal_binarize_and_encode_switch(case, alphas):
    """The build's compiled path gives the same elements, signs and bytes as binarize + encode_switch,
    and the kept sums of kept_stats up to float64 rounding."""
    from tswitch_ray.artifacts.encoding import encode_kept, encode_switch
    from tswitch_ray.switch.binarize import SwitchScratch, kept_switches

    theta_t, theta_0, _, _ = case
    tau = task_vector(theta_t, theta_0)
    ths = tensor_thresholds(tau, sorted(alphas))
    scratch = SwitchScratch()
    for _ in range(2):  # the second time through reuses the scratch buffers
        for th, sw in zip(ths, kept_switches(tau, ths, scratch)):
            mask, positive = (x.reshape(-1).numpy() for x in binarize(tau, th))
            np.testing.assert_array_equal(sw.positions, np.flatnonzero(mask))
            np.testing.assert_array_equal(sw.positive.astype(bool), positive[mask])
            if sw.dropped is not None:
                np.testing.assert_array_equal(sw.dropped, np.flatnonzero(~mask))
            want = kept_stats(tau, torch.from_numpy(mask).reshape(tau.shape))
            assert sw.stats.kept == want.kept
            assert sw.stats.sum_abs == pytest.approx(want.sum_abs, rel=1e-12, abs=1e-300)
            assert sw.stats.sum_sq == pytest.approx(want.sum_sq, rel=1e-12, abs=1e-300)
            enc = encode_switch(mask, positive)
            assert encode_kept(mask.size, sw.positions, sw.positive, dropped_pos=sw.dropped) == enc
            assert encode_kept(mask.size, sw.positions, sw.positive) == enc


def test_kept_switches_of_an_empty_tensor():
    """A zero-element tensor (a checkpoint may hold one) gives empty switches, with a fresh scratch too."""
    from tswitch_ray.artifacts.encoding import encode_kept, encode_switch
    from tswitch_ray.switch.binarize import kept_switches

    ths = tensor_thresholds(torch.randn(100, generator=torch.Generator().manual_seed(0)), [0.3, 0.9])
    for sw in kept_switches(torch.zeros(0), ths):
        assert sw.positions.size == 0 and sw.positive.size == 0 and sw.dropped is None
        assert sw.stats == KeptStats()
        empty = np.zeros(0, dtype=bool)
        assert encode_kept(0, sw.positions, sw.positive) == encode_switch(empty, empty)


def test_kept_switches_of_thresholds_that_are_not_nested():
    """Kept sets that grow (descending α, or cut "authors" keeping a whole small sign at a larger α) are
    computed run by run: each switch still equals binarize's, element for element."""
    from tswitch_ray.switch.binarize import kept_switches, nested, nested_runs

    tau = torch.linspace(-1, 1, 101)
    ths = tensor_thresholds(tau, [0.9, 0.5, 0.6, 0.3])  # kept sets grow, shrink, grow
    assert not nested(ths) and [len(r) for r in nested_runs(ths)] == [1, 2, 1]
    switches = list(kept_switches(tau, ths))
    assert len(switches) == 4
    for th in ths:
        (sw,) = kept_switches(tau, [th])  # each alone; the arrays live in one scratch, compare at once
        mask = binarize(tau, th)[0].numpy()
        np.testing.assert_array_equal(sw.positions, np.flatnonzero(mask))
    small = torch.tensor([3e-3, 1e-3, 1e-3, 2e-3, -1e-3, 0.0, -2e-3, 5e-4, 1e-3, 4e-3, 2e-3, 1e-3])
    ths = tensor_thresholds(small, [0.5, 0.9], cut="authors")  # 9 positives: K = 4, then int(0.9) = 0
    assert not nested(ths)
    for th, sw in zip(ths, kept_switches(small, ths)):
        np.testing.assert_array_equal(sw.positions, np.flatnonzero(binarize(small, th)[0].numpy()))
        want = kept_stats(small, binarize(small, th)[0])
        assert sw.stats.kept == want.kept and sw.stats.sum_sq == pytest.approx(want.sum_sq, rel=1e-12)


def test_kept_switch_sums_have_a_fixed_order():
    """Four lanes in a fixed order, no fastmath: the knob's sums are the same bits on every run,
    whatever the CPU's vector width. With one α the order is exactly: position q to lane q % 4, each
    lane summed in order, then ((l0 + l1) + (l2 + l3))."""
    from tswitch_ray.switch.binarize import SwitchScratch, kept_switches

    g = torch.Generator().manual_seed(3)
    tau = torch.randn(10_003, generator=g) * 1e-3
    ths = tensor_thresholds(tau, [0.3])
    (sw,) = kept_switches(tau, ths)
    vals = tau.double().abs().numpy()[binarize(tau, ths[0])[0].numpy()]
    lanes = [0.0, 0.0, 0.0, 0.0]
    sq = [0.0, 0.0, 0.0, 0.0]
    for q, v in enumerate(vals.tolist()):
        lanes[q % 4] += v
        sq[q % 4] += v * v
    assert sw.stats.sum_abs == (lanes[0] + lanes[1]) + (lanes[2] + lanes[3])
    assert sw.stats.sum_sq == (sq[0] + sq[1]) + (sq[2] + sq[3])
    ths3 = tensor_thresholds(tau, [0.3, 0.6, 0.9])
    first = [s.stats for s in kept_switches(tau, ths3)]
    scratch = SwitchScratch()
    for _ in range(2):
        assert [s.stats for s in kept_switches(tau.clone(), ths3, scratch)] == first




def test_kept_switches_with_thresholds_that_are_not_float32():
    """Hand-made thresholds (not bit patterns of τ) make the same cut as binarize (float32 comparisons)."""
    from tswitch_ray.switch.binarize import kept_switches
    from tswitch_ray.switch.thresholds import Thresholds

    tau = torch.tensor([0.1, 0.10000001, -0.2, -0.19999999, 0.3, 0.0, -0.05], dtype=torch.float32)
    # 0.1 and 0.2 are not float32 values: a float64 comparison would keep τ[0] = float32(0.1), binarize does not.
    ths = [Thresholds(0.5, 0.1, 0.2, 0, 0, 0, 0), Thresholds(0.7, 0.25, 0.25, 0, 0, 0, 0)]
    assert float(np.float32(0.1)) != 0.1
    for th, sw in zip(ths, kept_switches(tau, ths)):
        mask, positive = (x.numpy() for x in binarize(tau, th))
        np.testing.assert_array_equal(sw.positions, np.flatnonzero(mask))
        np.testing.assert_array_equal(sw.positive.astype(bool), positive[mask])
