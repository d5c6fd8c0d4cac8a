"""Incremental builds: which tasks a build of a grown, shrunk or changed zoo must compute, and which it keeps.

T-Switch's work is per task: thresholds, masks, signs and knobs of a task
depend on θ0 and that task's θt only (scope "tensor" per tensor, scope
"model" per task: docs/MATH.md §2-§3). So a task keeps its committed
switches as long as the base, the build options, the shard plan and its own
checkpoint files are unchanged; its key (:func:`build_keys`) says exactly
that. The build itself produces no all-task output (merges are `tswitch
merge`'s, with their own commit), so only the changed tasks are computed.

:func:`plan_version` decides, before any work, against the committed head:

* nothing committed, or ``overwrite``: version 1, every task computed;
* a head built with other options or another base (another ``build_key``):
  refused, naming what differs;
* the same tasks with the same keys: up to date, nothing to do;
* otherwise version N+1: tasks whose key is unchanged reuse the head's parts,
  the others (added, or whose checkpoint changed) are computed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tswitch_ray.artifacts import ArtifactWriter
from tswitch_ray.artifacts.versions import (
    VersionStore,
    changes_between,
    task_of_part,
    version_of,
)
from tswitch_ray.distributed.planner import Shard, plan_digest
from tswitch_ray.errors import ArtifactError
from tswitch_ray.zoo import Zoo


def _digest(payload: Any, n: int = 20) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:n]


@dataclass(frozen=True)
class BuildKeys:
    """The keys of one build: the set's (options), each task's (its parts' folder) and the version's."""

    build: dict[str, Any]  # what every version of a set shares: base, options, codec, plan
    build_key: str
    task_keys: dict[str, str]  # in zoo order
    run_key: str


def build_keys(zoo: Zoo, options: dict[str, Any], shards: Sequence[Shard]) -> BuildKeys:
    """Keys of a build of ``zoo`` with ``options`` (alphas, scope, knob, codec, ...) over ``shards``.

    The base enters by content fingerprint and by its files' size and stamps,
    a task by its name and its files' size and stamps: a checkpoint rewritten
    in place gets a new key, hence is computed again.
    """
    build = {
        "fingerprint": zoo.fingerprint(),
        "base_files": zoo.checkpoint_identity("base"),
        **options,
        "plan": plan_digest(list(shards)),
    }
    layout = zoo.layout_identity()
    if layout is not None:  # only then: sets of zoos without task-specific tensors or key rules keep their keys
        build["layout"] = {"task_specific": layout["task_specific"], "base_rules": layout["base_rules"]}
    build_key = _digest(build)
    task_keys = {t: "t-" + _digest([build_key, t, zoo.checkpoint_identity(t), *_task_rules(layout, t)])
                 for t in zoo.task_names}
    return BuildKeys(build=build, build_key=build_key, task_keys=task_keys,
                     run_key=_digest([build_key, list(task_keys.items())]))


def _task_rules(layout: dict[str, Any] | None, task: str) -> list[Any]:
    """A task's key rules (written or detected) as part of its key: other rules read other tensors."""
    rules = (layout or {}).get("rules", {}).get(task)
    return [rules] if rules else []


@dataclass
class VersionPlan:
    """What this build does to the set at ``out``, decided before any work."""

    keys: BuildKeys
    version: int
    compute: list[str]  # tasks to compute (added, replaced, or everything for version 1)
    reuse: list[str]  # tasks whose committed parts the new version lists
    changes: dict[str, list[str]]
    previous: dict[str, Any] | None
    seen_head: bytes | None
    up_to_date: bool = False
    reused_parts: list[dict[str, Any]] = field(default_factory=list)

    def manifest_fields(self) -> dict[str, Any]:
        """The version's fields of the manifest (docs/ARTIFACTS.md "Versions")."""
        prev = self.previous
        return {
            "version": self.version,
            "previous": None if prev is None else {"version": version_of(prev), "run_key": prev.get("run_key"),
                                                   "manifest_sha256": prev.get("manifest_sha256")},
            "changes": self.changes,
            "build_key": self.keys.build_key,
            "build": self.keys.build,
            "task_keys": self.keys.task_keys,
        }

    def reused_knobs(self) -> list[dict[str, Any]]:
        """Scope "model": the previous version's task-wide knobs of the reused tasks."""
        return [k for k in (self.previous or {}).get("knobs") or [] if k.get("task") in self.reuse]


def plan_version(store: VersionStore, keys: BuildKeys, overwrite: bool) -> VersionPlan:
    """The version this build commits, or ``ArtifactError`` when the set at ``store.uri`` may not get one."""
    store.start()  # the output is writable, before any work
    seen = store.head_raw()
    tasks = list(keys.task_keys)
    if seen is None or overwrite:
        return VersionPlan(keys, 1, tasks, [], changes_between(None, keys.task_keys), None, seen)
    head = store.head()  # checked: a corrupt or edited head is refused, never built upon
    assert head is not None
    _refuse_incompatible(store.uri, head, keys)
    if head.get("run_key") == keys.run_key:
        return VersionPlan(keys, version_of(head), [], tasks, changes_between(head, keys.task_keys), head, seen,
                           up_to_date=True)
    changes = changes_between(head, keys.task_keys)
    reuse = changes["kept"]
    parts = [p for p in head["parts"] if task_of_part(p) in reuse]
    compute = [t for t in tasks if t not in reuse]
    return VersionPlan(keys, version_of(head) + 1, compute, reuse, changes, head, seen, reused_parts=parts)


def _refuse_incompatible(uri: str, head: dict[str, Any], keys: BuildKeys) -> None:
    """``ArtifactError`` unless ``head`` was built with the same base, options and plan (then a version is made)."""
    if head.get("build_key") == keys.build_key:
        return
    old = head.get("build") if isinstance(head.get("build"), dict) else None
    if old is None:
        cause = "it was written before artifact sets had versions"
    else:
        names = {"fingerprint": "base model", "base_files": "base checkpoint files", "plan": "shard plan"}
        differs = [k for k in sorted(set(old) | set(keys.build)) if old.get(k) != keys.build.get(k)]
        cause = "it was built with another " + ", ".join(
            f"{names.get(k, k)} ({old.get(k)!r}, now {keys.build.get(k)!r})" if k not in names else names[k]
            for k in differs)
    raise ArtifactError(
        f"{uri}: a committed artifact set already exists there (run_key {head.get('run_key')!r}, created "
        f"{head.get('created_at')}); refusing to replace it: this build cannot be a new version of it, since {cause}. "
        "Nothing was computed. "
        "Choose another output URI or set overwrite (overwrite=True) to replace it.")


def staged_parts(out: str, storage_options: dict[str, Any] | None, plan: VersionPlan,
                 shards: Sequence[Shard]) -> dict[str, dict[int, Any]]:
    """Per task to compute: its parts already staged under its key (an interrupted run's, or an earlier
    version's of the same checkpoint), verified against their sidecars; those shards are not encoded again."""
    ids = {s.shard_id for s in shards}
    out_parts: dict[str, dict[int, Any]] = {}
    for task in plan.compute:
        writer = ArtifactWriter(out, plan.keys.task_keys[task], storage_options=storage_options)
        out_parts[task] = {sid: p for sid, p in writer.existing_parts().items() if sid in ids}
    return out_parts
