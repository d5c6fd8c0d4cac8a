"""How a (method, task) cell is scored: the scorers that a method's registry entry names.

``MethodInfo.scorer`` is a key of :data:`SCORERS`; the eval runner looks the
method up and calls its scorer, nothing here or there branches on a method's
name. A scorer gets the cell (:class:`CellJob`) and the task adapter and
returns one row per task it covered, ``{"task", "accuracy", "n", "seconds"}``
plus what the method adds:

=============== ==============================================================
key             the weights a task is scored with
=============== ==============================================================
zoo-base        θ0, the zoo's base checkpoint
zoo-task        the task's own fine-tuned checkpoint
merged-one      the merge output ``<weights_uri>/merged.safetensors``
merged-per-task the merge output ``<weights_uri>/<task>.safetensors``
switches        θ0 + λ·M⊙S rebuilt from the switch artifacts and θ0 only
autoswitch      Auto-Switch, θ0 + Σt wt(x)·λt·Mt⊙St per input: routing spans
                every task, so one cell scores all tasks, reading the switches
                and extracting the query set once (its rows add
                throughput_ratio, models_built, query_bytes)
wemoe           WEMoE / E-WEMoE (the method's name is the variant): routers
                trained on every task at once, so one cell scores all tasks
=============== ==============================================================

The switch scorers check that the artifacts were built from the zoo's base
model against ``ctx.zoo_fingerprint``, computed once per evaluation by the
runner, instead of fingerprinting the zoo again in every cell.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from tswitch_ray.errors import ConfigError
from tswitch_ray.eval.adapters import ModelAdapter
from tswitch_ray.eval.config import MethodSpec
from tswitch_ray.eval.datasets import open_eval_dataset
from tswitch_ray.eval.evaluate import evaluate
from tswitch_ray.eval.weights import (
    StateDict,
    read_checkpoint,
    read_merged,
    read_switches,
    reconstruct_switched,
)
from tswitch_ray.methods import MethodInfo, MethodOptions, get_method_info
from tswitch_ray.zoo import load_zoo

Row = dict[str, Any]


class CellContext(Protocol):
    """What every cell of one evaluation shares (the eval runner's ``EvalContext``)."""

    zoo: str
    zoo_fingerprint: str  # the zoo's base-model fingerprint, computed once per evaluation
    tasks: tuple[str, ...]
    artifacts: str | None
    batch_size: int
    limit: int | None

    @property
    def storage_options(self) -> dict[str, Any]: ...

    def eval_uri(self, task: str) -> str: ...

    def unlabeled_uri(self, task: str) -> str: ...


@dataclass(frozen=True)
class CellJob:
    """One cell: a method spec on one task (on all, for methods that score all tasks at once)."""

    ctx: CellContext
    spec: MethodSpec
    task: str
    weights_uri: str | None = None  # the merge output, for merged methods

    @property
    def info(self) -> MethodInfo:
        return get_method_info(self.spec.method)

    @property
    def options(self) -> MethodOptions:
        return self.spec.validated_options()

    @property
    def artifacts(self) -> str | None:
        return self.spec.artifacts or self.ctx.artifacts


Scorer = Callable[[CellJob, ModelAdapter], list[Row]]


def _one_model(weights: Callable[[CellJob], StateDict]) -> Scorer:
    """A scorer that builds one model from ``weights(job)`` and scores it on the job's task."""

    def score(job: CellJob, adapter: ModelAdapter) -> list[Row]:
        t0 = time.perf_counter()
        ctx = job.ctx
        sd = weights(job)
        model = adapter.build(sd)
        del sd
        res = evaluate(adapter, model, open_eval_dataset(ctx.eval_uri(job.task), ctx.storage_options), job.task,
                       batch_size=ctx.batch_size, limit=ctx.limit)
        return [{"task": job.task, "accuracy": res["accuracy"], "n": res["n"], "seconds": time.perf_counter() - t0}]

    return score


def _zoo_checkpoint(job: CellJob, which: str) -> StateDict:
    return read_checkpoint(load_zoo(job.ctx.zoo, storage_options=job.ctx.storage_options), which)


def score_autoswitch(job: CellJob, adapter: ModelAdapter) -> list[Row]:
    """Auto-Switch on θ0 and every task's switches, every task scored in one call: the switches are read
    and the query set extracted once (each task's accuracy equals that of scoring it alone)."""
    from tswitch_ray.eval.autoswitch_eval import evaluate_autoswitch

    t0 = time.perf_counter()
    ctx, so = job.ctx, job.ctx.storage_options
    base, switches = read_switches(job.artifacts, ctx.zoo, ctx.tasks, job.spec.alpha, so,
                                   zoo_fingerprint=ctx.zoo_fingerprint)
    out = evaluate_autoswitch(
        adapter, base, switches, list(ctx.tasks),
        {t: open_eval_dataset(ctx.eval_uri(t), so) for t in ctx.tasks},
        {t: open_eval_dataset(ctx.unlabeled_uri(t), so) for t in ctx.tasks},
        batch_size=ctx.batch_size, limit=ctx.limit, **job.options.model_dump(),
    )
    seconds = time.perf_counter() - t0
    return [{"task": t, "accuracy": out["per_task"][t]["accuracy"], "n": out["per_task"][t]["n"],
             "seconds": seconds, "throughput_ratio": out["throughput_ratio"],
             "models_built": out["per_task"][t]["models_built"], "query_bytes": out["query_bytes"]}
            for t in ctx.tasks]


def score_wemoe(job: CellJob, adapter: ModelAdapter) -> list[Row]:
    """WEMoE or E-WEMoE (the variant is the method's name): one training run, every task scored."""
    from tswitch_ray.eval.wemoe_eval import evaluate_wemoe

    t0 = time.perf_counter()
    ctx, so = job.ctx, job.ctx.storage_options
    zoo = load_zoo(ctx.zoo, storage_options=so)
    base = read_checkpoint(zoo, "base")
    task_sds = [read_checkpoint(zoo, t) for t in ctx.tasks]
    opts = {k: v for k, v in job.options.model_dump().items() if v is not None}  # None: the driver's own default
    out = evaluate_wemoe(
        adapter, base, task_sds, list(ctx.tasks),
        {t: open_eval_dataset(ctx.eval_uri(t), so) for t in ctx.tasks},
        {t: open_eval_dataset(ctx.unlabeled_uri(t), so) for t in ctx.tasks},
        variant=job.info.name, eval_batch_size=ctx.batch_size, limit=ctx.limit, **opts,
    )
    seconds = time.perf_counter() - t0
    return [{"task": t, "accuracy": out["per_task"][t]["accuracy"], "n": out["per_task"][t]["n"],
             "seconds": seconds} for t in ctx.tasks]


SCORERS: dict[str, Scorer] = {
    "zoo-base": _one_model(lambda job: _zoo_checkpoint(job, "base")),
    "zoo-task": _one_model(lambda job: _zoo_checkpoint(job, job.task)),
    "merged-one": _one_model(lambda job: read_merged(f"{job.weights_uri}/merged.safetensors",
                                                     job.ctx.storage_options)),
    "merged-per-task": _one_model(lambda job: read_merged(f"{job.weights_uri}/{job.task}.safetensors",
                                                          job.ctx.storage_options)),
    "switches": _one_model(lambda job: reconstruct_switched(job.artifacts, job.ctx.zoo, job.task, job.spec.alpha,
                                                            job.ctx.storage_options,
                                                            zoo_fingerprint=job.ctx.zoo_fingerprint)),
    "autoswitch": score_autoswitch,
    "wemoe": score_wemoe,
}


def scorer_for(info: MethodInfo) -> Scorer:
    """The scorer method ``info`` names; ``ConfigError`` if there is none by that key."""
    try:
        return SCORERS[info.scorer]
    except KeyError:
        raise ConfigError(f"method {info.name!r} is scored by {info.scorer!r}, which is not a scorer; "
                          f"the scorers are: {', '.join(SCORERS)}.") from None


def score(job: CellJob, adapter: ModelAdapter) -> list[Row]:
    """Score one cell with its method's scorer; one row per task it covered."""
    return scorer_for(job.info)(job, adapter)
