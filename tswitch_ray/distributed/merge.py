"""Distributed merging: any `methods/` method, streamed and sharded like the build.

A method declares how many global-statistics rounds it needs (TIES' top-k over
the whole task vector, EMR's per-task λ, ...). Each round, every shard returns
small per-tensor statistics; the driver combines them *in tensor order* (so
the result does not depend on which shard finished first) into parameters for
the next round. The last pass merges each shard's tensors and writes them as a
safetensors part; the driver then concatenates parts into the final files by
byte-range copies, so no process ever holds a whole model.

The outputs are committed by a :class:`~tswitch_ray.io.sink.FolderSink`:
before any work the output folder is probed and a committed merge of another
method, options or zoo is refused (unless ``overwrite``); parts stage under
``OUT/.staging/``; once every part verifies against the checksum its worker
recorded, ``OUT/merged.safetensors`` (or ``OUT/<task>.safetensors``) is
written and ``OUT/merge.json`` (:data:`MERGE_MARKER`) last. A failed merge
removes its staging and leaves no marker.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import ConfigDict, Field

from tswitch_ray.distributed.executor import WorkItem, make_executor
from tswitch_ray.distributed.inprocess import resolved_run
from tswitch_ray.distributed.planner import Shard, merge_memory_bytes, plan_digest, plan_shards
from tswitch_ray.distributed.progress import PhaseTimer, ShardProgress
from tswitch_ray.errors import ConfigError, ZooError
from tswitch_ray.io.atomic import FileDigest
from tswitch_ray.io.safetensors import SafetensorsStreamWriter, all_or_none, concat_safetensors, safetensors_bytes
from tswitch_ray.io.sink import FolderSink
from tswitch_ray.methods import get_method
from tswitch_ray.options import RunContext, RunOptions, WithRunOptions
from tswitch_ray.switch import task_vector
from tswitch_ray.zoo import Zoo, check_finite, load_zoo

# The commit marker of a merge output folder, written last (docs/ARTIFACTS.md "Merge outputs").
MERGE_MARKER = "merge.json"
MERGE_FORMAT = "tswitch-ray/merge"


class MergeConfig(WithRunOptions):
    """Everything `tswitch merge` needs; how it runs is ``run`` (flat ``executor=``, ... are moved there)."""

    model_config = ConfigDict(extra="forbid")

    zoo: str
    method: str
    out: str
    options: dict[str, Any] = Field(default_factory=dict)
    shard_bytes: int = 32 * 2**20
    # Replace a committed merge of another method, options or zoo in ``out``.
    overwrite: bool = False


@dataclass
class MergeSummary:
    out: str
    method: str
    outputs: list[str]
    shards: int
    bytes_read: int
    seconds: float
    peak_rss_by_worker: dict[str, int] = field(default_factory=dict)
    # Wall seconds per phase, in run order: plan, start-up, statistics r/R (per round), merge, shutdown, write.
    phase_seconds: dict[str, float] = field(default_factory=dict)


@functools.lru_cache(maxsize=4)
def _open_zoo(zoo_uri: str, run: RunOptions, files_identity: str) -> Zoo:
    # files_identity is part of the cache key: a checkpoint rewritten in place gets fresh headers.
    return load_zoo(zoo_uri, storage_options=run.storage_options)


@dataclass(frozen=True)
class MergeContext(RunContext):
    """What a merge shard task needs: where the zoo and the staging are, the method and how the job runs."""

    zoo_uri: str
    method: str
    options: Mapping[str, Any] = field(hash=False)  # as given; validated by the registry in method_obj()
    staging: str
    run: RunOptions
    files_identity: str = ""

    def method_obj(self) -> Any:
        return get_method(self.method, **self.options)


def _load(ctx: MergeContext, name: str, check: bool = True) -> tuple[Zoo, torch.Tensor, list[torch.Tensor]]:
    """θ0 and every τt of one tensor. ``check``: reject non-finite τ (done on the first
    pass over the data only: later passes read the very same bytes)."""
    zoo = _open_zoo(ctx.zoo_uri, ctx.run, ctx.files_identity)
    device = torch.device("cuda" if ctx.use_cuda and torch.cuda.is_available() else "cpu")
    base = zoo.base.read(name).to(device)
    taus = []
    for task in zoo.task_names:
        tau = task_vector(zoo.tasks[task].read(name).to(device), base, name)
        if check:
            check_finite(tau, zoo.tasks[task].uri, name)
        taus.append(tau)
    return zoo, base, taus


def shard_stats(ctx: MergeContext, shard: Shard, rnd: int, params: Any) -> list[tuple[str, Any]]:
    """One statistics round over the shard's tensors, in shard order."""
    method = ctx.method_obj()
    out = []
    for name in shard.tensors:
        _, base, taus = _load(ctx, name, check=rnd == 0)
        out.append((name, method.tensor_stats(rnd, name, base, taus, params)))
    return out


def shard_merge(ctx: MergeContext, shard: Shard, params: Any, check: bool = True) -> list[FileDigest]:
    """Merge the shard's tensors and stage them as one safetensors part per output model.

    Each merged tensor is streamed to its part as soon as it exists (the
    parts' headers come from the base's tensor infos), so a per-task method
    with N tasks holds one tensor's N outputs, never the shard's: EMR on 30
    tasks held 30 × the shard before (4.87 GiB Σ PSS measured on ViT-B/16).
    """
    method = ctx.method_obj()
    zoo = _open_zoo(ctx.zoo_uri, ctx.run, ctx.files_identity)
    models = list(zoo.task_names) if method.per_task else ["merged"]
    infos = zoo.tensor_infos()
    layout = [infos[name] for name in shard.tensors]
    paths = [f"{ctx.staging}/{model}/part-{shard.shard_id:05d}.safetensors" for model in models]
    with all_or_none(SafetensorsStreamWriter(path, layout, storage_options=ctx.storage_options, hashed=True)
                     for path in paths) as writers:
        for name in shard.tensors:
            _, base, taus = _load(ctx, name, check=check)
            merged = method.merge_tensor(name, base, taus, params)
            del taus
            merged_list = merged if method.per_task else [merged]
            for writer, tensor in zip(writers, merged_list, strict=True):
                writer.write(name, tensor.to(base.dtype))
            del merged, merged_list
    return [writer.digest() for writer in writers]


def run_merge(cfg: MergeConfig, zoo: Zoo | None = None) -> MergeSummary:
    """Merge ``cfg.zoo`` with ``cfg.method`` into ``cfg.out``, committed by :data:`MERGE_MARKER` last.

    ``zoo``: that zoo already loaded (an evaluation passes its own, so its fingerprint is computed once)."""
    t0 = time.perf_counter()
    timer = PhaseTimer()
    timer.start("plan")
    try:
        method = get_method(cfg.method, **cfg.options)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"Invalid merge method or option: {exc}") from exc
    zoo = zoo if zoo is not None else load_zoo(cfg.zoo, storage_options=cfg.run.storage_options)
    zoo.validate()
    infos = zoo.tensor_infos()
    shards = plan_shards(infos, cfg.shard_bytes)
    if not shards:
        raise ZooError(f"{cfg.zoo}: no floating-point tensors selected; nothing to merge.")
    key = hashlib.sha256(json.dumps([zoo.fingerprint(), list(zoo.task_names), cfg.method, cfg.options,
                                     plan_digest(shards)], sort_keys=True, default=str).encode()).hexdigest()[:16]
    sink = merge_sink(cfg, zoo, f"{cfg.method}-{key}")
    sink.start()  # before any work: the folder is writable and holds no other committed merge
    try:
        ctx = MergeContext(zoo_uri=cfg.zoo, method=cfg.method, options=dict(cfg.options), staging=sink.staging_uri,
                           run=cfg.run, files_identity=zoo.files_identity())
        parts, stats = _merge_parts(cfg, ctx, method, zoo, shards, timer)
        timer.start("write")
        models = list(zoo.task_names) if method.per_task else ["merged"]
        outputs = _commit(sink, cfg, zoo, models, parts, [nm for s in shards for nm in s.tensors])
    except BaseException:
        sink.failed()
        raise
    timer.stop()
    return MergeSummary(out=sink.uri, method=cfg.method, outputs=outputs, shards=len(shards),
                        bytes_read=stats.bytes_read, seconds=time.perf_counter() - t0,
                        peak_rss_by_worker=stats.peak_rss_by_worker, phase_seconds=dict(timer.seconds))


def merge_sink(cfg: MergeConfig, zoo: Zoo, staging_key: str) -> FolderSink:
    """The sink of a merge output folder; its identity is what a rerun must match to replace it."""
    identity = {"method": cfg.method, "options": cfg.options, "zoo_fingerprint": zoo.fingerprint(),
                "tasks": list(zoo.task_names)}
    return FolderSink(cfg.out, marker=MERGE_MARKER, fmt=MERGE_FORMAT, identity=identity, staging_key=staging_key,
                      what="merge outputs", storage_options=cfg.run.storage_options, overwrite=cfg.overwrite)


def _merge_parts(cfg: MergeConfig, ctx: MergeContext, method: Any, zoo: Zoo, shards: list[Shard],
                 timer: PhaseTimer) -> tuple[list[FileDigest], Any]:
    """The statistics rounds and the merge pass; returns the staged parts and the executor's stats."""
    n = len(zoo.task_names)
    timer.start("start-up")
    executor = make_executor(resolved_run(cfg.run, (n + 1) * sum(s.nbytes for s in shards)))
    order = [nm for s in shards for nm in s.tensors]
    try:
        rounds = method.stat_rounds
        total = (rounds + 1) * (n + 1) * sum(s.nbytes for s in shards)
        with ShardProgress(total, enabled=cfg.run.show_progress, description=f"merge {cfg.method}",
                           timer=timer) as progress:
            params: Any = None
            for rnd in range(rounds):
                progress.set_phase(f"statistics {rnd + 1}/{rounds}")
                items = [WorkItem(s.shard_id, (ctx, s, rnd, params), (n + 1) * s.nbytes, merge_memory_bytes(s, n)) for s in shards]
                by_name: dict[str, Any] = {}
                for _, pairs in executor.map(shard_stats, items, progress.advance):
                    by_name.update(pairs)
                params = method.combine(rnd, [by_name[nm] for nm in order], params)
            progress.set_phase("merge")
            first_pass = rounds == 0
            items = [WorkItem(s.shard_id, (ctx, s, params, first_pass), (n + 1) * s.nbytes, merge_memory_bytes(s, n))
                     for s in shards]
            parts = [p for _, ps in executor.map(shard_merge, items, progress.advance) for p in ps]
        return parts, executor.stats
    finally:
        timer.start("shutdown")
        executor.close()


def _commit(sink: FolderSink, cfg: MergeConfig, zoo: Zoo, models: list[str], parts: list[FileDigest],
            merged: list[str]) -> list[str]:
    """Stage the pass-through tensors, then verify every part and publish one file per model; returns the outputs."""
    infos = zoo.tensor_infos()
    passthrough = {nm: zoo.base.read(nm) for nm in infos if nm not in set(merged)}
    if passthrough:
        data = safetensors_bytes(passthrough)
        parts = parts + [sink.write(f"{model}/part-passthrough.safetensors", data) for model in models]
    meta = {"tswitch_method": cfg.method, "tswitch_options": json.dumps(cfg.options, sort_keys=True),
            "tswitch_zoo_fingerprint": zoo.fingerprint()}

    def publish() -> list[FileDigest]:
        outputs = []
        for model in models:
            model_parts = sorted(p.uri for p in parts if f"/{model}/part-" in p.uri)
            outputs.append(concat_safetensors(model_parts, f"{sink.uri}/{model}.safetensors", order=list(infos),
                                              metadata=meta, storage_options=cfg.run.storage_options))
        return outputs

    marker = sink.complete(parts, publish, details={"zoo": {"name": zoo.name, "uri": _absolute(cfg.zoo)}})
    return [f"{sink.uri}/{o['path']}" for o in marker["outputs"]]


def _absolute(uri: str) -> str:
    """Local paths are recorded absolute, so the marker names the zoo from any working directory."""
    return uri if "://" in uri else os.path.abspath(uri)
