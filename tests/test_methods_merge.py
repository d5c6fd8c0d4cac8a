"""State-dict merging methods against independent NumPy references.

The zoo is small but built to hit the edge cases: several tensors (so global
statistics span tensors), fp32 and fp16 storage, task-vector entries that are
exactly zero, entries with a zero sign sum across tasks (sign ties), and
values on a coarse grid so that many magnitudes tie at every selection cut.
The references below are transcriptions of the formulas in docs/MATH.md
("Task Arithmetic", "TIES-Merging", "DARE", "P-Discard merge", "EMR-Merging",
"Thresholds (P-Discard cut)", "Switches and knobs", "Reconstruction") and of
the papers' reference code, written with NumPy (sort-based selection, whole
flattened model) and sharing no code with ``tswitch_ray.methods``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tswitch_ray.errors import ConfigError, ZooError
from tswitch_ray.methods import MethodKind, compute_params, get_method, get_method_info, merge_in_memory, registered
from tswitch_ray.methods.emr import task_masks, unified_task_vector
from tswitch_ray.methods.base import stable_seed
from tswitch_ray.switch.transforms import dare as dare_transform

N_TASKS = 4


# --------------------------------------------------------------------------- the zoo


def make_zoo(seed: int = 0) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    rng = np.random.default_rng(seed)
    base: dict[str, torch.Tensor] = {}
    tasks: list[dict[str, torch.Tensor]] = [{} for _ in range(N_TASKS)]

    # Grid tensors: θ0 in 1/16 steps and deltas in 1/64 steps are exact in fp32,
    # so τ = θt − θ0 is exactly the integer delta / 64 and magnitudes repeat a lot.
    for name, shape in [("grid.w", (24, 17)), ("grid.b", (60,)), ("grid.conv", (3, 5, 7))]:
        b = rng.integers(-32, 33, size=shape).astype(np.float32) / 16
        base[name] = torch.from_numpy(b)
        deltas = [rng.integers(-8, 9, size=shape).astype(np.float32) / 64 for _ in range(N_TASKS)]
        flat = [d.reshape(-1) for d in deltas]
        # Sign ties of strong entries: +max and -max on two tasks, zero elsewhere.
        for i in range(0, flat[0].size, 11):
            flat[0][i], flat[1][i], flat[2][i], flat[3][i] = 8 / 64, -8 / 64, 0.0, 0.0
        # Entries where no task moved at all.
        for i in range(5, flat[0].size, 13):
            for f in flat:
                f[i] = 0.0
        for t in range(N_TASKS):
            tasks[t][name] = torch.from_numpy(b + deltas[t])
    # Generic float tensors, one of them stored in fp16.
    for name, shape, dtype in [("rand.w", (31, 9), torch.float32), ("rand.h", (40,), torch.float16)]:
        b = rng.normal(size=shape).astype(np.float32)
        base[name] = torch.from_numpy(b).to(dtype)
        for t in range(N_TASKS):
            d = (rng.normal(size=shape) * 0.05).astype(np.float32)
            d.reshape(-1)[::7] = 0.0
            tasks[t][name] = torch.from_numpy(b + d).to(dtype)
    # A one-element tensor (a selection over one value).
    base["tiny"] = torch.tensor([0.5])
    for t in range(N_TASKS):
        tasks[t]["tiny"] = torch.tensor([0.5 + 0.01 * (t - 1)])
    return base, tasks


@pytest.fixture(scope="module")
def zoo():
    return make_zoo()


@pytest.fixture(scope="module")
def once(zoo):
    """``once(fn, *args)`` = ``fn(base_sd, task_sds, *args)``, computed once per module and shared by its tests.

    For the numpy references and the in-memory merges several tests compare
    against: both are pure functions of the zoo and their arguments, and no
    test mutates a result.
    """
    cache: dict[tuple, object] = {}

    def get(fn, *args):
        if (fn, args) not in cache:
            cache[fn, args] = fn(*zoo, *args)
        return cache[fn, args]

    return get


def in_memory(base_sd, task_sds, name, opts=()):
    """merge_in_memory of method ``name`` with options ``opts`` (hashable: a tuple of (key, value) pairs)."""
    return merge_in_memory(get_method(name, **dict(opts)), base_sd, task_sds)


def np_inputs(base_sd, task_sds):
    names = list(base_sd)
    b = {n: base_sd[n].to(torch.float32).numpy() for n in names}
    taus = {n: [sd[n].to(torch.float32).numpy() - b[n] for sd in task_sds] for n in names}
    return names, b, taus


def assert_close_sd(out, ref, base_sd):
    assert list(out) == list(ref)
    for name, t in out.items():
        assert t.dtype == base_sd[name].dtype, name
        assert tuple(t.shape) == tuple(base_sd[name].shape), name
        expect = ref[name]
        if base_sd[name].dtype == torch.float16:
            # The reference rounds its fp32 result to fp16 too; allow one fp16 ulp.
            np.testing.assert_allclose(t.to(torch.float32).numpy(), np.float16(expect).astype(np.float32),
                                       rtol=1e-3, atol=1e-3, err_msg=name)
        else:
            np.testing.assert_allclose(t.numpy(), expect, rtol=2e-6, atol=2e-7, err_msg=name)


def np_seq_sum(arrs):
    acc = arrs[0].copy()
    for a in arrs[1:]:
        acc = acc + a
    return acc


def np_kth(values: np.ndarray, r: int) -> float:
    """1-based r-th smallest, by full sort."""
    return float(np.sort(values.reshape(-1), kind="stable")[r - 1])


# --------------------------------------------------------------------------- averaging / TA


def test_average_and_task_arithmetic(zoo):
    base_sd, task_sds = zoo
    names, b, taus = np_inputs(base_sd, task_sds)
    ref_avg = {n: np.mean(np.stack([sd[n].to(torch.float32).numpy() for sd in task_sds]), axis=0) for n in names}
    assert_close_sd(merge_in_memory(get_method("avg"), base_sd, task_sds), ref_avg, base_sd)
    for s in (0.3, 1.0):
        ref = {n: b[n] + np.float32(s) * np_seq_sum(taus[n]) for n in names}
        opts = {} if s == 0.3 else {"scale": s}
        assert_close_sd(merge_in_memory(get_method("ta", **opts), base_sd, task_sds), ref, base_sd)


# --------------------------------------------------------------------------- TIES


def np_ties(base_sd, task_sds, k=20.0, trim_scope="model", merge="mean", scale=0.3):
    """Transcription of ties_merging_utils (topk_values_mask, resolve_sign, disjoint_merge)."""
    names, b, taus = np_inputs(base_sd, task_sds)
    sizes = [b[n].size for n in names]
    flat = np.stack([np.concatenate([taus[n][t].reshape(-1) for n in names]) for t in range(N_TASKS)])
    trimmed = np.zeros_like(flat)
    ties_at_cut = False
    for t in range(N_TASKS):
        segments = [(0, flat.shape[1])] if trim_scope == "model" else []
        if trim_scope == "tensor":
            start = 0
            for s in sizes:
                segments.append((start, start + s))
                start += s
        for lo, hi in segments:
            m = flat[t, lo:hi]
            d = m.size
            kk = d - int(d * (k / 100))
            if kk <= 0:
                trimmed[t, lo:hi] = m
                continue
            kth = np_kth(np.abs(m), kk)
            trimmed[t, lo:hi] = m * (np.abs(m) >= kth)
            ties_at_cut |= int((np.abs(m) >= kth).sum()) > d - kk + 1
    sign = np.sign(trimmed.sum(axis=0))
    majority = np.sign(sign.sum())
    sign[sign == 0] = majority
    keep = np.where(sign[None] > 0, trimmed > 0, trimmed < 0)
    sel = trimmed * keep
    if merge == "mean":
        agg = sel.sum(axis=0) / np.clip((sel != 0).sum(axis=0), 1, None)
    else:
        agg = sel.sum(axis=0)
    out, start = {}, 0
    for n, s in zip(names, sizes):
        out[n] = (b[n].reshape(-1) + np.float32(scale) * agg[start : start + s]).reshape(b[n].shape)
        start += s
    return out, trimmed, ties_at_cut


@pytest.mark.parametrize("trim_scope", ["model", "tensor"])
@pytest.mark.parametrize("merge", ["mean", "sum"])
def test_ties_matches_reference(zoo, once, trim_scope, merge):
    base_sd, task_sds = zoo
    ref, trimmed, ties_at_cut = once(np_ties, 20.0, trim_scope, merge)
    assert ties_at_cut, "the zoo should put tied magnitudes at the trim cut"
    method = get_method("ties", trim_scope=trim_scope, merge=merge)
    assert method.stat_rounds == (3 if trim_scope == "model" else 1)
    assert_close_sd(once(in_memory, "ties", (("trim_scope", trim_scope), ("merge", merge))), ref, base_sd)


def test_ties_sign_ties_resolved_by_majority(zoo, once):
    base_sd, task_sds = zoo
    _, trimmed, _ = once(np_ties, 20.0, "model", "mean")
    tied = (trimmed.sum(axis=0) == 0) & (np.abs(trimmed).sum(axis=0) > 0)
    assert tied.sum() > 10, "the zoo should contain cancelling trimmed entries"
    params = compute_params(get_method("ties"), base_sd, task_sds)
    assert params["majority"] == float(np.sign(np.sign(trimmed.sum(axis=0)).sum()))
    assert params["majority"] != 0.0


@pytest.mark.parametrize("k", [100.0, 0.0, 50.0])
def test_ties_extreme_k(zoo, once, k):
    base_sd, task_sds = zoo
    ref, _, _ = once(np_ties, k, "model", "mean")
    assert_close_sd(merge_in_memory(get_method("ties", k=k), base_sd, task_sds), ref, base_sd)


# --------------------------------------------------------------------------- DARE


def test_dare_reproducible_and_order_independent(zoo):
    base_sd, task_sds = zoo
    m = get_method("dare", p=0.5, seed=7)
    a = merge_in_memory(m, base_sd, task_sds)
    b = merge_in_memory(get_method("dare", p=0.5, seed=7), base_sd, task_sds)
    rev_base = dict(reversed(list(base_sd.items())))
    rev_tasks = [dict(reversed(list(sd.items()))) for sd in task_sds]
    c = merge_in_memory(m, rev_base, rev_tasks)
    d = merge_in_memory(get_method("dare", p=0.5, seed=8), base_sd, task_sds)
    for name in base_sd:
        assert a[name].numpy().tobytes() == b[name].numpy().tobytes()
        assert a[name].numpy().tobytes() == c[name].numpy().tobytes()
    assert any(not torch.equal(a[n], d[n]) for n in base_sd)
    # The per-(task, tensor) seeds are distinct.
    seeds = {stable_seed(7, t, n) for t in range(N_TASKS) for n in base_sd}
    assert len(seeds) == N_TASKS * len(base_sd)


def test_dare_values(zoo):
    base_sd, task_sds = zoo
    p, s, seed = 0.6, 0.3, 3
    out = merge_in_memory(get_method("dare", p=p, seed=seed, scale=s), base_sd, task_sds)
    names, b, taus = np_inputs(base_sd, task_sds)
    dropped_total = kept_total = 0
    ref = {}
    for n in names:
        acc = np.zeros_like(b[n])
        for t in range(N_TASKS):
            tau = taus[n][t]
            d = dare_transform(torch.from_numpy(tau), p, stable_seed(seed, t, n)).numpy()
            nz = tau != 0
            keep = d != 0
            # Survivors are exactly τ/(1−p); dropped entries are 0.
            np.testing.assert_array_equal(d[keep], (tau[keep] / np.float32(1 - p)).astype(np.float32))
            dropped_total += int((nz & ~keep).sum())
            kept_total += int((nz & keep).sum())
            acc = acc + np.where(keep, tau / np.float32(1 - p), np.float32(0))
        ref[n] = b[n] + np.float32(s) * acc
    frac = dropped_total / (dropped_total + kept_total)
    assert abs(frac - p) < 0.05, frac  # ~2500 Bernoulli draws: 5 sigma ≈ 0.05
    assert_close_sd(out, ref, base_sd)


@pytest.mark.parametrize("norm_scope", ["model", "tensor"])
def test_dare_rescale_to_sum_norm(zoo, norm_scope):
    base_sd, task_sds = zoo
    s = 0.3
    out = merge_in_memory(
        get_method("dare", p=0.5, seed=1, rescale_to_sum_norm=True, norm_scope=norm_scope), base_sd, task_sds
    )
    names, b, taus = np_inputs(base_sd, task_sds)
    fp32 = [n for n in names if base_sd[n].dtype == torch.float32]
    deltas = {n: (out[n].numpy().astype(np.float64) - b[n]) for n in fp32}
    fulls = {n: np_seq_sum(taus[n]).astype(np.float64) for n in fp32}
    if norm_scope == "tensor":
        for n in fp32:
            np.testing.assert_allclose(np.linalg.norm(deltas[n]), s * np.linalg.norm(fulls[n]), rtol=1e-5)
    else:
        # Whole-model norm over every tensor, fp16 ones included (their delta before rounding).
        m = get_method("dare", p=0.5, seed=1, rescale_to_sum_norm=True)
        ratio = compute_params(m, base_sd, task_sds)["ratio"]
        full = math.sqrt(sum(float((np_seq_sum(taus[n]).astype(np.float64) ** 2).sum()) for n in names))
        proc = 0.0
        for n in names:
            acc = np.zeros_like(b[n])
            for t in range(N_TASKS):
                acc = acc + dare_transform(torch.from_numpy(taus[n][t]), 0.5, stable_seed(1, t, n)).numpy()
            proc += float((acc.astype(np.float64) ** 2).sum())
        np.testing.assert_allclose(ratio, full / math.sqrt(proc), rtol=1e-12)


# --------------------------------------------------------------------------- P-Discard thresholds (reference)


def np_thresholds(values: np.ndarray, alpha: float, cut: str) -> list[tuple[float, bool]]:
    """docs/MATH.md "Thresholds (P-Discard cut)" over positives (resp. |negatives|), as (t, inclusive): a
    magnitude is kept when > t, or >= t if inclusive. "exact": d = floor(α·n), t = d-th smallest, 0 if
    d = 0. "authors": K = int(n·(1−α)), kept >= the K-th largest, all of the sign when K = 0."""
    pos = values[values > 0]
    neg = -values[values < 0]
    out = []
    for side in (pos, neg):
        if cut == "authors":
            k = int(side.size * (1 - alpha))
            out.append((float(np.sort(side)[side.size - k]), True) if k > 0 else (0.0, False))
            continue
        d = math.floor(alpha * side.size)
        out.append((np_kth(side, d) if d > 0 else 0.0, False))
    return out


def _kept(m: np.ndarray, th: tuple[float, bool]) -> np.ndarray:
    return ((m >= th[0]) & (m > 0)) if th[1] else m > th[0]


def np_masks_of(base_sd, task_sds, alpha, scope):
    names, _, taus = np_inputs(base_sd, task_sds)
    return np_masks(names, taus, alpha, scope)


def np_masks(names, taus, alpha, scope):
    """Per task, per tensor: kept mask under scope tensor|model, each with its default cut (authors|exact)."""
    masks = {n: [] for n in names}
    for t in range(N_TASKS):
        if scope == "model":
            tp, tn = np_thresholds(np.concatenate([taus[n][t].reshape(-1) for n in names]), alpha, "exact")
        for n in names:
            tau = taus[n][t]
            if scope == "tensor":
                tp, tn = np_thresholds(tau.reshape(-1), alpha, "authors")
            masks[n].append(_kept(tau, tp) | _kept(-tau, tn))
    return masks


@pytest.mark.parametrize("scope", ["tensor", "model"])
@pytest.mark.parametrize("norm_scope", ["model", "tensor"])
def test_pdiscard_matches_reference(zoo, once, scope, norm_scope):
    base_sd, task_sds = zoo
    alpha, s = 0.6, 0.3
    names, b, taus = np_inputs(base_sd, task_sds)
    masks = once(np_masks_of, alpha, scope)
    psum = {n: np_seq_sum([np.where(masks[n][t], taus[n][t], 0) for t in range(N_TASKS)]) for n in names}
    full = {n: np_seq_sum(taus[n]) for n in names}
    ref = {}
    if norm_scope == "model":
        ratio = math.sqrt(sum(float((full[n].astype(np.float64) ** 2).sum()) for n in names)) / math.sqrt(
            sum(float((psum[n].astype(np.float64) ** 2).sum()) for n in names)
        )
    for n in names:
        if norm_scope == "tensor":
            den = float((psum[n].astype(np.float64) ** 2).sum())
            ratio = math.sqrt(float((full[n].astype(np.float64) ** 2).sum())) / math.sqrt(den) if den else 0.0
        ref[n] = b[n] + np.float32(s * ratio) * psum[n]
    method = get_method("pdiscard", alpha=alpha, scope=scope, norm_scope=norm_scope)
    assert_close_sd(merge_in_memory(method, base_sd, task_sds), ref, base_sd)


# --------------------------------------------------------------------------- EMR


def np_emr(base_sd, task_sds, lambda_mode):
    """Transcription of EMR_Merging's emr_merge (per tensor, then rescalers)."""
    names, b, taus = np_inputs(base_sd, task_sds)
    scales = np.zeros(N_TASKS)
    new_scales = np.zeros(N_TASKS)
    uni, masks = {}, {}
    for n in names:
        flag = (np_seq_sum(taus[n]) > 0) * 2 - 1
        pmax = np.zeros_like(b[n])
        masks[n] = []
        for t in range(N_TASKS):
            m = (taus[n][t] * flag) > 0
            masks[n].append(m)
            pabs = np.abs(m * taus[n][t])
            pmax = np.where(pabs > pmax, pabs, pmax)
            a = np.abs(taus[n][t]).astype(np.float64)  # the reference sums in fp32; we document float64
            scales[t] += a.mean() if lambda_mode == "tensor_mean" else a.sum()
        uni[n] = pmax * flag
    for t in range(N_TASKS):
        for n in names:
            p = np.abs(uni[n] * masks[n][t]).astype(np.float64)
            new_scales[t] += p.mean() if lambda_mode == "tensor_mean" else p.sum()
    lam = scales / new_scales
    outs = [{n: b[n] + np.float32(lam[t]) * (masks[n][t] * uni[n]).astype(np.float32) for n in names}
            for t in range(N_TASKS)]
    return outs, lam, uni, masks


@pytest.mark.parametrize("lambda_mode", ["tensor_mean", "element_sum"])
def test_emr_matches_reference(zoo, lambda_mode):
    base_sd, task_sds = zoo
    outs_ref, lam_ref, uni_ref, masks_ref = np_emr(base_sd, task_sds, lambda_mode)
    method = get_method("emr", lambda_mode=lambda_mode)
    lam = compute_params(method, base_sd, task_sds)
    np.testing.assert_allclose(lam, lam_ref, rtol=1e-12)
    outs = merge_in_memory(method, base_sd, task_sds)
    assert len(outs) == N_TASKS
    for out, ref in zip(outs, outs_ref):
        assert_close_sd(out, ref, base_sd)
    # The pieces exposed to artifacts/eval.
    names, b, taus = np_inputs(base_sd, task_sds)
    for n in names:
        tt = [torch.from_numpy(x) for x in taus[n]]
        u = unified_task_vector(tt)
        np.testing.assert_array_equal(u.numpy(), uni_ref[n] + 0.0)
        for m, mr in zip(task_masks(tt, u), masks_ref[n]):
            np.testing.assert_array_equal(m.numpy(), mr)


def test_emr_modes_differ_and_zero_sign_maps_to_negative():
    # Two tensors of very different sizes make the two λ modes disagree.
    base = {"big": torch.zeros(100), "small": torch.zeros(2)}
    t0 = {"big": torch.full((100,), 0.1), "small": torch.tensor([1.0, -1.0])}
    t1 = {"big": torch.full((100,), 0.2), "small": torch.tensor([-1.0, 1.0])}
    lam_mean = compute_params(get_method("emr"), base, [t0, t1])
    lam_sum = compute_params(get_method("emr", lambda_mode="element_sum"), base, [t0, t1])
    assert lam_mean != pytest.approx(lam_sum)
    # In "small" the sums are 0 → elected sign −1 → only the negative entries are kept.
    u = unified_task_vector([t0["small"], t1["small"]])
    assert u.tolist() == [-1.0, -1.0]
    m0, m1 = task_masks([t0["small"], t1["small"]], u)
    assert m0.tolist() == [False, True] and m1.tolist() == [True, False]


# --------------------------------------------------------------------------- T-Switch


@pytest.mark.parametrize("scope", ["tensor", "model"])
@pytest.mark.parametrize("knob", ["rms", "mean"])
def test_tswitch_reconstruction(zoo, once, scope, knob):
    base_sd, task_sds = zoo
    alpha = 0.6
    names, b, taus = np_inputs(base_sd, task_sds)
    masks = once(np_masks_of, alpha, scope)

    def np_knob(vals):
        if vals.size == 0:
            return 0.0
        v = np.abs(vals.astype(np.float64))
        return math.sqrt((v**2).sum() / v.size) if knob == "rms" else v.sum() / v.size

    refs = []
    for t in range(N_TASKS):
        if scope == "model":
            lam = np_knob(np.concatenate([taus[n][t][masks[n][t]] for n in names]))
        ref = {}
        for n in names:
            if scope == "tensor":
                lam = np_knob(taus[n][t][masks[n][t]])
            sgn = np.where(taus[n][t] > 0, np.float32(1), np.float32(-1))
            ref[n] = b[n] + np.float32(lam) * np.where(masks[n][t], sgn, np.float32(0))
        refs.append(ref)
    method = get_method("tswitch", alpha=alpha, scope=scope, knob=knob)
    outs = merge_in_memory(method, base_sd, task_sds)
    for out, ref in zip(outs, refs):
        assert_close_sd(out, ref, base_sd)
    # Zeros are never kept: where τ = 0 the output equals θ0 exactly.
    for t in range(N_TASKS):
        for n in names:
            zero = taus[n][t] == 0
            assert torch.equal(outs[t][n][torch.from_numpy(zero)], base_sd[n][torch.from_numpy(zero)])


# --------------------------------------------------------------------------- sharding


CONFIGS = [
    ("avg", {}),
    ("ta", {}),
    ("ties", {}),
    ("ties", {"trim_scope": "tensor", "merge": "sum"}),
    ("dare", {"rescale_to_sum_norm": True}),
    ("pdiscard", {"scope": "model"}),
    ("pdiscard", {"norm_scope": "tensor"}),
    ("emr", {}),
    ("emr", {"lambda_mode": "element_sum"}),
    ("tswitch", {}),
    ("tswitch", {"scope": "model", "knob": "mean"}),
]


def _sharded_merge(method, base_sd, task_sds, shards, combine_order):
    """What the Ray executor does: stats per shard, combine over all tensors in a fixed order."""
    params = None
    for r in range(method.stat_rounds):
        by_name = {}
        for shard in shards:
            for name in shard:
                taus = [sd[name].to(torch.float32) - base_sd[name].to(torch.float32) for sd in task_sds]
                by_name[name] = method.tensor_stats(r, name, base_sd[name], taus, params)
        params = method.combine(r, [by_name[n] for n in combine_order], params)
    out = {}
    for shard in reversed(shards):  # merge order must not matter either
        for name in shard:
            taus = [sd[name].to(torch.float32) - base_sd[name].to(torch.float32) for sd in task_sds]
            out[name] = method.merge_tensor(name, base_sd[name], taus, params)
    return out


@pytest.mark.parametrize("name,opts", CONFIGS, ids=[f"{n}-{'-'.join(map(str, o.values())) or 'default'}" for n, o in CONFIGS])
def test_sharded_equals_in_memory_bytes(zoo, once, name, opts):
    base_sd, task_sds = zoo
    method = get_method(name, **opts)
    whole = once(in_memory, name, tuple(sorted(opts.items())))
    names = list(base_sd)
    shards = [names[:2], names[2:]]
    for order in (names, list(reversed(names))):
        sharded = _sharded_merge(get_method(name, **opts), base_sd, task_sds, shards, order)
        for n in names:
            if method.per_task:
                for t in range(N_TASKS):
                    assert whole[t][n].numpy().tobytes() == sharded[n][t].numpy().tobytes(), (n, t, order[0])
            else:
                assert whole[n].numpy().tobytes() == sharded[n].numpy().tobytes(), (n, order[0])


# --------------------------------------------------------------------------- registry and errors


def test_registry_and_options():
    merges = {i.name for i in registered() if i.kind.is_merge}
    assert merges == {"avg", "ta", "ties", "dare", "pdiscard", "emr", "tswitch"}
    assert get_method("Task-Arithmetic").name == "ta"
    assert get_method_info("ties").defaults() == {"k": 20.0, "trim_scope": "model", "merge": "mean", "scale": 0.3}
    # cut: the default of the default scope (tensor); scope "model" alone makes it "exact".
    assert get_method_info("tswitch").defaults() == {"alpha": 0.6, "scope": "tensor", "cut": "authors", "knob": "rms"}
    assert get_method("emr").per_task and not get_method("ties").per_task
    for info in registered():  # the kind a merge declares is what its MergeMethod does
        if info.kind.is_merge:
            assert get_method(info.name).per_task == (info.kind is MethodKind.PER_TASK), info.name
    with pytest.raises(ConfigError, match="unknown method 'fisher'; choose one of .*ties"):
        get_method("fisher")
    with pytest.raises(ConfigError, match="no option"):
        get_method("ta", alpha=0.5)
    with pytest.raises(ConfigError, match="option 'merge'"):
        get_method("ties", merge="median")
    with pytest.raises(ConfigError, match="option 'alpha'"):
        get_method("tswitch", alpha=1.0)
    with pytest.raises(ConfigError, match="option 'p'"):
        get_method("dare", p=1.0)
    with pytest.raises(ConfigError, match="option 'seed'.*integer"):
        get_method("dare", seed=0.5)
    with pytest.raises(ConfigError, match="option 'scale'.*not a boolean"):
        get_method("ta", scale=True)
    with pytest.raises(ConfigError, match="'autoswitch' is not a state-dict merge"):
        get_method("autoswitch")


def test_merge_in_memory_rejects_mismatched_models(zoo):
    base_sd, task_sds = zoo
    broken = dict(task_sds[1])
    del broken["grid.b"]
    with pytest.raises(ZooError, match="grid.b"):
        merge_in_memory(get_method("ta"), base_sd, [task_sds[0], broken])
    reshaped = dict(task_sds[1])
    reshaped["grid.b"] = torch.zeros(61)
    with pytest.raises(ZooError, match="shape"):
        merge_in_memory(get_method("ta"), base_sd, [task_sds[0], reshaped])
