"""WEMoE / E-WEMoE evaluation driver (paper 002), single process.

Specified in docs/MATH.md "WEMoE and E-WEMoE" (paper 002 eqs. 4, 9–11, 15).

The Ray runner calls :func:`evaluate_wemoe` inside one task. The modules and
formulas are :mod:`tswitch_ray.methods.wemoe`; this module builds the model,
runs test-time adaptation and scores it:

1. **Static part** (paper 002 eq. 4): every weight merged by Task Arithmetic,
   θ0 + λ·Σi τi with λ = ``init_lambda`` = 0.3 (Sec. IV-A, AdaMerging's
   setting) — ``methods.task_arithmetic`` via ``merge_in_memory``.
2. **MLPs** (eq. 9): each Transformer block's MLP is found generically
   (:func:`find_mlp_paths`: open_clip ``ResidualAttentionBlock.mlp`` /
   ``CustomResidualAttentionBlock.mlp``, HF ``CLIPEncoderLayer.mlp``; or pass
   ``mlp_paths``), reset to its pretrained weights θ0 and replaced by a
   :class:`~tswitch_ray.methods.wemoe.WeightEnsemblingMLP` holding the task
   vectors τi of that MLP (read by loading each fine-tuned state dict into a
   scratch model through the adapter, so any key layout the adapter accepts
   works).
3. **Router init** (Sec. III-B2): 2-layer router, W ~ N(0, σ²) with
   σ = ``router_init_std`` = 0.1 (variance 0.01, as the paper says), b0 = 0,
   b1 = λ. ``router_init_std=0`` makes λ(x) ≡ λ exactly, i.e. Task Arithmetic.
   Hidden width ``router_hidden``: the paper gives none; default = the MLP's
   input width (FusionBench's choice).
4. **TTA** (eq. 11): Adam on the router parameters only, minimising the
   prediction entropy on unlabeled inputs; step s uses one batch of task
   ``tasks[s % T]`` (round-robin, each task's own head; the split is cycled).
   ``tta_steps`` = 200: paper 002 Fig. 12 shows TTA converged by about 200
   steps. ``lr`` = 1e-4, ``batch_size`` = 16: not in the paper; FusionBench's
   defaults (which run 1000 steps, each step one batch of *every* task).
5. **E-WEMoE** (Sec. III-C): ``variant="e-wemoe"`` prunes the MLP task
   vectors to their ``keep_fraction`` largest magnitudes (default 0.1, i.e.
   E-WEMoE-90 %, the paper's default ρ; 0.01 for 99 %) and shares one router
   across all layers.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tswitch_ray.device import pick_device
from tswitch_ray.errors import ConfigError
from tswitch_ray.eval.adapters import ModelAdapter
from tswitch_ray.eval.datasets import EvalDataset
from tswitch_ray.eval.evaluate import evaluate
from tswitch_ray.methods.base import merge_in_memory
from tswitch_ray.methods.task_arithmetic import TaskArithmetic
from tswitch_ray.methods.wemoe import WeightEnsemblingMLP, _first_linear_in_features, entropy_loss, tta_step, upscale_mlps

Tensor = torch.Tensor

VARIANTS = ("wemoe", "e-wemoe")
# Transformer-block classes whose ``.mlp`` attribute is the block's MLP.
MLP_BLOCK_CLASSES = ("ResidualAttentionBlock", "CustomResidualAttentionBlock", "CLIPEncoderLayer")
# E-WEMoE's default ρ = 90 % pruned (paper 002 Sec. III-C).
EWEMOE_KEEP_FRACTION = 0.1


def find_mlp_paths(model: nn.Module) -> list[str]:
    """Dotted paths of the Transformer MLPs to upscale (``<block>.mlp``), in module order.

    ``ConfigError`` naming the model class when the model has no block of a
    known layout (:data:`MLP_BLOCK_CLASSES`).
    """
    declared = getattr(type(model), "MLP_PATHS", None)  # an architecture that is no Transformer names its own
    if declared:
        return list(declared)
    paths = []
    for name, module in model.named_modules():
        if type(module).__name__ in MLP_BLOCK_CLASSES and isinstance(getattr(module, "mlp", None), nn.Module):
            paths.append(f"{name}.mlp" if name else "mlp")
    if not paths:
        raise ConfigError(
            f"wemoe: no Transformer MLP found in model class {type(model).__name__}: WEMoE upscales the `.mlp` of "
            f"blocks of class {', '.join(MLP_BLOCK_CLASSES)} (open_clip, Hugging Face CLIP). "
            "Pass mlp_paths=[...] (dotted module paths) for another architecture."
        )
    return paths


def _batch_first(model: nn.Module, mlp_path: str) -> bool:
    """Token layout at ``mlp_path``: the nearest enclosing module with a ``batch_first`` attribute decides (default True)."""
    parts = mlp_path.split(".")
    for i in range(len(parts) - 1, -1, -1):
        mod = model.get_submodule(".".join(parts[:i])) if i else model
        bf = getattr(mod, "batch_first", None)
        if isinstance(bf, bool):
            return bf
    return True


def _mlp_params(model: nn.Module, paths: Sequence[str]) -> dict[str, dict[str, Tensor]]:
    return {p: {n: t.detach().to(torch.float32).clone() for n, t in model.get_submodule(p).named_parameters()} for p in paths}


def _routers(mlps: Mapping[str, WeightEnsemblingMLP]) -> list[nn.Module]:
    seen: dict[int, nn.Module] = {}
    for m in mlps.values():
        seen.setdefault(id(m.router), m.router)
    return list(seen.values())


def _cycle(adapter: ModelAdapter, dataset: EvalDataset, batch_size: int, limit: int | None) -> Iterator[Tensor]:
    while True:
        empty = True
        for raw in dataset.batches(batch_size, require_labels=False, limit=limit):
            empty = False
            yield adapter.collate(raw.items)
        if empty:
            raise ConfigError(f"wemoe: the test-time adaptation split {getattr(dataset, 'uri', '?')} has no rows.")


def _default_keep_fraction(variant: str, keep_fraction: float | None) -> float | None:
    if variant == "e-wemoe" and keep_fraction is None:
        return EWEMOE_KEEP_FRACTION
    return keep_fraction


# ---------------------------------------------------------------- building the upscaled model


@dataclass(frozen=True)
class MlpTaskVectors:
    """Every upscaled MLP's pretrained parameters θ0 and task vectors τi (fp32), by MLP path, in module order."""

    paths: list[str]
    base: dict[str, dict[str, Tensor]]
    task_vectors: dict[str, list[dict[str, Tensor]]]


def mlp_task_vectors(
    adapter: ModelAdapter,
    base_sd: Mapping[str, Tensor],
    task_sds: Sequence[Mapping[str, Tensor]],
    mlp_paths: Sequence[str] | None = None,
) -> MlpTaskVectors:
    """Step 2's inputs: θ0 and τi = θi − θ0 of each MLP, read through the adapter (any key layout it accepts).

    Each fine-tuned state dict is loaded into one scratch model in turn.
    ``mlp_paths`` default: :func:`find_mlp_paths`.
    """
    scratch = adapter.build(base_sd)
    paths = list(mlp_paths) if mlp_paths is not None else find_mlp_paths(scratch)
    for p in paths:
        try:
            scratch.get_submodule(p)
        except AttributeError as e:
            raise ConfigError(f"wemoe: model class {type(scratch).__name__} has no submodule {p!r} to upscale.") from e
    base_mlp = _mlp_params(scratch, paths)
    tvs: dict[str, list[dict[str, Tensor]]] = {p: [] for p in paths}
    for sd in task_sds:
        adapter.load(scratch, sd)
        for p, params in _mlp_params(scratch, paths).items():
            tvs[p].append({n: v - base_mlp[p][n] for n, v in params.items()})
    return MlpTaskVectors(paths, base_mlp, tvs)


def _static_model(
    adapter: ModelAdapter,
    base_sd: Mapping[str, Tensor],
    task_sds: Sequence[Mapping[str, Tensor]],
    init_lambda: float,
    mlps: MlpTaskVectors,
) -> nn.Module:
    """Step 1: the Task Arithmetic merge θ0 + λ·Σi τi, its MLPs reset to θ0 (they become θ0 + Σ λi(x) τi); all frozen."""
    merged = merge_in_memory(TaskArithmetic(scale=init_lambda), base_sd, task_sds)
    model = adapter.build(merged)
    del merged
    with torch.no_grad():
        for p in mlps.paths:
            for n, t in model.get_submodule(p).named_parameters():
                t.copy_(mlps.base[p][n].to(t.dtype))
    for prm in model.parameters():
        prm.requires_grad_(False)
    return model


def _router_width(model: nn.Module, first_mlp: str, router_hidden: int | None) -> int:
    """Step 3's hidden width: ``router_hidden``, else the first MLP's input width (FusionBench's choice)."""
    if router_hidden is not None:
        return router_hidden
    return _first_linear_in_features(model.get_submodule(first_mlp))


def _upscale(
    model: nn.Module,
    mlps: MlpTaskVectors,
    hidden: int,
    init_lambda: float,
    *,
    variant: str,
    keep_fraction: float | None,
    seed: int,
    opts: dict[str, Any],
) -> dict[str, WeightEnsemblingMLP]:
    """Steps 2, 3 and 5: replace each MLP by a :class:`WeightEnsemblingMLP`, routers seeded by ``seed``.

    :func:`upscale_mlps` takes one token layout per call, so MLPs are upscaled
    per layout (``opts["batch_first"]`` forces one for all); E-WEMoE's shared
    router is created by the first call and handed to the others.
    """
    paths, opts = mlps.paths, dict(opts)
    if "batch_first" in opts:
        forced = opts.pop("batch_first")
        layouts = {p: forced for p in paths}
    else:
        layouts = {p: _batch_first(model, p) for p in paths}
    out: dict[str, WeightEnsemblingMLP] = {}
    shared: bool | nn.Module = variant == "e-wemoe"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for bf in sorted(set(layouts.values())):
            group = [p for p in paths if layouts[p] == bf]
            made = upscale_mlps(model, group, {p: mlps.task_vectors[p] for p in group}, hidden, init_lambda,
                                shared_router=shared, keep_fraction=keep_fraction, batch_first=bf, **opts)
            out.update(made)
            if variant == "e-wemoe" and not isinstance(shared, nn.Module):
                shared = next(iter(made.values())).router  # one router for every layer, whatever the layout
    return {p: out[p] for p in paths}


def build_wemoe_model(
    adapter: ModelAdapter,
    base_sd: Mapping[str, Tensor],
    task_sds: Sequence[Mapping[str, Tensor]],
    *,
    variant: str = "wemoe",
    keep_fraction: float | None = None,
    init_lambda: float = 0.3,
    router_hidden: int | None = None,
    router_init_std: float = 0.1,
    router_depth: int = 2,
    mlp_paths: Sequence[str] | None = None,
    seed: int = 0,
    **mlp_options: Any,
) -> tuple[nn.Module, dict[str, WeightEnsemblingMLP]]:
    """The upscaled model before adaptation (steps 1–3 and 5 of the module docstring).

    Returns the model (on CPU, all parameters frozen except the routers) and
    its :class:`WeightEnsemblingMLP` modules by path.
    """
    if variant not in VARIANTS:
        raise ConfigError(f"wemoe: variant must be one of {VARIANTS}, got {variant!r}.")
    if not task_sds:
        raise ConfigError("wemoe: at least one fine-tuned state dict is needed.")
    keep_fraction = _default_keep_fraction(variant, keep_fraction)
    mlp_tvs = mlp_task_vectors(adapter, base_sd, task_sds, mlp_paths)
    model = _static_model(adapter, base_sd, task_sds, init_lambda, mlp_tvs)
    opts = dict(mlp_options)
    opts.setdefault("init_std", router_init_std)
    opts.setdefault("router_depth", router_depth)
    hidden = _router_width(model, mlp_tvs.paths[0], router_hidden)
    mlps = _upscale(model, mlp_tvs, hidden, init_lambda, variant=variant, keep_fraction=keep_fraction, seed=seed, opts=opts)
    for r in _routers(mlps):
        for prm in r.parameters():
            prm.requires_grad_(True)
    return model, mlps


# ---------------------------------------------------------------- adaptation and scoring


def adapt_routers(
    adapter: ModelAdapter,
    model: nn.Module,
    routers: Sequence[nn.Module],
    tasks: Sequence[str],
    tta_sets: Mapping[str, EvalDataset],
    *,
    tta_steps: int,
    lr: float,
    batch_size: int,
    tta_limit: int | None,
    device: torch.device,
    progress: Callable[[int, int], None] | None = None,
) -> list[float]:
    """Step 4 (eq. 11): ``tta_steps`` Adam steps on the routers, step s on one batch of ``tasks[s % T]``.

    docs/MATH.md "WEMoE and E-WEMoE" (paper 002 eq. 11). Each task's split
    (first ``tta_limit`` rows) is cycled; returns each step's entropy before
    its update.
    """
    losses: list[float] = []
    if not tta_steps:
        return losses
    opt = torch.optim.Adam([p for r in routers for p in r.parameters()], lr=lr)
    streams = {t: _cycle(adapter, tta_sets[t], batch_size, tta_limit) for t in tasks}
    for step, t in zip(range(tta_steps), itertools.cycle(tasks)):
        x = next(streams[t]).to(device)
        losses.append(tta_step(model, lambda m, xb, _t=t: adapter.logits(m, xb, _t), x, opt))
        if progress is not None:
            progress(step + 1, tta_steps)
    return losses


def _adapt_and_measure(
    adapter: ModelAdapter,
    model: nn.Module,
    routers: Sequence[nn.Module],
    tasks: Sequence[str],
    tta_sets: Mapping[str, EvalDataset],
    *,
    tta_steps: int,
    lr: float,
    batch_size: int,
    tta_limit: int | None,
    device: torch.device,
    progress: Callable[[int, int], None] | None,
    measure_entropy: bool,
    eval_batch_size: int,
) -> tuple[list[float], float, dict[str, float]]:
    """Step 4 timed: (losses, seconds, ``entropy_before``/``entropy_after`` when ``measure_entropy``)."""
    entropy_sets = {t: tta_sets[t] for t in tasks if t in tta_sets}
    entropies: dict[str, float] = {}

    def measure(key: str) -> None:
        if measure_entropy:
            entropies[key] = mean_entropy(adapter, model, entropy_sets, batch_size=eval_batch_size, limit=tta_limit, device=device)

    measure("entropy_before")
    t0 = time.perf_counter()
    losses = adapt_routers(adapter, model, routers, tasks, tta_sets, tta_steps=tta_steps, lr=lr, batch_size=batch_size,
                           tta_limit=tta_limit, device=device, progress=progress)
    seconds = time.perf_counter() - t0
    measure("entropy_after")
    return losses, seconds, entropies


def _check_wemoe_inputs(
    tasks: Sequence[str],
    task_sds: Sequence[Mapping[str, Tensor]],
    eval_sets: Mapping[str, EvalDataset],
    tta_sets: Mapping[str, EvalDataset],
    tta_steps: int,
) -> None:
    if len(task_sds) != len(tasks):
        raise ConfigError(f"wemoe: {len(task_sds)} fine-tuned state dicts for {len(tasks)} tasks; give one per task, in task order.")
    if tta_steps < 0:
        raise ConfigError(f"wemoe: tta_steps must be >= 0, got {tta_steps}.")
    for t in tasks:
        if t not in eval_sets:
            raise ConfigError(f"wemoe: no eval set for task {t!r}.")
        if tta_steps and t not in tta_sets:
            raise ConfigError(f"wemoe: no test-time adaptation set for task {t!r}.")


def _score_tasks(adapter: ModelAdapter, model: nn.Module, tasks: Sequence[str], eval_sets: Mapping[str, EvalDataset], *, batch_size: int, limit: int | None, device: torch.device) -> dict[str, dict[str, Any]]:
    """Scoring: accuracy of the adapted model on every task's eval split, each with its own head."""
    per_task: dict[str, dict[str, Any]] = {}
    for t in tasks:
        r = evaluate(adapter, model, eval_sets[t], t, batch_size=batch_size, device=device, limit=limit)
        per_task[t] = {"accuracy": r["accuracy"], "n": r["n"]}
    return per_task


# Over ~60 lines only by its public 23-parameter signature and docstring; the body is ~25 lines of named steps.
def evaluate_wemoe(
    adapter: ModelAdapter,
    base_sd: Mapping[str, Tensor],
    task_sds: Sequence[Mapping[str, Tensor]],
    tasks: Sequence[str],
    eval_sets: Mapping[str, EvalDataset],
    tta_sets: Mapping[str, EvalDataset],
    *,
    variant: str = "wemoe",
    keep_fraction: float | None = None,
    init_lambda: float = 0.3,
    tta_steps: int = 200,
    lr: float = 1e-4,
    batch_size: int = 16,
    router_hidden: int | None = None,
    seed: int = 0,
    limit: int | None = None,
    device: str | torch.device | None = None,
    progress: Callable[[int, int], None] | None = None,
    router_init_std: float = 0.1,
    router_depth: int = 2,
    eval_batch_size: int = 128,
    tta_limit: int | None = None,
    mlp_paths: Sequence[str] | None = None,
    measure_entropy: bool = False,
    **mlp_options: Any,
) -> dict[str, Any]:
    """WEMoE (``variant="wemoe"``) or E-WEMoE (``"e-wemoe"``) accuracy per task; see the module docstring.

    ``task_sds[i]`` is the fine-tuned state dict of ``tasks[i]`` (same keys as ``base_sd``). ``tta_sets[t]``
    holds unlabeled inputs of task t (the first ``tta_limit`` rows, cycled); ``eval_sets[t]`` its labelled
    eval split (``limit`` rows at most). ``batch_size`` is the TTA batch, ``eval_batch_size`` the scoring
    batch. ``progress(step, tta_steps)`` is called after each TTA step. ``mlp_options`` go to
    :class:`WeightEnsemblingMLP` (``token_pool``, ``batch_reduce``, ``batched``). ``measure_entropy=True``
    adds ``entropy_before``/``entropy_after``: the mean prediction entropy over the TTA splits
    (``tta_limit`` rows each) before and after adaptation.

    Returns ``{"per_task": {task: {"accuracy", "n"}}, "average", "seconds", "tta_steps", "variant",
    "keep_fraction", "tta_seconds", "tta_losses", "n_routers", "router_parameters", "mlp_paths"}``;
    ``tta_losses`` is the entropy of each TTA step's batch (before that step's update).
    """
    t_start = time.perf_counter()
    tasks = list(tasks)
    _check_wemoe_inputs(tasks, task_sds, eval_sets, tta_sets, tta_steps)
    keep_fraction = _default_keep_fraction(variant, keep_fraction)
    dev = pick_device(str(device) if device is not None else None)
    model, mlps = build_wemoe_model(
        adapter, base_sd, task_sds, variant=variant, keep_fraction=keep_fraction, init_lambda=init_lambda,
        router_hidden=router_hidden, router_init_std=router_init_std, router_depth=router_depth,
        mlp_paths=mlp_paths, seed=seed, **mlp_options,
    )
    model.to(dev).eval()
    routers = _routers(mlps)
    losses, tta_seconds, entropies = _adapt_and_measure(
        adapter, model, routers, tasks, tta_sets, tta_steps=tta_steps, lr=lr, batch_size=batch_size, tta_limit=tta_limit,
        device=dev, progress=progress, measure_entropy=measure_entropy, eval_batch_size=eval_batch_size,
    )
    per_task = _score_tasks(adapter, model, tasks, eval_sets, batch_size=eval_batch_size, limit=limit, device=dev)
    return {
        "per_task": per_task,
        "average": sum(r["accuracy"] for r in per_task.values()) / len(per_task),
        "seconds": time.perf_counter() - t_start,
        "tta_steps": tta_steps, "variant": variant, "keep_fraction": keep_fraction,
        "tta_seconds": tta_seconds, "tta_losses": losses,
        "n_routers": len(routers),
        "router_parameters": sum(p.numel() for r in routers for p in r.parameters()),
        "mlp_paths": list(mlps),
        **entropies,
    }


@torch.no_grad()
def mean_entropy(adapter: ModelAdapter, model: nn.Module, datasets: Mapping[str, EvalDataset], *, batch_size: int = 128, limit: int | None = None, device: str | torch.device | None = None) -> float:
    """Mean prediction entropy (eq. 11) over the rows of every task's split, each with its own head.

    docs/MATH.md "WEMoE and E-WEMoE" (paper 002 eq. 11).
    """
    dev = pick_device(str(device) if device is not None else None)
    model.to(dev).eval()
    total = 0.0
    n = 0
    for t, ds in datasets.items():
        for raw in ds.batches(batch_size, require_labels=False, limit=limit):
            logits = adapter.logits(model, adapter.collate(raw.items).to(dev), t)
            total += float(entropy_loss(logits)) * logits.shape[0]
            n += logits.shape[0]
    return total / max(n, 1)
