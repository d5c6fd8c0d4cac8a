"""WEMoE and E-WEMoE: weight-ensembling mixture of experts: docs/MATH.md "WEMoE and E-WEMoE" (paper 002,
Shen, Tang et al., "Efficient and Effective Weight-Ensembling Mixture of Experts for Multi-Task Model
Merging").

Non-MLP weights are merged by Task Arithmetic (use ``task_arithmetic``); each
Transformer MLP becomes a :class:`WeightEnsemblingMLP` whose weights depend on
the input: θ(x) = θ0 + Σi λi(x)·τi (eq. 9), with λ(x) from a small router
(eq. 10) initialised so that λ(x) ≈ the Task-Arithmetic coefficient. Routers
are trained by test-time adaptation on the prediction entropy (eq. 11); the
training loop lives in ``eval`` — :func:`tta_step` is one step of it.

E-WEMoE (Sec. III-C): MLP task vectors pruned to their largest-magnitude
entries (:func:`prune_task_vector`, eq. 15) and one router shared by all layers
(pass the same ``shared_router`` to every layer, or ``shared_router=True`` to
:func:`upscale_mlps`).

Choices, each an option:

* ``token_pool="router_output"`` (default): the router runs on every token and
  its outputs are averaged over the tokens — eq. 9 ("mean(R_l(h_1:N))") and
  FusionBench's implementation. ``"input"`` runs the router once on the mean
  of the input tokens (the reading in docs/MATH.md "WEMoE and E-WEMoE");
  the two differ because of the ReLU.
* ``init_std=0.1``: W ~ N(0, 0.01) in the paper is a *variance* of 0.01
  (FusionBench's code uses std 0.01).
* ``batch_reduce=False``: one weight set per sample; ``True`` averages λ over
  the batch (FusionBench's option, one MLP per batch, faster TTA).
* ``batched="vmap"`` evaluates the per-sample MLPs with ``torch.func.vmap``;
  ``"loop"`` runs a Python loop (for MLPs vmap cannot trace). Both give the same
  result up to float reassociation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from pydantic import Field
from torch import nn
from torch.func import functional_call, vmap

from tswitch_ray.errors import ConfigError
from tswitch_ray.methods.registry import EvalTimeOptions, Integer, MethodInfo, MethodKind, MethodOptions, Number, \
    register
from tswitch_ray.methods.storage import StorageModel

Tensor = torch.Tensor


class WemoeRouter(nn.Module):
    """The router R: R^d → R^T of docs/MATH.md "WEMoE and E-WEMoE" (paper 002 eq. 10, and its
    1-layer variant, App. X-C).

    depth 2: R(h) = W1·ReLU(W0·h + b0) + b1;  depth 1: R(h) = W0·h + b0;
    depth 0: R(h) = b0 (a learned constant). Init (Sec. III-B2): W ~ N(0, σ²)
    with σ = ``init_std``; the output bias is λ, hidden bias 0.
    """

    def __init__(
        self,
        in_features: int,
        hidden: int,
        n_tasks: int,
        init_lambda: float,
        init_std: float = 0.1,
        depth: int = 2,
    ) -> None:
        super().__init__()
        if depth not in (0, 1, 2):
            raise ConfigError(f"wemoe: router depth must be 0, 1 or 2, got {depth}.")
        self.depth = depth
        self.n_tasks = n_tasks
        if depth == 2:
            self.fc0 = nn.Linear(in_features, hidden)
            self.fc1 = nn.Linear(hidden, n_tasks)
            nn.init.normal_(self.fc0.weight, std=init_std)
            nn.init.normal_(self.fc1.weight, std=init_std)
            nn.init.zeros_(self.fc0.bias)
            nn.init.constant_(self.fc1.bias, init_lambda)
        elif depth == 1:
            self.fc0 = nn.Linear(in_features, n_tasks)
            nn.init.normal_(self.fc0.weight, std=init_std)
            nn.init.constant_(self.fc0.bias, init_lambda)
        else:
            self.bias = nn.Parameter(torch.full((n_tasks,), float(init_lambda)))

    def forward(self, h: Tensor) -> Tensor:
        if self.depth == 2:
            return self.fc1(torch.relu(self.fc0(h)))
        if self.depth == 1:
            return self.fc0(h)
        return self.bias.expand(*h.shape[:-1], self.n_tasks)


def _first_linear_in_features(module: nn.Module) -> int:
    """The token width the MLP reads: its first Linear's in_features (a Conv1d over tokens: in_channels)."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            return sub.in_features
        if isinstance(sub, nn.Conv1d):
            return sub.in_channels
    raise ConfigError(
        f"wemoe: cannot infer the router's input size from {type(module).__name__} (no nn.Linear or nn.Conv1d); "
        "pass in_features."
    )


def _buffer_key(param_name: str) -> str:
    return "tv__" + param_name.replace(".", "__")


class WeightEnsemblingMLP(nn.Module):
    """An MLP whose weights are θ0 + Σi λi(x)·τi, λ(x) from a router (docs/MATH.md "WEMoE and E-WEMoE";
    paper 002 eq. 9).

    ``task_vectors[i]`` maps the MLP's parameter names (as in
    ``base_mlp.named_parameters()``) to τi; a missing name means τi = 0 there.
    Input ``x`` is [B, N, D] (``batch_first``) or [N, B, D]; the output has
    the same layout. The base MLP and task vectors are frozen; only the router
    trains.
    """

    def __init__(
        self,
        base_mlp: nn.Module,
        task_vectors: Sequence[Mapping[str, Tensor]],
        router_hidden: int,
        init_lambda: float,
        shared_router: nn.Module | None = None,
        *,
        in_features: int | None = None,
        init_std: float = 0.1,
        router_depth: int = 2,
        batch_first: bool = True,
        token_pool: str = "router_output",
        batch_reduce: bool = False,
        batched: str = "vmap",
    ) -> None:
        super().__init__()
        if not task_vectors:
            raise ConfigError("wemoe: an upscaled MLP needs at least one task vector.")
        if token_pool not in ("router_output", "input"):
            raise ConfigError(f"wemoe: token_pool must be 'router_output' or 'input', got {token_pool!r}.")
        if batched not in ("vmap", "loop"):
            raise ConfigError(f"wemoe: batched must be 'vmap' or 'loop', got {batched!r}.")
        self.base_mlp = base_mlp
        for p in self.base_mlp.parameters():
            p.requires_grad_(False)
        self.n_tasks = len(task_vectors)
        self.batch_first = batch_first
        self.token_pool = token_pool
        self.batch_reduce = batch_reduce
        self.batched = batched
        self._param_names = [n for n, _ in base_mlp.named_parameters()]
        base_params = dict(base_mlp.named_parameters())
        for name, tv in enumerate(task_vectors):
            unknown = set(tv) - set(base_params)
            if unknown:
                raise ConfigError(
                    f"wemoe: task vector #{name} has tensors {sorted(unknown)} that the MLP "
                    f"{type(base_mlp).__name__} does not have (its parameters: {self._param_names})."
                )
        for pname, p in base_params.items():
            stacked = torch.stack(
                [
                    tv[pname].to(device=p.device, dtype=torch.float32).reshape(p.shape)
                    if pname in tv
                    else torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                    for tv in task_vectors
                ]
            )
            self.register_buffer(_buffer_key(pname), stacked)
        if shared_router is not None:
            self.router = shared_router
        else:
            d = in_features if in_features is not None else _first_linear_in_features(base_mlp)
            self.router = WemoeRouter(d, router_hidden, self.n_tasks, init_lambda, init_std, router_depth)

    def routing_weights(self, x: Tensor) -> Tensor:
        """λ(x) [B, T] for batch-first tokens x [B, N, D] (eq. 9, first line)."""
        if self.token_pool == "router_output":
            lam = self.router(x).mean(dim=1)
        else:
            lam = self.router(x.mean(dim=1))
        if self.batch_reduce:
            lam = lam.mean(dim=0, keepdim=True).expand(x.shape[0], -1)
        return lam

    def merged_parameters(self, lam: Tensor) -> dict[str, Tensor]:
        """θ0 + Σi λi·τi for each row of λ [B, T]: parameter name → [B, *shape] (eq. 9, second line)."""
        out = {}
        base_params = dict(self.base_mlp.named_parameters())
        for pname in self._param_names:
            p = base_params[pname]
            stacked = getattr(self, _buffer_key(pname))  # [T, *shape]
            delta = torch.tensordot(lam.to(torch.float32), stacked, dims=([1], [0]))
            out[pname] = (p.to(torch.float32).unsqueeze(0) + delta).to(p.dtype)
        return out

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 3:
            raise ConfigError(f"wemoe: expected token input [B, N, D] or [N, B, D], got shape {tuple(x.shape)}.")
        xb = x if self.batch_first else x.transpose(0, 1)
        lam = self.routing_weights(xb)
        params = self.merged_parameters(lam)
        if self.batched == "vmap":
            out = vmap(lambda p, xi: functional_call(self.base_mlp, p, (xi,)))(params, xb)
        else:
            out = torch.stack(
                [
                    functional_call(self.base_mlp, {k: v[b] for k, v in params.items()}, (xb[b],))
                    for b in range(xb.shape[0])
                ]
            )
        return out if self.batch_first else out.transpose(0, 1)


def prune_task_vector(tau: Tensor, keep_fraction: float) -> Tensor:
    """sparse(τ, ρ) of docs/MATH.md "WEMoE and E-WEMoE" (paper 002 eq. 15): keep the
    k = round(keep_fraction·n) largest |τ|.

    Exactly k entries are kept: the threshold is the exact (n−k+1)-th smallest
    magnitude (radix selection, ``tswitch_ray.switch.select``), entries above
    it are kept and ties at the threshold are filled in index order. E-WEMoE
    keeps 0.1 (ρ = 90 %, default of the paper) or 0.01.
    """
    from tswitch_ray.switch.select import kth_smallest

    if not 0.0 <= keep_fraction <= 1.0:
        raise ConfigError(f"wemoe: keep_fraction must be in [0, 1], got {keep_fraction}.")
    flat = tau.reshape(-1)
    n = flat.numel()
    k = int(round(keep_fraction * n))
    if k >= n:
        return tau.clone()
    if k == 0:
        return torch.zeros_like(tau)
    mags = flat.abs().to(torch.float32)
    thr = float(kth_smallest(mags, [n - k + 1])[0])
    keep = mags > thr
    missing = k - int(keep.sum())
    if missing > 0:
        at_thr = torch.nonzero(mags == thr).flatten()[:missing]
        keep[at_thr] = True
    return torch.where(keep, flat, torch.zeros_like(flat)).reshape(tau.shape)


def upscale_mlps(
    model: nn.Module,
    mlp_module_paths: Sequence[str],
    task_vectors_by_path: Mapping[str, Sequence[Mapping[str, Tensor]]],
    router_hidden: int,
    init_lambda: float,
    shared_router: bool | nn.Module = False,
    keep_fraction: float | None = None,
    **mlp_options: Any,
) -> dict[str, WeightEnsemblingMLP]:
    """Replace each MLP at ``mlp_module_paths`` (dotted, as in ``named_modules``) in place by a
    :class:`WeightEnsemblingMLP`; returns them by path.

    WEMoE: ``shared_router=False``, ``keep_fraction=None``. E-WEMoE:
    ``shared_router=True`` (one router for all layers; or pass a module) and
    ``keep_fraction=0.1`` or ``0.01``. ``mlp_options`` go to
    :class:`WeightEnsemblingMLP` (``batch_first``, ``token_pool``, ...).
    """
    router: nn.Module | None
    if isinstance(shared_router, nn.Module):
        router = shared_router
    elif shared_router and mlp_module_paths:
        first = model.get_submodule(mlp_module_paths[0])
        d = mlp_options.get("in_features") or _first_linear_in_features(first)
        n_tasks = len(task_vectors_by_path[mlp_module_paths[0]])
        router = WemoeRouter(
            d, router_hidden, n_tasks, init_lambda,
            mlp_options.get("init_std", 0.1), mlp_options.get("router_depth", 2),
        )
    else:
        router = None
    out: dict[str, WeightEnsemblingMLP] = {}
    for path in mlp_module_paths:
        if path not in task_vectors_by_path:
            raise ConfigError(f"wemoe: no task vectors were given for MLP '{path}'.")
        parent_path, _, attr = path.rpartition(".")
        try:
            parent = model.get_submodule(parent_path) if parent_path else model
            base_mlp = getattr(parent, attr)
        except AttributeError as exc:
            raise ConfigError(f"wemoe: the model has no submodule '{path}' to upscale.") from exc
        tvs = task_vectors_by_path[path]
        if keep_fraction is not None:
            tvs = [{k: prune_task_vector(v, keep_fraction) for k, v in tv.items()} for tv in tvs]
        module = WeightEnsemblingMLP(base_mlp, tvs, router_hidden, init_lambda, router, **mlp_options)
        setattr(parent, attr, module)
        out[path] = module
    return out


def entropy_loss(logits: Tensor) -> Tensor:
    """L = E_x[−Σ_y p(y|x) log p(y|x)] over the batch (docs/MATH.md "WEMoE and E-WEMoE"; paper 002
    eq. 11), from raw logits."""
    logp = torch.log_softmax(logits.to(torch.float32), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1).mean()


def tta_step(
    model: nn.Module,
    logits_fn: Callable[[nn.Module, Any], Tensor],
    batch: Any,
    optimizer: torch.optim.Optimizer,
) -> float:
    """One test-time-adaptation step: minimise the entropy of ``logits_fn(model, batch)``."""
    optimizer.zero_grad(set_to_none=True)
    loss = entropy_loss(logits_fn(model, batch))
    loss.backward()
    optimizer.step()
    return float(loss.detach())


class WemoeOptions(EvalTimeOptions):
    """What an eval config may set for WEMoE (``eval/wemoe_eval.py`` takes them as keywords)."""

    init_lambda: Number = 0.3  # λ the routers start from (Task Arithmetic's coefficient)
    tta_steps: Integer = Field(200, ge=0)
    lr: Number = 1e-4
    batch_size: Integer = Field(16, ge=1)  # the test-time adaptation batch
    router_hidden: Integer | None = Field(None, ge=1)  # default: the MLP's input width
    keep_fraction: Number | None = Field(None, ge=0.0, le=1.0)  # prune the MLP task vectors (E-WEMoE's eq. 15)
    seed: Integer = 0
    router_init_std: Number = 0.1
    router_depth: Integer = Field(2, ge=0, le=2)
    tta_limit: Integer | None = Field(None, ge=1)  # rows of each task's unlabeled split, cycled


class EWemoeOptions(WemoeOptions):
    keep_fraction: Number = Field(0.1, ge=0.0, le=1.0)  # ρ = 90 % pruned, the paper's default


def wemoe_storage(sizes: StorageModel, alpha: float | None, options: MethodOptions, query_bytes: int) -> int:
    """θ0 plus the dense MLP task vectors, the experts."""
    return sizes.model_bytes + int(sizes.n_tasks * sizes.mlp_numel * sizes.dtype_bytes)


def ewemoe_storage(sizes: StorageModel, alpha: float | None, options: MethodOptions, query_bytes: int) -> int:
    """θ0 plus the kept MLP task-vector values and their int32 indices."""
    keep = float(getattr(options, "keep_fraction", None) or 0.1)
    return sizes.model_bytes + int(sizes.n_tasks * sizes.mlp_numel * keep * (sizes.dtype_bytes + 4))


register(MethodInfo(
    name="wemoe", kind=MethodKind.EVAL_TIME,
    summary="WEMoE: MLPs as input-routed mixtures of task vectors, routers trained at test time.",
    options=WemoeOptions, scorer="wemoe", storage=wemoe_storage, scores_all_tasks_at_once=True,
))
register(MethodInfo(
    name="e-wemoe", aliases=("ewemoe",), kind=MethodKind.EVAL_TIME,
    summary="E-WEMoE: WEMoE with pruned MLP task vectors and one router shared by all layers.",
    options=EWemoeOptions, scorer="wemoe", storage=ewemoe_storage, scores_all_tasks_at_once=True,
))
