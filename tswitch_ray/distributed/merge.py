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
removes its staging and leaves no marker. With ``output_format: hf`` each
output model is instead a Hugging Face folder ``OUT/merged/`` or
``OUT/<task>/`` that ``from_pretrained`` loads
(:mod:`tswitch_ray.io.hf_folder`), published from the same staged parts.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import ConfigDict, Field

from tswitch_ray.distributed.chunked_build import chunk_numel
from tswitch_ray.distributed.chunked_merge import merge_blocks, merges_in_blocks
from tswitch_ray.distributed.executor import WorkItem, make_executor
from tswitch_ray.distributed.inprocess import resolved_run
from tswitch_ray.distributed.planner import Shard, chunked_merge_memory_bytes, merge_memory_bytes, plan_digest, plan_shards
from tswitch_ray.distributed.merge_reuse import merge_is_current
from tswitch_ray.distributed.progress import PhaseTimer, ShardProgress
from tswitch_ray.errors import ConfigError, ZooError
from tswitch_ray.io.atomic import FileDigest
from tswitch_ray.io.safetensors import SafetensorsStreamWriter, all_or_none, concat_safetensors, safetensors_bytes
from tswitch_ray.io.sink import FolderSink
from tswitch_ray.methods import get_method
from tswitch_ray.options import RunContext, RunOptions, WithRunOptions
from tswitch_ray.zoo import Zoo, check_finite, load_zoo
from tswitch_ray.zoo.taskvectors import read_task_vector

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
    # "hf": each output model is a Hugging Face folder OUT/<model>/ that from_pretrained loads (io/hf_folder.py).
    output_format: Literal["safetensors", "hf"] = "safetensors"
    max_shard_size: str = "5GB"  # the largest file of an "hf" output folder
    # Replace a committed merge of another method, options or zoo in ``out``.
    overwrite: bool = False
    # Tensors of more than this many bytes of fp32 τ are merged in row blocks by the per-element methods
    # (ta, avg: distributed/chunked_merge.py), the same bytes; None or 0 never chunks.
    chunk_bytes: int | None = Field(64 * 2**20, ge=0)


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
    # The committed merge had the same method, options, tasks and checkpoint files: nothing was done.
    up_to_date: bool = False


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
    # Row-block size of large tensors for per-element methods (MergeConfig.chunk_bytes).
    chunk_bytes: int | None = None

    def method_obj(self) -> Any:
        return get_method(self.method, **self.options)


def _load(ctx: MergeContext, name: str, check: bool = True) -> tuple[Zoo, torch.Tensor, list[torch.Tensor]]:
    """θ0 and every τt of one tensor. ``check``: reject non-finite τ (done on the first
    pass over the data only: later passes read the very same bytes)."""
    zoo = _open_zoo(ctx.zoo_uri, ctx.run, ctx.files_identity)
    device = _device(ctx)
    base = zoo.base.read(name).to(device)
    taus = []
    for task in zoo.task_names:
        tau = read_task_vector(zoo.tasks[task], name, base)
        if check:
            check_finite(tau, zoo.tasks[task].uri, name)
        taus.append(tau)
    return zoo, base, taus


def _device(ctx: MergeContext) -> torch.device:
    return torch.device("cuda" if ctx.use_cuda and torch.cuda.is_available() else "cpu")


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
        limit = chunk_numel(ctx.chunk_bytes)
        for name in shard.tensors:
            if merges_in_blocks(method, zoo, name, limit):
                for blocks in merge_blocks(method, zoo, name, limit, _device(ctx), params, check):
                    for writer, block in zip(writers, blocks, strict=True):
                        writer.write_block(name, block)
                continue
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
    models = list(zoo.task_names) if method.per_task else ["merged"]
    hf_files = _hf_config_files(cfg, zoo, models)  # a missing config.json is refused before any work
    sink = merge_sink(cfg, zoo, f"{cfg.method}-{key}")
    inputs = zoo.files_identity()
    current = None if cfg.overwrite else merge_is_current(sink.uri, MERGE_MARKER, MERGE_FORMAT, sink.identity, inputs,
                                                          cfg.run.storage_options)
    if current is not None:
        timer.stop()
        return MergeSummary(out=sink.uri, method=cfg.method, shards=len(shards), bytes_read=0,
                            outputs=[f"{sink.uri}/{o['path']}" for o in current["outputs"]],
                            seconds=time.perf_counter() - t0, phase_seconds=dict(timer.seconds), up_to_date=True)
    sink.start()  # before any work: the folder is writable and holds no other committed merge
    try:
        ctx = MergeContext(zoo_uri=cfg.zoo, method=cfg.method, options=dict(cfg.options), staging=sink.staging_uri,
                           run=cfg.run, files_identity=inputs, chunk_bytes=cfg.chunk_bytes)
        parts, stats = _merge_parts(cfg, ctx, method, zoo, shards, timer)
        timer.start("write")
        outputs = _commit(sink, cfg, zoo, models, parts, [nm for s in shards for nm in s.tensors], inputs, hf_files)
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
    if cfg.output_format != "safetensors":  # safetensors outputs keep the identity they always had
        identity["output_format"] = cfg.output_format
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
            chunk = chunk_numel(cfg.chunk_bytes) if getattr(method, "elementwise", False) else None
            items = [WorkItem(s.shard_id, (ctx, s, params, first_pass), (n + 1) * s.nbytes,
                              chunked_merge_memory_bytes(s, n, chunk)) for s in shards]
            parts = [p for _, ps in executor.map(shard_merge, items, progress.advance) for p in ps]
        return parts, executor.stats
    finally:
        timer.start("shutdown")
        executor.close()


def _hf_config_files(cfg: MergeConfig, zoo: Zoo, models: list[str]) -> dict[str, dict[str, bytes]] | None:
    """For ``output_format: hf``, each output model's configuration files: a task's own, the base's for "merged"."""
    if cfg.output_format != "hf":
        return None
    from tswitch_ray.io.hf_folder import first_config_files, parse_size

    parse_size(cfg.max_shard_size)
    uris = {m: [zoo.tasks[m].uri] if m in zoo.tasks else [] for m in models}
    return {m: first_config_files(uris[m] + [zoo.base.uri], cfg.run.storage_options) for m in models}


def _stage_unselected(sink: FolderSink, zoo: Zoo, models: list[str]) -> tuple[list[FileDigest], dict[str, dict[str, int]]]:
    """For ``hf`` outputs: the base tensors the zoo's globs leave out (e.g. ``classifier.*``) staged per output
    model, from the task's own checkpoint for a per-task output (its head), else the base's; their bytes per model.

    A Hugging Face folder must hold every weight its class has, so a model loads into its own class."""
    rest = [n for n in zoo.base.infos() if n not in zoo.tensor_infos()]
    parts, sizes = [], {}
    for model in models:
        src = zoo.tasks.get(model, zoo.base)
        have = src.infos()
        tensors = {n: (src if n in have else zoo.base).read(n) for n in rest}
        sizes[model] = {n: t.numel() * t.element_size() for n, t in tensors.items()}
        if tensors:
            parts.append(sink.write(f"{model}/part-unselected.safetensors", safetensors_bytes(tensors)))
    return parts, sizes


def _publish_hf(sink: FolderSink, cfg: MergeConfig, zoo: Zoo, model: str, parts: list[str],
                files: Mapping[str, bytes], extra_sizes: Mapping[str, int], meta: Mapping[str, str]) -> list[FileDigest]:
    """One output model as the Hugging Face folder OUT/<model>/, tensors in the base file's order."""
    from tswitch_ray.io.hf_folder import publish_from_parts

    sizes = {**{n: i.nbytes for n, i in zoo.tensor_infos().items()}, **extra_sizes}
    order = [n for n in zoo.base.infos() if n in sizes]
    return publish_from_parts(sink, model, parts, order, sizes, files, max_shard_size=cfg.max_shard_size,
                              metadata=meta, storage_options=cfg.run.storage_options)


def _commit(sink: FolderSink, cfg: MergeConfig, zoo: Zoo, models: list[str], parts: list[FileDigest],
            merged: list[str], inputs: str, hf_files: Mapping[str, Mapping[str, bytes]] | None = None) -> list[str]:
    """Stage the pass-through tensors, then verify every part and publish one file per model; returns the outputs."""
    infos = zoo.tensor_infos()
    passthrough = {nm: zoo.base.read(nm) for nm in infos if nm not in set(merged)}
    if passthrough:
        data = safetensors_bytes(passthrough)
        parts = parts + [sink.write(f"{model}/part-passthrough.safetensors", data) for model in models]
    extra_sizes: dict[str, dict[str, int]] = {}
    if hf_files is not None:
        unselected, extra_sizes = _stage_unselected(sink, zoo, models)
        parts = parts + unselected
    meta = {"tswitch_method": cfg.method, "tswitch_options": json.dumps(cfg.options, sort_keys=True),
            "tswitch_zoo_fingerprint": zoo.fingerprint()}

    def publish() -> list[FileDigest]:
        outputs = []
        for model in models:
            model_parts = sorted(p.uri for p in parts if f"/{model}/part-" in p.uri)
            if hf_files is not None:
                outputs += _publish_hf(sink, cfg, zoo, model, model_parts, hf_files[model], extra_sizes[model], meta)
                continue
            outputs.append(concat_safetensors(model_parts, f"{sink.uri}/{model}.safetensors", order=list(infos),
                                              metadata=meta, storage_options=cfg.run.storage_options))
        return outputs

    # ``inputs``: the checkpoint files' sizes and stamps, which a rerun compares (distributed/merge_reuse.py).
    marker = sink.complete(parts, publish, details={"zoo": {"name": zoo.name, "uri": _absolute(cfg.zoo)},
                                                    "inputs": inputs})
    return [f"{sink.uri}/{o['path']}" for o in marker["outputs"]]


def _absolute(uri: str) -> str:
    """Local paths are recorded absolute, so the marker names the zoo from any working directory."""
    return uri if "://" in uri else os.path.abspath(uri)
