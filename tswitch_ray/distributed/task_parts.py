"""The build's per-task pass: what each task keeps as its own (heads, changed buffers), staged losslessly.

One work item per task reads that task's task-specific tensors and non-float
buffers (a buffer equal to the base's is not stored: reconstruct copies the
base's) and stages them as ``parts/<task_key>/task-<task>.parquet``
(:mod:`tswitch_ray.artifacts.task_tensors`), beside that task's switch parts.
Like them, a part already staged under the task's key is reused, so a new
version of a grown zoo reads only its new tasks' own tensors. The driver then lists the entries, and
each task's key layout, in the manifest.
"""

from __future__ import annotations

from typing import Any

from tswitch_ray.artifacts.task_tensors import staged_task_tensors, write_task_tensors
from tswitch_ray.distributed.executor import LocalExecutor, WorkItem
from tswitch_ray.distributed.planner import TASK_OVERHEAD_BYTES
from tswitch_ray.io.fs import open_fs
from tswitch_ray.zoo import Zoo, load_zoo


def stage_task_part(ctx: Any, task: str, task_key: str) -> dict[str, Any] | None:
    """Stage ``task``'s own tensors (``ctx``: the build's ShardContext); its manifest entry, None if it has none."""
    fs, root = open_fs(ctx.out, ctx.storage_options)
    staged = staged_task_tensors(fs, root, task_key, task)
    if staged is not None:
        return staged
    zoo = load_zoo(ctx.zoo_uri, storage_options=ctx.run.storage_options)
    tensors = zoo.read_own_tensors(task)
    return write_task_tensors(fs, root, task_key, task, tensors) if tensors else None


def own_bytes(zoo: Zoo, task: str) -> int:
    infos = zoo.reader(task).infos()
    return sum(infos[name].nbytes for name, _ in zoo.own_tensor_names(task))


def stage_task_parts(executor: LocalExecutor, ctx: Any, zoo: Zoo, task_keys: dict[str, str]) -> list[dict[str, Any]]:
    """Every task's entry, in the zoo's task order (tasks with nothing of their own have none)."""
    sizes = {t: own_bytes(zoo, t) for t in zoo.task_names}
    todo = [t for t in zoo.task_names if zoo.own_tensor_names(t)]
    items = [WorkItem(i, (ctx, t, task_keys[t]), sizes[t], TASK_OVERHEAD_BYTES + 3 * sizes[t]) for i, t in enumerate(todo)]
    by_index = dict(executor.map(stage_task_part, items))
    return [by_index[i] for i in range(len(todo)) if by_index[i] is not None]


def manifest_fields(zoo: Zoo, entries: list[dict[str, Any]]) -> dict[str, Any]:
    """What the switch manifest adds for task-specific tensors and key layouts; empty when the zoo uses neither."""
    layouts = {t: zoo.key_layout(t) for t in zoo.task_names}
    layouts = {t: lay for t, lay in layouts.items() if lay["rules"] or lay["absent"] or lay["names"]}
    base_rules = [list(p) for p in zoo.base.pairs()]
    out: dict[str, Any] = {}
    if zoo.task_specific:
        out["task_specific"] = list(zoo.task_specific)
    if entries:
        out["task_tensors"] = entries
    if layouts:
        out["layouts"] = layouts
    if base_rules:
        out["base_rules"] = base_rules
    return out
