"""Auto-Switch: training-free switch combination by kNN retrieval: docs/MATH.md "Auto-Switch"
(paper 000, "Less is More: Efficient Model Merging with Binary Task Switch", Sec. 4, eq. 8).

A query set holds pre-classifier features of a few unlabeled examples per task.
For an input x, its k nearest query features vote: wt(x) = |kNN(x) ∩ Qt| / k,
and the input is served by θ(x) = θ0 + Σt wt(x)·λt·Mt⊙St. Inputs with the
same weight vector share one rebuilt model (:func:`group_by_weights`).

Pure tensor code: extracting features and rebuilding models lives in ``eval``
(``eval/autoswitch_eval.py``, which takes :class:`AutoSwitchOptions` as keywords).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field

from tswitch_ray.errors import ConfigError
from tswitch_ray.methods.registry import EvalTimeOptions, Integer, MethodInfo, MethodKind, MethodOptions, register
from tswitch_ray.methods.storage import StorageModel, switches_bytes

Tensor = torch.Tensor


def autoswitch_weights(
    query_features: Tensor,
    query_task_ids: Tensor,
    x_features: Tensor,
    k: int = 10,
    n_tasks: int | None = None,
    average_over_batch: bool = False,
) -> Tensor:
    """Switch weights wt(x) = |kNN(x) ∩ Qt| / k (docs/MATH.md "Auto-Switch"; paper 000 eq. 8); float32 [B, T].

    ``query_features`` [Q, D], ``query_task_ids`` [Q] (ints in [0, T)),
    ``x_features`` [B, D]. Neighbours by Euclidean distance (``torch.cdist``
    without the matmul shortcut, so equal distances compare equal); ties are
    broken by the lower query index, which makes the result deterministic.
    ``average_over_batch`` (the authors' code) replaces every row by the
    batch mean; the default is per input (the paper).
    """
    if query_features.ndim != 2 or x_features.ndim != 2:
        raise ConfigError(
            "auto-switch: query and input features must be 2-D [N, D], got shapes "
            f"{tuple(query_features.shape)} and {tuple(x_features.shape)}."
        )
    if query_features.shape[1] != x_features.shape[1]:
        raise ConfigError(
            f"auto-switch: query features have dimension {query_features.shape[1]} but the inputs "
            f"have {x_features.shape[1]}; both must come from the same feature extractor."
        )
    n_query = query_features.shape[0]
    if query_task_ids.shape != (n_query,):
        raise ConfigError(
            f"auto-switch: {n_query} query features but {tuple(query_task_ids.shape)} task ids."
        )
    if not 1 <= k <= n_query:
        raise ConfigError(f"auto-switch: k must be in [1, {n_query}] (the query set size), got {k}.")
    ids = query_task_ids.to(torch.long)
    if n_tasks is None:
        n_tasks = int(ids.max().item()) + 1
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n_tasks):
        raise ConfigError(f"auto-switch: query task ids must lie in [0, {n_tasks}).")
    q = query_features.to(torch.float32)
    x = x_features.to(device=q.device, dtype=torch.float32)
    dist = torch.cdist(x, q, compute_mode="donot_use_mm_for_euclid_dist")
    # A stable sort keeps equal distances in query-index order: ties go to the lower index.
    order = torch.sort(dist, dim=1, stable=True).indices[:, :k]
    votes = ids.to(q.device)[order]  # [B, k]
    weights = torch.zeros(x.shape[0], n_tasks, dtype=torch.float32, device=q.device)
    weights.scatter_add_(1, votes, torch.ones_like(votes, dtype=torch.float32))
    weights = weights / float(k)
    if average_over_batch:
        weights = weights.mean(dim=0, keepdim=True).expand_as(weights).clone()
    return weights


def group_by_weights(weights: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Group inputs by identical weight vectors: [(weight_vector [T], input indices [n])].

    Groups come in order of first appearance; indices ascend. Each group needs
    one rebuilt model instead of one per input.
    """
    uniq, inverse = torch.unique(weights, dim=0, return_inverse=True)
    groups = []
    for g in range(uniq.shape[0]):
        idx = torch.nonzero(inverse == g).flatten()
        groups.append((uniq[g], idx))
    groups.sort(key=lambda item: int(item[1][0]))
    return groups


def signed_plane(mask: Tensor, positive: Tensor) -> Tensor:
    """M⊙S as int8: +1 kept and positive, −1 kept and negative, 0 dropped (one byte per element).

    The planes of every task are made once per evaluation; each weight vector's model is then
    :func:`combine_signed` of them, with no mask or sign work per weight vector.
    """
    return torch.where(mask, torch.where(positive, 1, -1), 0).to(torch.int8)


def combine_signed(base: Tensor, planes: Sequence[tuple[Tensor, float]], weights: Sequence[float] | Tensor) -> Tensor:
    """θ(x) = θ0 + Σt wt·λt·Mt⊙St (docs/MATH.md "Auto-Switch"; paper 000 eq. 8) for one tensor, in the
    base dtype, from the tasks' :func:`signed_plane` and knobs ``planes[t] = (plane, λt)``.

    Accumulated in fp32 in task order; tasks with wt = 0 are skipped. Each term is the fp32 product
    (wt·λt)·(±1 or 0), so the sum does not depend on how the planes are stored.
    """
    w = [float(v) for v in (weights.tolist() if isinstance(weights, Tensor) else weights)]
    if len(w) != len(planes):
        raise ConfigError(f"auto-switch: {len(w)} weights for {len(planes)} task switches.")
    acc = base.to(torch.float32)
    for (plane, knob), wt in zip(planes, w, strict=True):
        if wt == 0.0:
            continue
        acc = acc + (wt * float(knob)) * plane.to(acc.device).reshape(acc.shape)
    return acc.to(base.dtype)


def combine_switches(
    base: Tensor,
    switches: Sequence[tuple[Tensor, Tensor, float]],
    weights: Sequence[float] | Tensor,
) -> Tensor:
    """:func:`combine_signed` (paper 000 eq. 8) from the switches as stored by T-Switch.

    ``switches[t] = (mask, positive, knob)`` (``positive`` is the sign bit of kept elements).
    """
    w = [float(v) for v in (weights.tolist() if isinstance(weights, Tensor) else weights)]
    if len(w) != len(switches):
        raise ConfigError(f"auto-switch: {len(w)} weights for {len(switches)} task switches.")
    planes = [(signed_plane(mask, positive) if wt != 0.0 else mask, knob)
              for (mask, positive, knob), wt in zip(switches, w, strict=True)]
    return combine_signed(base, planes, w)


class AutoSwitchOptions(EvalTimeOptions):
    k: Integer = Field(10, ge=1)  # neighbours that vote (the authors' runs)
    examples_per_task: Integer = Field(100, ge=1)  # m, the query set's examples per task (the paper)
    feature_model: Literal["average", "base"] = "average"  # the paper's averaged model, or the authors' θ0
    average_over_batch: bool = False  # the authors' code: one weight vector per test batch


def autoswitch_storage(sizes: StorageModel, alpha: float | None, options: MethodOptions, query_bytes: int) -> int:
    """T-Switch's storage plus the query set of features."""
    switches = switches_bytes(sizes, alpha)
    return -1 if switches < 0 else switches + query_bytes


register(MethodInfo(
    name="autoswitch", kind=MethodKind.EVAL_TIME,
    summary="Auto-Switch: per input, switches weighted by its k nearest query features.",
    options=AutoSwitchOptions, scorer="autoswitch", storage=autoswitch_storage,
    needs_alpha=True, needs_artifacts=True, logged_options=("k", "examples_per_task"),
    scores_all_tasks_at_once=True,  # routing spans every task: one cell reads the switches and the query set once
))
