"""Auto-Switch evaluation driver (paper 000 Sec. 3.4, eq. 8), single process.

Specified in docs/MATH.md "Auto-Switch" (paper 000 eq. 8), with both readings
of the feature model and of per-input weights.

The Ray runner calls :func:`evaluate_autoswitch` inside one task. The math
(kNN weights, grouping, θ0 + Σt wt·λt·Mt⊙St) is :mod:`tswitch_ray.methods.autoswitch`;
this module wires it to an adapter and eval datasets:

1. **Feature model** (``feature_model``): the model whose pre-classifier
   features build the query set and route the inputs.

   * ``"average"`` (default, the paper's reading): paper 000 builds the query
     set with "the model weights obtained after merging the directly averaged
     task vectors according to the scheme in equation 4". Auto-Switch only
     holds switches, so we average the *switch* task vectors:
     θavg = θ0 + (1/T)·Σt λt·Mt⊙St (``combine_switches`` with wt = 1/T). The
     norm rescaling of eq. 4 (whose body is missing from our copy of the paper)
     is not applied; pass ``feature_state_dict`` (e.g. the ``pdiscard`` merge)
     to use any other merged model instead.
   * ``"base"``: the pretrained θ0 (what the authors' code,
     lfy-123/Binary-Task-Switch ``merge_vit.py``, uses).

2. **Query set**: features of the first ``examples_per_task`` rows (labels
   unused) of each task's query split; m = 100 (paper 000 Table 5, authors'
   ``--knn-pre-sample-num``).
3. **Routing**: per eval input, wt(x) = |kNN(x) ∩ Qt| / k with k = 10 (the
   authors' ``--knn-neighbors`` default; the paper's ablation, Fig. 7, reports
   that accuracy falls as k grows). Per input by default;
   ``average_over_batch=True`` is the authors' code (one weight vector per batch).
4. **Rebuild**: inputs with equal weight vectors share one model, grouped
   over a window of ``group_window`` consecutive inputs of a split (routed
   batch by batch), each group served in passes of at most ``batch_size``.
   Every task's switches become int8 planes Mt⊙St once per evaluation
   (:class:`SignedSwitches`), so a weight vector's weights cost one fp32
   multiply-add per task and element, no mask work. Rebuilt models are kept
   in a bounded LRU (``cache_size`` models) keyed by the weight vector,
   across windows and tasks; an evicted model's module is reused as the
   target of the next rebuild (``adapter.load``), so at most
   ``cache_size`` + 1 models (+ the feature model) live at once.
5. **Scoring**: logits with the eval task's head (heads are never merged).

``throughput_ratio`` compares compute only (decoding and collation excluded
for both sides): Auto-Switch's inputs/s — feature pass, kNN, grouping,
rebuilds, grouped forward passes — over the inputs/s of one forward pass of a
single fixed model (the feature model, same adapter, same collated inputs,
timed in the same loop).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tswitch_ray.device import pick_device
from tswitch_ray.errors import ConfigError, ZooError
from tswitch_ray.eval.adapters import ModelAdapter
from tswitch_ray.eval.datasets import EvalDataset
from tswitch_ray.eval.evaluate import extract_features
from tswitch_ray.methods.autoswitch import (
    autoswitch_weights,
    combine_signed,
    combine_switches,
    group_by_weights,
    signed_plane,
)

Tensor = torch.Tensor
Switch = tuple[Tensor, Tensor, float]

FEATURE_MODELS = ("average", "base")
DEFAULT_K = 10
DEFAULT_EXAMPLES_PER_TASK = 100
# Inputs grouped by weight vector at once (consecutive batches of one split): fewer, fuller forward passes.
DEFAULT_GROUP_WINDOW = 1024


def rebuild_state_dict(
    base_sd: Mapping[str, Tensor],
    switches: Sequence[Mapping[str, Switch]],
    weights: Sequence[float] | Tensor,
) -> dict[str, Tensor]:
    """θ0 + Σt wt·λt·Mt⊙St for every tensor of ``base_sd`` (eq. 8); tensors no task switches stay θ0.

    docs/MATH.md "Auto-Switch" (paper 000 eq. 8).

    Non-floating tensors are copied from the base. The result is in the base
    dtypes, on the base tensors' devices.
    """
    w = [float(v) for v in (weights.tolist() if isinstance(weights, Tensor) else weights)]
    if len(w) != len(switches):
        raise ConfigError(f"auto-switch: {len(w)} weights for {len(switches)} task switch sets.")
    out: dict[str, Tensor] = {}
    for name, base in base_sd.items():
        pairs = [(sw[name], wt) for sw, wt in zip(switches, w, strict=True) if name in sw and wt != 0.0]
        if not pairs or not torch.is_floating_point(base):
            out[name] = base
            continue
        for (mask, _pos, _knob), _ in pairs:
            _check_numel(name, mask, base)
        out[name] = combine_switches(base, [p[0] for p in pairs], [p[1] for p in pairs])
    return out


def _check_numel(name: str, mask: Tensor, base: Tensor) -> None:
    if mask.numel() != base.numel():
        raise ConfigError(
            f"auto-switch: the switch of tensor {name!r} has {mask.numel()} elements but the base tensor "
            f"has {base.numel()} (shape {tuple(base.shape)}); switches and base come from different models."
        )


# ---------------------------------------------------------------- steps 1-2: feature model and query set


def build_feature_model(
    adapter: ModelAdapter,
    base_sd: Mapping[str, Tensor],
    switches: Sequence[Mapping[str, Switch]],
    feature_model: str,
    feature_state_dict: Mapping[str, Tensor] | None,
    device: torch.device,
) -> tuple[nn.Module, str]:
    """Step 1: the model whose features build the query set and route the inputs, and its name.

    ``feature_state_dict`` wins (named ``"custom"``); else ``"average"`` is
    θ0 + (1/T)·Σt λt·Mt⊙St and ``"base"`` is θ0 (docs/MATH.md "Auto-Switch").
    """
    n_tasks = len(switches)
    if feature_state_dict is not None:
        fsd, feature_model = feature_state_dict, "custom"
    elif feature_model == "average":
        fsd = rebuild_state_dict(base_sd, switches, [1.0 / n_tasks] * n_tasks)
    else:
        fsd = base_sd
    return adapter.build(fsd).to(device).eval(), feature_model


@dataclass(frozen=True)
class QuerySet:
    """The query set: features [Q, D] of unlabeled examples, each row's task index [Q], the task count T."""

    features: Tensor
    task_ids: Tensor
    n_tasks: int

    @property
    def size(self) -> int:
        return int(self.features.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.features.numel() * self.features.element_size())

    def weights(self, x_features: Tensor, *, k: int, average_over_batch: bool) -> Tensor:
        """wt(x) = |kNN(x) ∩ Qt| / k per input, [B, T] on CPU (:func:`~tswitch_ray.methods.autoswitch.autoswitch_weights`)."""
        return autoswitch_weights(self.features, self.task_ids, x_features, k=k, n_tasks=self.n_tasks,
                                  average_over_batch=average_over_batch).cpu()


def extract_query_set(
    adapter: ModelAdapter,
    feature_model: nn.Module,
    tasks: Sequence[str],
    query_sets: Mapping[str, EvalDataset],
    examples_per_task: int,
    *,
    batch_size: int,
    device: torch.device,
) -> QuerySet:
    """Step 2: features of the first ``examples_per_task`` rows of every task's query split, in task order, on ``device``."""
    feats, ids = [], []
    for i, t in enumerate(tasks):
        f = extract_features(adapter, feature_model, query_sets[t], limit=examples_per_task, batch_size=batch_size, device=device)
        feats.append(f)
        ids.append(torch.full((f.shape[0],), i, dtype=torch.long))
    return QuerySet(torch.cat(feats).to(device), torch.cat(ids).to(device), len(tasks))


# ---------------------------------------------------------------- step 4: rebuilt models


class SignedSwitches:
    """Every task's switches as int8 planes Mt⊙St with their knobs, made once per evaluation.

    :meth:`state_dict` is then θ0 + Σt wt·λt·Mt⊙St for any weight vector (:func:`combine_signed`, eq. 8)
    with no mask or sign work per weight vector, the same bits as :func:`rebuild_state_dict`. Planes
    and θ0 live on ``device`` (one byte per element per task).
    """

    def __init__(self, base_sd: Mapping[str, Tensor], switches: Sequence[Mapping[str, Switch]],
                 device: torch.device) -> None:
        self.n_tasks = len(switches)
        self.base = {name: base.to(device) for name, base in base_sd.items()}
        self.planes: dict[str, list[tuple[Tensor, float] | None]] = {}
        for name, base in base_sd.items():
            if not torch.is_floating_point(base) or not any(name in sw for sw in switches):
                continue
            per: list[tuple[Tensor, float] | None] = []
            for sw in switches:
                if name not in sw:
                    per.append(None)
                    continue
                mask, positive, knob = sw[name]
                _check_numel(name, mask, base)
                per.append((signed_plane(mask.to(device), positive.to(device)), knob))
            self.planes[name] = per

    def state_dict(self, weights: Sequence[float] | Tensor) -> dict[str, Tensor]:
        """θ0 + Σt wt·λt·Mt⊙St for every tensor (eq. 8); tensors no task switches stay θ0."""
        w = [float(v) for v in (weights.tolist() if isinstance(weights, Tensor) else weights)]
        if len(w) != self.n_tasks:
            raise ConfigError(f"auto-switch: {len(w)} weights for {self.n_tasks} task switch sets.")
        out: dict[str, Tensor] = {}
        for name, base in self.base.items():
            pairs = [(p, wt) for p, wt in zip(self.planes.get(name, ()), w) if p is not None and wt != 0.0]
            out[name] = combine_signed(base, [p for p, _ in pairs], [wt for _, wt in pairs]) if pairs else base
        return out


class _ModelCache:
    """Bounded LRU of rebuilt models keyed by the weight vector; counts rebuilds.

    A miss writes the weight vector's weights (:class:`SignedSwitches`) into the least recently used
    model's parameters (``adapter.load``); a new module is built only while the cache is filling.
    """

    def __init__(self, adapter: ModelAdapter, signed: SignedSwitches, size: int, device: torch.device) -> None:
        if size < 1:
            raise ConfigError(f"auto-switch: cache_size must be >= 1, got {size}.")
        self.adapter, self.signed = adapter, signed
        self.size, self.device = size, device
        self.models: OrderedDict[tuple[float, ...], nn.Module] = OrderedDict()
        self.built = 0
        self.rebuild_seconds = 0.0

    def get(self, weights: Tensor) -> nn.Module:
        key = tuple(float(v) for v in weights.tolist())
        model = self.models.get(key)
        if model is not None:
            self.models.move_to_end(key)
            return model
        t0 = time.perf_counter()
        sd = self.signed.state_dict(key)
        if len(self.models) >= self.size:
            _, spare = self.models.popitem(last=False)
            model = self.adapter.load(spare, sd)
        else:
            model = self.adapter.build(sd)
        model = model.to(self.device).eval()
        del sd
        self.models[key] = model
        self.built += 1
        self.rebuild_seconds += time.perf_counter() - t0
        return model


# ---------------------------------------------------------------- steps 3-5: routing and scoring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class _Throughput:
    """Compute seconds of both sides of ``throughput_ratio`` over ``n`` scored inputs (decoding, collation excluded)."""

    auto_s: float = 0.0
    plain_s: float = 0.0
    n: int = 0

    def ratio(self) -> float:
        """Auto-Switch inputs/s over the fixed model's inputs/s; NaN when either side took no measurable time."""
        if self.auto_s > 0 and self.plain_s > 0:
            return (self.n / self.auto_s) / (self.n / self.plain_s)
        return float("nan")


def _routing_hits(weights: Tensor, own: int) -> int:
    """Inputs whose largest weight is their own task's, alone (ties count as misses)."""
    top = weights.max(dim=1)
    unique_top = (weights == top.values.unsqueeze(1)).sum(dim=1) == 1
    return int(((top.indices == own) & unique_top).sum())


@dataclass
class _Scorer:
    """Scores eval splits with per-input rebuilt models; holds what every task shares (one per eval call).

    The feature model, the query set and the model cache are built once and
    shared by every scored task. Batches are drawn from one task's split at a
    time and routed one by one; groups are formed over a window of
    ``group_window`` inputs of that split (consecutive batches), so every
    forward pass (and its floating point) is the same whether a task is
    scored alone or with the others; only the cache hits, hence
    ``models_built``, depend on the tasks scored before it. A window of one
    batch (``group_window`` ≤ ``batch_size``) groups inside each batch.
    """

    adapter: ModelAdapter
    feature_model: nn.Module
    query: QuerySet
    cache: _ModelCache
    device: torch.device
    k: int
    average_over_batch: bool
    batch_size: int
    limit: int | None
    group_window: int
    clock: _Throughput = field(default_factory=_Throughput)

    def _time_plain(self, x: Tensor, task: str) -> None:
        """The throughput reference: one forward pass of the fixed feature model on the same inputs."""
        _sync(self.device)
        t0 = time.perf_counter()
        self.adapter.logits(self.feature_model, x, task)
        _sync(self.device)
        self.clock.plain_s += time.perf_counter() - t0

    def _route(self, x: Tensor) -> Tensor:
        """Step 3 for one batch: its weights [B, T] (CPU); timed as Auto-Switch compute."""
        t0 = time.perf_counter()
        w = self.query.weights(self.adapter.features(self.feature_model, x), k=self.k, average_over_batch=self.average_over_batch)
        self.clock.auto_s += time.perf_counter() - t0
        return w

    def _predict(self, x: Tensor, w: Tensor, task: str) -> tuple[Tensor, int]:
        """Steps 4-5 for routed inputs: each weight vector's model predicts its inputs, at most a batch per pass.

        Returns the predictions (CPU) and the number of weight groups; timed as Auto-Switch compute.
        """
        t0 = time.perf_counter()
        pred = torch.empty(x.shape[0], dtype=torch.long)
        groups = group_by_weights(w)
        for wv, idx in groups:
            model = self.cache.get(wv)
            for chunk in idx.split(self.batch_size):
                pred[chunk] = self.adapter.logits(model, x[chunk.to(self.device)], task).argmax(dim=-1).cpu()
        _sync(self.device)
        self.clock.auto_s += time.perf_counter() - t0
        return pred, len(groups)

    def _windows(self, task: str, dataset: EvalDataset) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """(inputs, labels, weights) of consecutive batches, routed batch by batch, joined up to ``group_window``
        inputs: grouping by weight vector across them makes fewer, larger passes than grouping per batch."""
        n_classes = self.adapter.num_classes(task)
        xs: list[Tensor] = []
        ys: list[Tensor] = []
        ws: list[Tensor] = []
        for raw in dataset.batches(self.batch_size, num_classes=n_classes, require_labels=True, limit=self.limit):
            x = self.adapter.collate(raw.items).to(self.device)
            self._time_plain(x, task)
            xs.append(x)
            ys.append(raw.labels)
            ws.append(self._route(x))
            if sum(int(v.shape[0]) for v in xs) >= self.group_window:
                yield torch.cat(xs), torch.cat(ys), torch.cat(ws)
                xs, ys, ws = [], [], []
        if xs:
            yield torch.cat(xs), torch.cat(ys), torch.cat(ws)

    def score_task(self, task: str, own: int, dataset: EvalDataset) -> dict[str, Any]:
        """One task's ``per_task`` row; ``own`` is its index in the routed tasks (-1: not routed, no hit rate)."""
        correct = n = groups = hits = 0
        built_before = self.cache.built
        for x, labels, w in self._windows(task, dataset):
            pred, n_groups = self._predict(x, w, task)
            groups += n_groups
            correct += int((pred == labels).sum())
            n += int(labels.numel())
            if own >= 0:
                hits += _routing_hits(w, own)
        if n == 0:
            raise ZooError(f"{getattr(dataset, 'uri', task)}: the eval split of task {task!r} has no rows.")
        self.clock.n += n
        return {
            "accuracy": correct / n,
            "n": n,
            "models_built": self.cache.built - built_before,
            "groups": groups,
            "routing_hit_rate": hits / n if own >= 0 else None,
        }


# ---------------------------------------------------------------- the driver


def _scored_tasks(
    tasks: list[str],
    switches: Sequence[Mapping[str, Switch]],
    eval_sets: Mapping[str, EvalDataset],
    query_sets: Mapping[str, EvalDataset],
    eval_tasks: Sequence[str] | None,
    feature_model: str,
    examples_per_task: int,
) -> list[str]:
    """Check the inputs of :func:`evaluate_autoswitch`; the tasks to score, in order."""
    n_tasks = len(tasks)
    if n_tasks == 0:
        raise ConfigError("auto-switch: no tasks given.")
    if len(switches) != n_tasks:
        raise ConfigError(f"auto-switch: {len(switches)} switch sets for {n_tasks} tasks; give one per task, in task order.")
    if feature_model not in FEATURE_MODELS:
        raise ConfigError(f"auto-switch: feature_model must be one of {FEATURE_MODELS}, got {feature_model!r}.")
    if examples_per_task < 1:
        raise ConfigError(f"auto-switch: examples_per_task must be >= 1, got {examples_per_task}.")
    scored = list(eval_tasks) if eval_tasks is not None else [t for t in tasks if t in eval_sets]
    if not scored:
        raise ConfigError(f"auto-switch: no eval set for any of the tasks {tasks}.")
    for t in tasks:
        if t not in query_sets:
            raise ConfigError(f"auto-switch: no query set for task {t!r}; the query set needs unlabeled examples of every task.")
    for t in scored:
        if t not in eval_sets:
            raise ConfigError(f"auto-switch: no eval set for task {t!r}.")
    return scored


def _check_k(k: int, query: QuerySet, examples_per_task: int) -> None:
    if not 1 <= k <= query.size:
        raise ConfigError(
            f"auto-switch: k must be in [1, {query.size}] (the query set size: {examples_per_task} examples x "
            f"{query.n_tasks} tasks at most), got {k}."
        )


@torch.no_grad()
def evaluate_autoswitch(
    adapter: ModelAdapter,
    base_sd: Mapping[str, Tensor],
    switches: Sequence[Mapping[str, Switch]],
    tasks: Sequence[str],
    eval_sets: Mapping[str, EvalDataset],
    query_sets: Mapping[str, EvalDataset],
    *,
    examples_per_task: int = DEFAULT_EXAMPLES_PER_TASK,
    k: int = DEFAULT_K,
    batch_size: int = 128,
    limit: int | None = None,
    device: str | torch.device | None = None,
    average_over_batch: bool = False,
    feature_model: str = "average",
    feature_state_dict: Mapping[str, Tensor] | None = None,
    cache_size: int = 8,
    eval_tasks: Sequence[str] | None = None,
    group_window: int = DEFAULT_GROUP_WINDOW,
) -> dict[str, Any]:
    """Auto-Switch accuracy per task (see the module docstring for every step and choice).

    ``switches[i]`` is the switch set of ``tasks[i]``: tensor name → ``(mask, positive, knob)`` (flat bool
    mask, flat bool sign bit of kept elements, scalar λ). ``query_sets[t]`` gives the unlabeled examples of
    task t, ``eval_sets[t]`` its labelled eval split. ``eval_tasks`` (default: the tasks that have an entry
    in ``eval_sets``, in task order) picks which eval splits to score — every task's switch and query
    examples take part in routing regardless. ``limit`` caps the eval rows per task. ``group_window``: how
    many consecutive routed inputs of a split are grouped by weight vector at once (each group is then
    served in passes of at most ``batch_size``); ``batch_size`` or less groups inside each batch.

    One call builds the feature model and extracts the query set once for all scored tasks; each task's
    ``accuracy``, ``n``, ``groups`` and ``routing_hit_rate`` equal those of a call scoring that task alone
    (see :class:`_Scorer`), so scoring every task in one call is the cheap way.

    Returns ``{"per_task": {task: {"accuracy", "n", "models_built", "groups", "routing_hit_rate"}},
    "average", "seconds", "throughput_ratio", "k", "examples_per_task", "feature_model",
    "average_over_batch", "query_size", "query_bytes", "models_built", "rebuild_seconds"}``.
    ``models_built`` counts rebuilds (LRU misses) while scoring that task; ``groups`` the (window,
    weight-vector) groups served; ``routing_hit_rate`` the fraction of inputs whose largest weight is their
    own task's (ties count as misses).
    """
    t_start = time.perf_counter()
    tasks = list(tasks)
    scored = _scored_tasks(tasks, switches, eval_sets, query_sets, eval_tasks, feature_model, examples_per_task)
    dev = pick_device(str(device) if device is not None else None)
    fmodel, feature_model = build_feature_model(adapter, base_sd, switches, feature_model, feature_state_dict, dev)
    query = extract_query_set(adapter, fmodel, tasks, query_sets, examples_per_task, batch_size=batch_size, device=dev)
    _check_k(k, query, examples_per_task)
    cache = _ModelCache(adapter, SignedSwitches(base_sd, switches, dev), cache_size, dev)
    scorer = _Scorer(adapter, fmodel, query, cache, dev, k, average_over_batch, batch_size, limit, group_window)
    per_task = {t: scorer.score_task(t, tasks.index(t) if t in tasks else -1, eval_sets[t]) for t in scored}
    return {
        "per_task": per_task,
        "average": sum(r["accuracy"] for r in per_task.values()) / len(per_task),
        "seconds": time.perf_counter() - t_start,
        "throughput_ratio": scorer.clock.ratio(),
        "k": k, "examples_per_task": examples_per_task, "feature_model": feature_model,
        "average_over_batch": average_over_batch, "query_size": query.size, "query_bytes": query.nbytes,
        "models_built": cache.built,
        "rebuild_seconds": cache.rebuild_seconds,
    }
