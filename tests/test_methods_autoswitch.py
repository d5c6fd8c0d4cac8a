"""Auto-Switch (paper 000 eq. 8): kNN switch weights, grouping and switch combination."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tswitch_ray.errors import ConfigError
from tswitch_ray.methods.autoswitch import autoswitch_weights, combine_switches, group_by_weights
from tswitch_ray.switch import binarize, kept_stats, knob, reconstruct, tensor_thresholds


def line(*xs: float) -> torch.Tensor:
    return torch.tensor([[x, 0.0] for x in xs])


def test_clusters_give_obvious_weights():
    # Task 0 near x=0, task 1 near x=10, task 2 near x=20 (2-D features on a line).
    q = line(0, 1, 2, 10, 11, 12, 20, 21, 22)
    ids = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    x = line(1, 11, 21, 3)
    w = autoswitch_weights(q, ids, x, k=3, n_tasks=3)
    assert w.dtype == torch.float32 and w.shape == (4, 3)
    assert w[0].tolist() == [1.0, 0.0, 0.0]
    assert w[1].tolist() == [0.0, 1.0, 0.0]
    assert w[2].tolist() == [0.0, 0.0, 1.0]
    # x=3 with k=4: the three task-0 points (distances 3, 2, 1), then x=10 (distance 7).
    w4 = autoswitch_weights(q, ids, line(3), k=4, n_tasks=3)
    assert w4[0].tolist() == [0.75, 0.25, 0.0]


def test_ties_go_to_the_lower_query_index():
    x = line(0)
    # Equidistant neighbours at -1 (task 0) and +1 (task 1); k=1 picks the lower index.
    w = autoswitch_weights(line(1, -1), torch.tensor([1, 0]), x, k=1, n_tasks=2)
    assert w[0].tolist() == [0.0, 1.0]
    w = autoswitch_weights(line(-1, 1), torch.tensor([0, 1]), x, k=1, n_tasks=2)
    assert w[0].tolist() == [1.0, 0.0]
    # Three equidistant points, k=2: indices 0 and 1 win whatever their tasks.
    w = autoswitch_weights(torch.tensor([[0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]]), torch.tensor([2, 1, 0]), x, k=2)
    assert w[0].tolist() == [0.0, 0.5, 0.5]


def test_matches_numpy_brute_force():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(120, 16)).astype(np.float32)
    ids = rng.integers(0, 5, size=120)
    x = rng.normal(size=(37, 16)).astype(np.float32)
    k = 10
    d = np.sqrt(((x[:, None, :].astype(np.float64) - q[None].astype(np.float64)) ** 2).sum(-1))
    nn_idx = np.argsort(d, axis=1, kind="stable")[:, :k]
    ref = np.zeros((37, 5))
    for b in range(37):
        for j in nn_idx[b]:
            ref[b, ids[j]] += 1 / k
    w = autoswitch_weights(torch.from_numpy(q), torch.from_numpy(ids), torch.from_numpy(x), k=k, n_tasks=5)
    np.testing.assert_allclose(w.numpy(), ref, rtol=0, atol=1e-7)
    np.testing.assert_allclose(w.sum(1).numpy(), 1.0, atol=1e-6)
    avg = autoswitch_weights(torch.from_numpy(q), torch.from_numpy(ids), torch.from_numpy(x), k=k, n_tasks=5,
                             average_over_batch=True)
    np.testing.assert_allclose(avg.numpy(), np.broadcast_to(ref.mean(0), ref.shape), atol=1e-6)


def test_group_by_weights():
    w = torch.tensor([[1.0, 0.0], [0.5, 0.5], [1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    groups = group_by_weights(w)
    assert [g[0].tolist() for g in groups] == [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]
    assert [g[1].tolist() for g in groups] == [[0, 2], [1, 4], [3]]


def _switch(tau: torch.Tensor, alpha: float = 0.5):
    th = tensor_thresholds(tau, [alpha])[0]
    mask, positive = binarize(tau, th)
    return mask, positive, knob(kept_stats(tau, mask), "rms")


def test_combine_switches():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(50, 3, generator=g)
    taus = [torch.randn(50, 3, generator=g) * 0.01 for _ in range(3)]
    switches = [_switch(t) for t in taus]
    w = [0.5, 0.0, 0.25]
    out = combine_switches(base, switches, w)
    ref = base.numpy().copy()
    for (mask, pos, lam), wt in zip(switches, w):
        ref = ref + np.float32(wt * lam) * np.where(mask.numpy(), np.where(pos.numpy(), 1.0, -1.0), 0.0).astype(np.float32)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-6, atol=1e-7)
    # A one-hot weight vector is exactly the T-Switch reconstruction of that task.
    for t, (mask, pos, lam) in enumerate(switches):
        onehot = torch.zeros(3)
        onehot[t] = 1.0
        assert torch.equal(combine_switches(base, switches, onehot), reconstruct(base, mask, pos, lam))
    half = base.half()
    assert combine_switches(half, switches, w).dtype == torch.float16


def test_bad_inputs():
    q, ids = line(0, 1), torch.tensor([0, 1])
    with pytest.raises(ConfigError, match="k must be"):
        autoswitch_weights(q, ids, line(0), k=3)
    with pytest.raises(ConfigError, match="dimension"):
        autoswitch_weights(q, ids, torch.zeros(1, 3), k=1)
    with pytest.raises(ConfigError, match="task ids"):
        autoswitch_weights(q, torch.tensor([0]), line(0), k=1)
    with pytest.raises(ConfigError, match="weights"):
        combine_switches(torch.zeros(2), [], [1.0])


def _combine_from_masks(base, switches, weights):
    """θ0 + Σ wt·λt·Mt⊙St written with boolean masks and float sign planes (the formulation before int8 planes)."""
    acc = base.to(torch.float32)
    for (mask, positive, knob), wt in zip(switches, weights, strict=True):
        if wt == 0.0:
            continue
        signed = torch.where(positive, 1.0, -1.0)
        acc = acc + (wt * float(knob)) * torch.where(mask, signed, 0.0).reshape(acc.shape)
    return acc.to(base.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_int8_planes_give_the_mask_formulation_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(300, 37, generator=g) * 0.02).to(dtype)
    base[0, :4] = torch.tensor([0.0, -0.0, float("nan"), float("inf")]).to(dtype)
    sw = [(torch.rand(300, 37, generator=g) < 0.4, torch.rand(300, 37, generator=g) < 0.5,
           float(torch.rand(1, generator=g)) * 0.01 + 1e-4) for _ in range(5)]
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    for w in ([0.1, 0.2, 0.0, 0.4, 0.3], [1.0, 0, 0, 0, 0], [0.2] * 5, [0.3, 0.7, 0, 0, 0]):
        assert torch.equal(combine_switches(base, sw, w).view(bits), _combine_from_masks(base, sw, w).view(bits))
