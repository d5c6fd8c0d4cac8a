"""WEMoE / E-WEMoE (paper 002): upscaled MLPs, routers, pruning, entropy TTA."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from tswitch_ray.errors import ConfigError
from tswitch_ray.methods.wemoe import (
    WeightEnsemblingMLP,
    WemoeRouter,
    entropy_loss,
    prune_task_vector,
    tta_step,
    upscale_mlps,
)

D, H, T = 8, 16, 3


def make_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, H), nn.GELU(), nn.Linear(H, D))


def make_task_vectors(mlp: nn.Module, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{n: torch.randn(p.shape, generator=g) * 0.1 for n, p in mlp.named_parameters()} for _ in range(T)]


def ta_mlp(mlp: nn.Module, tvs, lam) -> nn.Module:
    """The Task-Arithmetic MLP θ0 + Σ λi τi, built with plain state-dict arithmetic."""
    merged = copy.deepcopy(mlp)
    sd = {n: p.detach().clone() for n, p in mlp.named_parameters()}
    for i, tv in enumerate(tvs):
        for n in sd:
            sd[n] = sd[n] + float(lam[i]) * tv[n]
    merged.load_state_dict(sd)
    return merged


def force_constant(router: WemoeRouter, lam) -> None:
    with torch.no_grad():
        router.fc1.weight.zero_()
        router.fc1.bias.copy_(torch.tensor(lam))


@pytest.mark.parametrize("batched", ["vmap", "loop"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_constant_router_equals_task_arithmetic(batched, batch_first):
    mlp = make_mlp()
    tvs = make_task_vectors(mlp)
    lam = [0.3, -0.2, 0.7]
    moe = WeightEnsemblingMLP(copy.deepcopy(mlp), tvs, router_hidden=5, init_lambda=0.3,
                              batch_first=batch_first, batched=batched)
    force_constant(moe.router, lam)
    x = torch.randn(4, 6, D)  # [B, N, D]
    inp = x if batch_first else x.transpose(0, 1)
    out = moe(inp)
    out = out if batch_first else out.transpose(0, 1)
    ref = ta_mlp(mlp, tvs, lam)(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_per_sample_routing_and_batch_reduce():
    mlp = make_mlp()
    tvs = make_task_vectors(mlp)
    moe = WeightEnsemblingMLP(copy.deepcopy(mlp), tvs, router_hidden=32, init_lambda=0.3, init_std=0.5)
    x = torch.randn(3, 5, D)
    out = moe(x)
    for b in range(3):
        # eq. 9: λ = mean over tokens of the router outputs, then the TA MLP for this sample alone.
        lam = moe.router(x[b]).mean(0).tolist()
        torch.testing.assert_close(out[b], ta_mlp(mlp, tvs, lam)(x[b]), rtol=1e-5, atol=1e-6)
    lams = [moe.router(x[b]).mean(0) for b in range(3)]
    assert not torch.allclose(lams[0], lams[1])
    moe_loop = WeightEnsemblingMLP(copy.deepcopy(mlp), tvs, 32, 0.3, shared_router=moe.router, batched="loop")
    assert moe_loop.router is moe.router
    torch.testing.assert_close(moe(x), moe_loop(x), rtol=1e-5, atol=1e-6)
    # token_pool="input": the router sees the mean token.
    moe_in = WeightEnsemblingMLP(copy.deepcopy(mlp), tvs, 32, 0.3, shared_router=moe.router, token_pool="input")
    lam0 = moe.router(x[0].mean(0)).tolist()
    torch.testing.assert_close(moe_in(x)[0], ta_mlp(mlp, tvs, lam0)(x[0]), rtol=1e-5, atol=1e-6)
    # batch_reduce: one λ for the batch, the mean of the per-sample ones.
    moe_red = WeightEnsemblingMLP(copy.deepcopy(mlp), tvs, 32, 0.3, shared_router=moe.router, batch_reduce=True)
    lam_mean = torch.stack(lams).mean(0).tolist()
    torch.testing.assert_close(moe_red(x), ta_mlp(mlp, tvs, lam_mean)(x), rtol=1e-5, atol=1e-6)


def test_router_initialisation():
    torch.manual_seed(0)
    r = WemoeRouter(512, 256, T, init_lambda=0.3)
    assert torch.all(r.fc0.bias == 0) and torch.all(r.fc1.bias == 0.3)
    # W ~ N(0, 0.01): variance 0.01, i.e. std 0.1 (131 072 samples).
    assert abs(float(r.fc0.weight.detach().std()) - 0.1) < 0.003
    assert abs(float(r.fc0.weight.detach().mean())) < 0.003
    # Near-zero weights: initial routing weights are close to λ (Task Arithmetic).
    r1 = WemoeRouter(D, 4, T, init_lambda=0.3, init_std=1e-4)
    np.testing.assert_allclose(r1(torch.randn(2, D)).detach().numpy(), 0.3, atol=1e-3)
    r0 = WemoeRouter(D, 4, T, init_lambda=0.3, depth=0)
    assert r0(torch.randn(2, 5, D)).shape == (2, 5, T)


def test_prune_task_vector_keeps_exact_count():
    rng = np.random.default_rng(0)
    # Grid values: many ties at the cut.
    tau = torch.from_numpy(rng.integers(-20, 21, size=(37, 29)).astype(np.float32) / 8)
    n = tau.numel()
    for frac in (0.1, 0.01):
        pruned = prune_task_vector(tau, frac)
        kept = pruned != 0
        k = int(round(frac * n))
        # Exactly k entries kept (none of them a zero of τ here: 0 is never in the top 10 %).
        assert int(kept.sum()) == k
        assert torch.equal(pruned[kept], tau[kept])
        assert float(tau[kept].abs().min()) >= float(tau[~kept].abs().max())
    assert torch.equal(prune_task_vector(tau, 1.0), tau)
    assert int((prune_task_vector(tau, 0.0) != 0).sum()) == 0


class Block(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.attn = nn.Linear(D, D)
        self.mlp = make_mlp(seed)

    def forward(self, x):
        return x + self.mlp(self.attn(x))


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(1), Block(2)])
        self.head = nn.Linear(D, 4)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x.mean(1))


def test_upscale_mlps_wemoe_and_ewemoe():
    model = Tiny()
    paths = ["blocks.0.mlp", "blocks.1.mlp"]
    tvs = {p: make_task_vectors(model.get_submodule(p), seed=i) for i, p in enumerate(paths)}
    x = torch.randn(2, 5, D)
    wemoe = copy.deepcopy(model)
    mods = upscale_mlps(wemoe, paths, tvs, router_hidden=6, init_lambda=0.3)
    assert all(isinstance(wemoe.get_submodule(p), WeightEnsemblingMLP) for p in paths)
    assert mods["blocks.0.mlp"].router is not mods["blocks.1.mlp"].router
    # Constant λ everywhere: the upscaled model is the Task-Arithmetic model on those MLPs.
    lam = [0.3, 0.1, -0.4]
    for m in mods.values():
        force_constant(m.router, lam)
    ta = copy.deepcopy(model)
    for p in paths:
        parent, attr = p.rsplit(".", 1)
        setattr(ta.get_submodule(parent), attr, ta_mlp(model.get_submodule(p), tvs[p], lam))
    torch.testing.assert_close(wemoe(x), ta(x), rtol=1e-5, atol=1e-6)

    ewemoe = copy.deepcopy(model)
    mods = upscale_mlps(ewemoe, paths, tvs, router_hidden=6, init_lambda=0.3, shared_router=True, keep_fraction=0.1)
    assert mods["blocks.0.mlp"].router is mods["blocks.1.mlp"].router
    router_params = {id(p) for p in mods["blocks.0.mlp"].router.parameters()}
    assert len(router_params) == len([p for p in ewemoe.parameters() if p.requires_grad and id(p) in router_params])
    for p, m in mods.items():
        for name, param in m.base_mlp.named_parameters():
            stacked = getattr(m, "tv__" + name.replace(".", "__"))
            for i in range(T):
                assert int((stacked[i] != 0).sum()) == int(round(0.1 * param.numel()))
    with pytest.raises(ConfigError, match="no submodule"):
        upscale_mlps(copy.deepcopy(model), ["blocks.5.mlp"], {"blocks.5.mlp": tvs[paths[0]]}, 6, 0.3)


def test_entropy_loss_and_tta_step():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    p = np.exp(logits.numpy()) / np.exp(logits.numpy()).sum(1, keepdims=True)
    ref = float(np.mean(-(p * np.log(p)).sum(1)))
    assert float(entropy_loss(logits)) == pytest.approx(ref, rel=1e-6)

    model = Tiny()
    paths = ["blocks.0.mlp", "blocks.1.mlp"]
    tvs = {p: make_task_vectors(model.get_submodule(p), seed=i) for i, p in enumerate(paths)}
    upscale_mlps(model, paths, tvs, router_hidden=6, init_lambda=0.3, shared_router=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if "router" not in n}
    # TTA trains the routers only; the rest of the model is frozen by the caller (eval).
    for n, p in model.named_parameters():
        if "router" not in n:
            p.requires_grad_(False)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    batch = torch.randn(8, 5, D)
    losses = [tta_step(model, lambda m, b: m(b), batch, opt) for _ in range(15)]
    assert losses[-1] < losses[0]
    for n, p in model.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n])
    assert trainable
