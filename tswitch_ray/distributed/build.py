"""Distributed switch build: zoo -> task vectors -> exact thresholds -> switches -> Parquet.

Scope "tensor" is one pass: each shard task reads θ0 and then each θt of its
tensors, one checkpoint at a time, and encodes every α at once.

Scope "model" needs thresholds over each task's whole task vector:

0. every shard reads a small sample (1/32, a few slices per tensor) and
   returns its coarse histograms per task; the driver adds them and predicts,
   per task, sign and α, a window of buckets that holds the wanted rank
   (:func:`window_request`, Floyd–Rivest);
1. every shard returns coarse histograms per task (sparse on the wire) and
   the exact bit patterns of its elements inside the windows; the driver adds
   them, finds the bucket that holds each rank and, when the window covers it
   (checked), resolves the exact threshold from the gathered patterns;
2. only for a task whose window missed: every shard returns fine histograms
   of the buckets that hold its ranks (the exact fallback, rarely run);
3. every shard encodes with the global thresholds and returns kept
   statistics, from which the driver derives each task's knob.

So the data is read twice (plus the sample), not three times.

A part holds one task's rows of one shard, staged under that task's key
(distributed/incremental.py): a part already staged under the same key is
reused, so an interrupted run restarted with the same command recomputes only
what is missing, and a build of a zoo that gained, lost or changed tasks
computes only the tasks whose key is new and commits a new version of the set
that lists the other tasks' committed parts (artifacts/versions.py). Nothing
is visible to readers before the manifest commit.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from pydantic import ConfigDict, Field, field_validator, model_validator

from tswitch_ray import __version__
from tswitch_ray.artifacts import ArtifactWriter
from tswitch_ray.artifacts.encoding import encode_kept
from tswitch_ray.artifacts.versions import VersionStore
from tswitch_ray.artifacts.writer import CommitConflict
from tswitch_ray.device import pick_device
from tswitch_ray.distributed.chunked_build import (chunk_numel, chunked_switches, chunked_thresholds, is_chunked,
                                                   tau_blocks)
from tswitch_ray.distributed.executor import LocalExecutor, WorkItem, make_executor
from tswitch_ray.distributed.incremental import BuildKeys, VersionPlan, build_keys, plan_version, staged_parts
from tswitch_ray.distributed.planner import Shard, chunked_build_memory_bytes, plan_shards
from tswitch_ray.distributed.inprocess import resolved_run
from tswitch_ray.distributed.progress import PhaseTimer, ShardProgress
from tswitch_ray.distributed.task_parts import manifest_fields, stage_task_parts
from tswitch_ray.errors import ZooError
from tswitch_ray.io.checkpoints import CheckpointReader, TaskVectorSource, dtype_to_torch
from tswitch_ray.io.tables import read_table
from tswitch_ray.options import RunContext, RunOptions, WithRunOptions
from tswitch_ray.switch import (
    KeptStats,
    knob,
    refine_request,
    resolve_thresholds,
    signed_fine_histograms,
    task_vector,
    tensor_thresholds,
)
from tswitch_ray.switch.binarize import SwitchScratch, kept_switches
from tswitch_ray.switch.thresholds import Cut, RefineRequest, Thresholds, WindowPass, covers, resolve_cut, window_request
from tswitch_ray.zoo import Zoo, load_zoo
from tswitch_ray.zoo.taskvectors import read_task_vector

# Sample of scope "model" (phase 0): SAMPLE_CHUNKS evenly spaced slices of
# every tensor, SAMPLE_FRACTION of its elements in all; tensors up to
# SAMPLE_WHOLE_NUMEL elements are taken whole. Slices, not a stride, so the
# sample reads ~1/32 of the bytes; several of them, so a tensor whose rows
# differ is not judged by its first rows only.
SAMPLE_CHUNKS = 4
SAMPLE_FRACTION = 1 / 32
SAMPLE_WHOLE_NUMEL = 1 << 16

CODEC = "rice-v1"


class BuildConfig(WithRunOptions):
    """Everything `tswitch build` needs; the CLI and the Python API both fill it.

    How it runs (executor, Ray, workers, GPUs, storage options, progress) is
    ``run``; the flat ``executor=``, ``storage_options=``, ... of earlier
    versions are still accepted and moved there.
    """

    model_config = ConfigDict(extra="forbid")

    zoo: str
    out: str
    alphas: list[float] = Field(default_factory=lambda: [0.6])
    scope: Literal["tensor", "model"] = "tensor"
    # None: the scope's default, "authors" for scope "tensor", "exact" for "model" (docs/MATH.md "Cut rules").
    cut: Cut | None = None
    knob: Literal["rms", "mean"] = "rms"
    # 8 MiB ≈ half a ViT-B transformer block in fp16 (38 shards for ViT-B/16).
    # A worker holds one shard's encoded rows and Parquet bytes, which grow
    # with tasks x α: on the 30-task ViT-B/16 zoo, 3 α, the whole job peaked
    # at 3.44 GiB PSS with 16 MiB shards and 2.87 GiB with 8 MiB, in the same
    # time (bench/bench_build.py); 64 MiB gave 3 shards and idle workers.
    shard_bytes: int = 8 * 2**20
    # Tensors of more than this many bytes of fp32 τ are processed in row blocks of about this size
    # (distributed/chunked_build.py): a worker's peak then no longer grows with the largest tensor.
    # 64 MiB leaves every ViT and LLM block tensor whole; None or 0 never chunks. Outputs are the same bytes.
    chunk_bytes: int | None = Field(64 * 2**20, ge=0)
    # Replace a committed artifact set built with other options in ``out``.
    overwrite: bool = False

    @field_validator("alphas")
    @classmethod
    def _alphas_in_range(cls, v: list[float]) -> list[float]:
        if not v:
            raise ValueError("at least one discard ratio α is needed")
        bad = [a for a in v if not (0.0 <= a < 1.0)]
        if bad:
            raise ValueError(f"discard ratio α must lie in [0, 1); got {bad}")
        return sorted(set(v))

    @model_validator(mode="after")
    def _resolve_cut(self) -> BuildConfig:
        self.cut = resolve_cut(self.cut, self.scope)  # type: ignore[assignment]
        return self


@dataclass
class BuildSummary:
    """What the run did; printed by the CLI and logged by the API."""

    out: str
    run_key: str
    shards: int
    shards_reused: int
    tasks: int
    alphas: list[float]
    scope: str
    bytes_read: int
    seconds: float
    fp32_bytes: int
    encoded_bytes: int
    cut: str = "exact"
    peak_rss_by_worker: dict[str, int] = field(default_factory=dict)
    # Wall seconds per phase, in run order: plan, start-up (ray.init or
    # attaching), sample / histograms / refine (scope "model"), encode,
    # commit, shutdown. Their sum is ``seconds`` less a few milliseconds.
    phase_seconds: dict[str, float] = field(default_factory=dict)
    # Per α: (encoded bytes of every task's switch, fp32 bytes of the task vectors they replace).
    storage_by_alpha: dict[float, tuple[int, int]] = field(default_factory=dict)
    # Per task whose tensor names differ from the base's: the rules used and whether they were detected.
    key_maps: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Bytes of the per-task parts (task-specific tensors, changed buffers), stored losslessly.
    task_tensor_bytes: int = 0
    # Versions (distributed/incremental.py): the version committed (or found
    # up to date), the tasks computed and the tasks whose committed parts it
    # reuses, and the (task, shard) parts this run encoded or reused.
    version: int = 1
    up_to_date: bool = False
    tasks_computed: list[str] = field(default_factory=list)
    tasks_reused: list[str] = field(default_factory=list)
    tasks_removed: list[str] = field(default_factory=list)
    parts_computed: int = 0
    parts_reused: int = 0

    @property
    def ratio(self) -> float:
        return self.encoded_bytes / self.fp32_bytes if self.fp32_bytes else 0.0


@dataclass(frozen=True)
class ShardContext(RunContext):
    """What a shard task needs to open the zoo and the output, without holding tensors."""

    zoo_uri: str
    out: str
    run_key: str
    alphas: tuple[float, ...]
    scope: str
    knob_mode: str
    run: RunOptions
    cut: str = "exact"
    # (task, key) of the tasks this build computes; a task's parts stage under its key.
    task_keys: tuple[tuple[str, str], ...] = ()
    # Row-block size of large tensors (BuildConfig.chunk_bytes).
    chunk_bytes: int | None = None


@functools.lru_cache(maxsize=4)
def _open_zoo(zoo_uri: str, run: RunOptions, run_key: str) -> Zoo:
    # One zoo object per worker process and run: headers are parsed once, not per shard. The run key hashes the
    # files' sizes and stamps, so a checkpoint rewritten in place is never read at a stale header's offsets.
    return load_zoo(zoo_uri, storage_options=run.storage_options)


class _TauBuffer:
    """One float32 buffer per shard task that every τ of the shard is computed into (grown as needed)."""

    def __init__(self, device: Any) -> None:
        self.device = device
        self.data = torch.empty(0, dtype=torch.float32, device=device)

    def fit(self, numel: int) -> Any:
        if self.data.numel() < numel:
            self.data = torch.empty(numel, dtype=torch.float32, device=self.device)
        return self.data


def _read_tau(zoo: Zoo, task: str, name: str, base: Any, device: Any, buf: _TauBuffer) -> Any:
    """τ of one task and tensor, in ``buf``: valid until the next call with the same buffer."""
    # No separate isfinite pass: the first pass over every τ (coarse
    # histograms for scope "model", tensor_thresholds for scope "tensor")
    # already counts the non-finite buckets and raises ZooError naming the
    # tensor and the files (see _label).
    return read_task_vector(zoo.tasks[task], name, base, out=buf.fit(base.numel()))


def _read_base(zoo: Zoo, name: str, device: Any) -> Any:
    # fp16/bf16 θ0 widened to fp32 once per tensor (exact): every τ = θt − θ0
    # of the tensor's N tasks is then an fp32 − fp32 subtraction, ~4x faster
    # on the CPU than torch's mixed fp32 − fp16 one, and bit-identical. fp64
    # stays fp64 (narrowing it first would round twice).
    base = zoo.base.read(name).to(device)
    return base.to(torch.float32) if base.dtype in (torch.float16, torch.bfloat16) else base


def _label(zoo: Zoo, task: str, name: str) -> str:
    """Tensor label for threshold errors: the tensor, its task and both files."""
    return f"{name} (task {task}: {zoo.tasks[task].uri} minus base {zoo.base.uri})"


def _device(ctx: ShardContext) -> Any:
    return pick_device(None if ctx.use_cuda else "cpu")


# --- shard functions (run inside Ray tasks or locally) ------------------------

def _sample_spans(numel: int) -> list[tuple[int, int]]:
    """Element ranges [start, end) of the sample of a tensor of ``numel`` elements."""
    if numel <= SAMPLE_WHOLE_NUMEL:
        return [(0, numel)]
    size = max(1, int(numel * SAMPLE_FRACTION) // SAMPLE_CHUNKS)
    step = numel // SAMPLE_CHUNKS
    return [(i * step, i * step + size) for i in range(SAMPLE_CHUNKS)]


def _read_sample(reader: CheckpointReader, name: str, spans: list[tuple[int, int]], device: Any) -> Any:
    """The sampled elements of one tensor, flat, in its stored dtype (only those bytes are read)."""
    info = reader.infos()[name]
    if sys.byteorder != "little" or spans == [(0, info.numel)]:
        flat = reader.read(name).reshape(-1)
        return torch.cat([flat[a:b] for a, b in spans]).to(device)
    dtype = dtype_to_torch(info.dtype)
    size = torch.empty((), dtype=dtype).element_size()
    parts = [torch.frombuffer(bytearray(reader.read_range(name, a * size, b * size)), dtype=dtype) for a, b in spans]
    return torch.cat(parts).to(device)


def shard_sample(ctx: ShardContext, shard: Shard, tasks: Sequence[str]) -> dict[str, Any]:
    """Phase 0 of scope "model": per task of ``tasks``, coarse histograms of a ~1/32 sample of this shard."""
    zoo = _open_zoo(ctx.zoo_uri, ctx.run, ctx.run_key)
    device = _device(ctx)
    passes = {task: WindowPass(RefineRequest()) for task in tasks}
    for name in shard.tensors:
        spans = _sample_spans(zoo.base.infos()[name].numel)
        base = _sample_base(zoo, name, spans, device)
        full_base = None
        for task in tasks:
            if isinstance(zoo.tasks[task], TaskVectorSource):
                # An adapter's τ is exact, not θt rounded to the stored dtype: sample it from its τ.
                full_base = _read_base(zoo, name, device) if full_base is None else full_base
                flat = read_task_vector(zoo.tasks[task], name, full_base).reshape(-1)
                tau = torch.cat([flat[a:b] for a, b in spans])
            else:
                tau = task_vector(_read_sample(zoo.tasks[task], name, spans, device), base, name)
            passes[task].add(tau, _label(zoo, task, name))
    return {task: p.result()[0] for task, p in passes.items()}


def _sample_base(zoo: Zoo, name: str, spans: list[tuple[int, int]], device: Any) -> Any:
    base = _read_sample(zoo.base, name, spans, device)
    return base.to(torch.float32) if base.dtype in (torch.float16, torch.bfloat16) else base


def shard_histograms(ctx: ShardContext, shard: Shard, windows: dict[str, RefineRequest]) -> dict[str, Any]:
    """Pass 1 of scope "model": per task, coarse histograms and the in-window bit patterns of this shard."""
    zoo = _open_zoo(ctx.zoo_uri, ctx.run, ctx.run_key)
    device = _device(ctx)
    passes = {task: WindowPass(windows[task]) for task in windows}
    buf = _TauBuffer(device)
    limit = chunk_numel(ctx.chunk_bytes)
    for name in shard.tensors:
        base = _LazyBase(zoo, name, device)
        for task in windows:
            for tau in _taus(zoo, task, name, limit, device, buf, base):
                passes[task].add(tau, _label(zoo, task, name))
    return {task: p.result() for task, p in passes.items()}


def shard_fine_histograms(ctx: ShardContext, shard: Shard, requests: dict[str, Any]) -> dict[str, Any]:
    """Pass 2 of scope "model", only for the tasks in ``requests``: fine histograms of the boundary buckets."""
    zoo = _open_zoo(ctx.zoo_uri, ctx.run, ctx.run_key)
    device = _device(ctx)
    out: dict[str, Any] = {}
    buf = _TauBuffer(device)
    limit = chunk_numel(ctx.chunk_bytes)
    for name in shard.tensors:
        base = _LazyBase(zoo, name, device)
        for task in requests:
            for tau in _taus(zoo, task, name, limit, device, buf, base):
                f = signed_fine_histograms(tau, requests[task])
                out[task] = f if task not in out else out[task] + f
    return out


class _LazyBase:
    """θ0 of one tensor, read on first use: a tensor processed in row blocks by every task never holds it whole."""

    def __init__(self, zoo: Zoo, name: str, device: Any) -> None:
        self.zoo, self.name, self.device, self._base = zoo, name, device, None

    def get(self) -> Any:
        if self._base is None:
            self._base = _read_base(self.zoo, self.name, self.device)
        return self._base


def _taus(zoo: Zoo, task: str, name: str, limit: int | None, device: Any, buf: _TauBuffer,
          base: _LazyBase) -> Iterator[Any]:
    """τ of one task and tensor: in row blocks when it is chunked (distributed/chunked_build.py), else whole."""
    if is_chunked(zoo, task, name, limit):
        yield from tau_blocks(zoo, task, name, limit, device)
        return
    yield _read_tau(zoo, task, name, base.get(), device, buf)


def shard_encode(ctx: ShardContext, shard: Shard, global_thresholds: dict[str, list[Thresholds]] | None,
                 tasks: Sequence[str]) -> dict[tuple[str, float], KeptStats]:
    """Final pass: switches of every task of ``tasks`` and α for this shard, one Parquet part per task.

    Returns the kept statistics per (task, α) so the driver can compute
    scope-"model" knobs without reading anything back.
    """
    zoo = _open_zoo(ctx.zoo_uri, ctx.run, ctx.run_key)
    device = _device(ctx)
    totals: dict[tuple[str, float], KeptStats] = {}
    rows: dict[str, list[dict[str, Any]]] = {task: [] for task in tasks}
    scratch = SwitchScratch()
    buf = _TauBuffer(device)
    limit = chunk_numel(ctx.chunk_bytes)
    for name in shard.tensors:
        info = zoo.base.infos()[name]
        lazy = _LazyBase(zoo, name, device)
        for task in tasks:
            if is_chunked(zoo, task, name, limit):
                ths = global_thresholds[task] if global_thresholds is not None else chunked_thresholds(
                    zoo, task, name, list(ctx.alphas), ctx.cut, limit, device, _label(zoo, task, name))
                for th, (stats, enc) in zip(ths, chunked_switches(zoo, task, name, ths, limit, device)):
                    key = (task, th.alpha)
                    totals[key] = stats if key not in totals else totals[key] + stats
                    rows[task].append(_row(task, name, info, th, stats, enc, ctx))
                if name == shard.tensors[-1]:
                    # Written now, not with the other tasks': a large tensor's encoded rows are tens of MB per task.
                    _write_part(ctx, shard, task, rows.pop(task))
                continue
            tau = _read_tau(zoo, task, name, lazy.get(), device, buf)
            if global_thresholds is not None:
                ths = global_thresholds[task]
            else:
                ths = tensor_thresholds(tau, list(ctx.alphas), _label(zoo, task, name), cut=ctx.cut)
            numel = tau.numel()
            for th, sw in zip(ths, kept_switches(tau, ths, scratch)):
                key = (task, th.alpha)
                totals[key] = sw.stats if key not in totals else totals[key] + sw.stats
                enc = encode_kept(numel, sw.positions, sw.positive, dropped_pos=sw.dropped)
                rows[task].append(_row(task, name, info, th, sw.stats, enc, ctx))
            del tau
        del lazy
    for task in list(rows):
        _write_part(ctx, shard, task, rows.pop(task))
    return totals


def _memory(ctx: ShardContext, shard: Shard) -> int:
    """The planner's working-set estimate of one shard task (Ray's ``memory`` resource)."""
    return chunked_build_memory_bytes(shard, chunk_numel(ctx.chunk_bytes), len(ctx.alphas))


def _write_part(ctx: ShardContext, shard: Shard, task: str, rows: list[dict[str, Any]]) -> None:
    ArtifactWriter(ctx.out, dict(ctx.task_keys)[task], storage_options=ctx.storage_options).write(shard.shard_id, rows)


def _staged_totals(writer: ArtifactWriter, part: Any) -> dict[tuple[str, float], KeptStats]:
    """Kept statistics per (task, α) of a part staged by an earlier, interrupted run.

    Summed in row order, which is the order :func:`shard_encode` summed them
    in (float64 values round-trip through Parquet exactly), so a resumed
    build gets the same knobs, bit for bit, as an uninterrupted one.
    """
    table = read_table(f"{writer.uri}/{part.path}", writer.storage_options,
                       columns=["task", "alpha", "kept", "sum_abs", "sum_sq"])
    totals: dict[tuple[str, float], KeptStats] = {}
    for row in table.to_pylist():
        key = (row["task"], float(row["alpha"]))
        st = KeptStats(int(row["kept"]), float(row["sum_abs"]), float(row["sum_sq"]))
        totals[key] = st if key not in totals else totals[key] + st
    return totals


def _row(task: str, name: str, info: Any, th: Thresholds, stats: KeptStats, enc: Any, ctx: ShardContext) -> dict[str, Any]:
    return {
        "task": task,
        "tensor": name,
        "alpha": th.alpha,
        "scope": ctx.scope,
        "knob_mode": ctx.knob_mode,
        "shape": list(info.shape),
        "dtype": info.dtype,
        "numel": int(np.prod(info.shape)) if info.shape else 1,
        "n_pos": th.n_pos,
        "n_neg": th.n_neg,
        "d_pos": th.d_pos,
        "d_neg": th.d_neg,
        "t_pos": th.t_pos,
        "t_neg": th.t_neg,
        "kept": stats.kept,
        "sum_abs": stats.sum_abs,
        "sum_sq": stats.sum_sq,
        # Scope "tensor": the knob is this tensor's own. Scope "model": the
        # task-wide knob is known only at commit and lives in the manifest.
        "knob": knob(stats, ctx.knob_mode) if ctx.scope == "tensor" else None,
        "encoded": enc,
    }


# --- driver -------------------------------------------------------------------

def build_options(cfg: BuildConfig) -> dict[str, Any]:
    """The options every version of an artifact set shares (with the base and the plan: its build key)."""
    options = {"alphas": cfg.alphas, "scope": cfg.scope, "knob": cfg.knob, "codec": CODEC}
    if cfg.cut != "exact":  # only then: sets built with the one rule of earlier versions keep their keys
        options["cut"] = cfg.cut
    return options


def run_build(cfg: BuildConfig) -> BuildSummary:
    """Build switch artifacts for every task and α of a zoo; atomic commit at the end.

    When ``cfg.out`` holds a set built with the same base and options, only
    the tasks it lacks (or whose checkpoint changed) are computed and a new
    version is committed; an identical rerun does nothing. Both are decided
    before any work, as is the refusal of a set that cannot get a version.
    """
    t0 = time.perf_counter()
    timer = PhaseTimer()
    timer.start("plan")
    zoo, shards, keys = _plan(cfg)
    store = VersionStore(cfg.out, cfg.run.storage_options)
    plan = plan_version(store, keys, cfg.overwrite)
    if plan.up_to_date:
        timer.stop()
        return _summary(cfg, zoo, shards, plan, plan.previous or {}, {}, 0, None, t0, timer)
    staged = staged_parts(cfg.out, cfg.run.storage_options, plan, shards)
    todo = {s.shard_id: [t for t in plan.compute if s.shard_id not in staged[t]] for s in shards}
    todo = {sid: tasks for sid, tasks in todo.items() if tasks}
    ctx = ShardContext(zoo_uri=cfg.zoo, out=cfg.out, run_key=keys.run_key, alphas=tuple(cfg.alphas), scope=cfg.scope,
                       knob_mode=cfg.knob, run=cfg.run, cut=cfg.cut,
                       task_keys=tuple((t, keys.task_keys[t]) for t in plan.compute), chunk_bytes=cfg.chunk_bytes)
    timer.start("start-up")
    # A version that only drops tasks (or finds every part staged) encodes nothing: no Ray to start for it;
    # a small one runs in-process (distributed/inprocess.py).
    reads = sum(s.nbytes for s in shards) * (1 + len(plan.compute))
    executor = make_executor(resolved_run(cfg.run, reads)) if todo else LocalExecutor()
    try:
        per_shard = _encode_shards(cfg, executor, ctx, shards, todo, timer,
                                   functools.partial(store.check_open, plan.seen_head, cfg.overwrite))
        totals = _knob_totals(cfg, plan, staged, per_shard)
        body = _manifest(cfg, zoo, keys.run_key, shards, totals, plan)
        _add_task_parts(body, zoo, stage_task_parts(executor, ctx, zoo, keys.task_keys))
        timer.start("commit")
        manifest = store.commit(
            keys.run_key, body,
            computed={keys.task_keys[t]: [s.shard_id for s in shards] for t in plan.compute},
            reused=plan.reused_parts, seen_head=plan.seen_head, overwrite=cfg.overwrite)
        stats = executor.stats
    except CommitConflict:
        # Lost the commit race: remove what this build staged that the winner's head does not list.
        store.discard([keys.task_keys[t] for t in plan.compute])
        raise
    finally:
        timer.start("shutdown")
        executor.close()
        timer.stop()
    computed = sum(len({t for t, _ in per_task}) for per_task in per_shard.values())
    return _summary(cfg, zoo, shards, plan, manifest, todo, computed, stats, t0, timer)


def _summary(cfg: BuildConfig, zoo: Zoo, shards: Sequence[Shard], plan: VersionPlan, manifest: dict[str, Any],
             todo: dict[int, list[str]], computed: int, stats: Any, t0: float, timer: PhaseTimer) -> BuildSummary:
    totals = manifest.get("totals") or {}
    return BuildSummary(
        out=cfg.out,
        run_key=plan.keys.run_key,
        shards=len(shards),
        shards_reused=len(shards) - len(todo),
        tasks=len(zoo.task_names),
        alphas=cfg.alphas,
        scope=cfg.scope,
        cut=cfg.cut,
        bytes_read=stats.bytes_read if stats is not None else 0,
        seconds=time.perf_counter() - t0,
        fp32_bytes=int(totals.get("fp32_bytes", 0)),
        encoded_bytes=int(totals.get("encoded_bytes", 0)),
        peak_rss_by_worker=stats.peak_rss_by_worker if stats is not None else {},
        phase_seconds=dict(timer.seconds),
        version=plan.version,
        up_to_date=plan.up_to_date,
        tasks_computed=list(plan.compute),
        tasks_reused=list(plan.reuse),
        tasks_removed=list(plan.changes["removed"]),
        parts_computed=computed,
        parts_reused=len(zoo.task_names) * len(shards) - computed,
        storage_by_alpha=_storage_by_alpha(manifest.get("switches") or []),
        key_maps={t: {"rules": lay["rules"], "detected": lay["detected"]}
                  for t, lay in (manifest.get("layouts") or {}).items() if lay["rules"]},
        task_tensor_bytes=int(totals.get("task_tensors_bytes", 0)),
    )


def _storage_by_alpha(switches: Sequence[dict[str, Any]]) -> dict[float, tuple[int, int]]:
    """The committed manifest's per-(task, α) switches summed per α: (encoded bytes, fp32 task-vector bytes)."""
    out: dict[float, tuple[int, int]] = {}
    for sw in switches:
        enc, fp32 = out.get(sw["alpha"], (0, 0))
        out[sw["alpha"]] = (enc + int(sw["encoded_bytes"]), fp32 + 4 * int(sw["numel"]))
    return dict(sorted(out.items()))


def _add_task_parts(body: dict[str, Any], zoo: Zoo, entries: list[dict[str, Any]]) -> None:
    """Add the task-specific tensors' entries and key layouts (distributed/task_parts.py) to a manifest body."""
    body.update(manifest_fields(zoo, entries))
    if entries:
        body.setdefault("totals", {})["task_tensors_bytes"] = sum(e["bytes"] for e in entries)


def _plan(cfg: BuildConfig) -> tuple[Zoo, list[Shard], BuildKeys]:
    """The zoo (validated), its shards and the build's keys."""
    zoo = load_zoo(cfg.zoo, storage_options=cfg.run.storage_options)
    zoo.validate()
    shards = plan_shards(zoo.tensor_infos(), cfg.shard_bytes)
    if not shards:
        raise ZooError(f"{cfg.zoo}: no floating-point tensors selected by include/exclude; nothing to build.")
    return zoo, shards, build_keys(zoo, build_options(cfg), shards)


def _encode_shards(cfg: BuildConfig, executor: LocalExecutor, ctx: ShardContext, shards: list[Shard],
                   todo: dict[int, list[str]], timer: PhaseTimer,
                   check_open: Any) -> dict[int, dict[tuple[str, float], KeptStats]]:
    """The threshold passes (scope "model") and the encode pass over ``todo`` (shard id -> its tasks to encode);
    the kept statistics per shard and (task, α). ``check_open()`` runs as each part lands (a lost commit race
    raises there)."""
    thresholds: dict[str, list[Thresholds]] | None = None
    by_id = {s.shard_id: s for s in shards}
    work = [(by_id[sid], tasks) for sid, tasks in sorted(todo.items())]
    need = [t for t, _ in ctx.task_keys if any(t in tasks for tasks in todo.values())]
    passes = 1 + SAMPLE_FRACTION if (cfg.scope == "model" and need) else 0  # sample and histograms; encode below
    encode_bytes = sum((1 + len(tasks)) * s.nbytes for s, tasks in work)
    with ShardProgress(total_bytes=int(passes * (1 + len(need)) * sum(s.nbytes for s in shards) + encode_bytes),
                       enabled=cfg.run.show_progress, timer=timer) as progress:
        if cfg.scope == "model" and need:
            thresholds = _model_thresholds(executor, ctx, shards, need, cfg.alphas, 1 + len(need), progress)
        progress.set_phase("encode")
        # Scope "model" encodes in the reverse order of its histogram
        # pass: the shards read last are the likeliest to be still in
        # the page cache when the zoo is larger than what the machine
        # keeps cached (LRU), so fewer bytes come from disk twice.
        order = work[::-1] if thresholds is not None else work
        items = [WorkItem(s.shard_id, (ctx, s, thresholds, tasks), (1 + len(tasks)) * s.nbytes, _memory(ctx, s))
                 for s, tasks in order]
        per_shard = {}
        # closing: on an error the tasks still in flight are cancelled and ended before it propagates.
        with contextlib.closing(executor.map(shard_encode, items, progress.advance)) as done:
            for shard_id, shard_totals in done:
                check_open()  # another build committed here meanwhile: stop now, not after encoding all
                per_shard[shard_id] = shard_totals
        return per_shard


def _knob_totals(cfg: BuildConfig, plan: VersionPlan, staged: dict[str, dict[int, Any]],
                 per_shard: dict[int, dict[tuple[str, float], KeptStats]]) -> dict[tuple[str, float], KeptStats]:
    """Scope "model": kept statistics per (task, α) of the computed tasks, their staged parts included."""
    if cfg.scope != "model":
        return {}
    per_shard = {sid: dict(v) for sid, v in per_shard.items()}
    for task in plan.compute:
        writer = ArtifactWriter(cfg.out, plan.keys.task_keys[task], storage_options=cfg.run.storage_options)
        for shard_id, part in staged[task].items():
            per_shard.setdefault(shard_id, {}).update(_staged_totals(writer, part))
    # Float sums in shard order, not in completion order: the knobs
    # are then the same bits whatever the scheduling.
    totals: dict[tuple[str, float], KeptStats] = {}
    for shard_id in sorted(per_shard):
        for key, st in per_shard[shard_id].items():
            totals[key] = st if key not in totals else totals[key] + st
    return totals


def _model_thresholds(executor: LocalExecutor, ctx: ShardContext, shards: Sequence[Shard], tasks: Sequence[str],
                      alphas: list[float], n_models: int, progress: ShardProgress) -> dict[str, list[Thresholds]]:
    progress.set_phase("sample")
    sample: dict[str, Any] = {}
    items = [WorkItem(s.shard_id, (ctx, s, list(tasks)), int(n_models * s.nbytes * SAMPLE_FRACTION),
                      _memory(ctx, s)) for s in shards]
    for _, per_task in executor.map(shard_sample, items, progress.advance):
        for task, h in per_task.items():
            sample[task] = h if task not in sample else sample[task] + h
    windows = {t: window_request(sample[t], alphas) for t in tasks}

    progress.set_phase("histograms")
    hist: dict[str, Any] = {}
    picked: dict[str, Any] = {}
    items = [WorkItem(s.shard_id, (ctx, s, windows), n_models * s.nbytes, _memory(ctx, s)) for s in shards]
    for _, per_task in executor.map(shard_histograms, items, progress.advance):
        for task, (h, p) in per_task.items():
            hist[task] = h if task not in hist else hist[task] + h
            picked[task] = p if task not in picked else picked[task] + p
    need = {t: refine_request(hist[t], alphas) for t in tasks}
    fine = {t: picked[t].fine(need[t]) for t in tasks if covers(windows[t], need[t])}
    missing = {t: need[t] for t in tasks if t not in fine}
    if missing:
        # A window missed its rank (an unrepresentative sample): the exact
        # fine-histogram pass, for those tasks only.
        progress.set_phase("refine")
        items = [WorkItem(s.shard_id, (ctx, s, missing), (1 + len(missing)) * s.nbytes, _memory(ctx, s))
                 for s in shards]
        for _, per_task in executor.map(shard_fine_histograms, items, progress.advance):
            for task, f in per_task.items():
                fine[task] = f if task not in fine else fine[task] + f
    return {t: resolve_thresholds(hist[t], fine[t], alphas) for t in tasks}


def _manifest(cfg: BuildConfig, zoo: Zoo, run_key: str, shards: Sequence[Shard],
              totals: dict[tuple[str, float], KeptStats], plan: VersionPlan) -> dict[str, Any]:
    infos = zoo.tensor_infos()
    numel = sum(int(np.prod(infos[n].shape)) for s in shards for n in s.tensors)
    knobs = None
    if cfg.scope == "model":
        kept = {(k["task"], float(k["alpha"])): k for k in plan.reused_knobs()}
        knobs = [kept.get((t, a)) or {"task": t, "alpha": a, "knob": knob(totals[(t, a)], cfg.knob),
                                      "kept": totals[(t, a)].kept}
                 for t in zoo.task_names for a in cfg.alphas]
    return {
        "format": "tswitch-ray/switches",
        "format_version": 1,
        "tool_version": __version__,
        "run_key": run_key,
        "zoo": {"name": zoo.name, "uri": _absolute(cfg.zoo), "fingerprint": zoo.fingerprint()},
        "tasks": list(zoo.task_names),
        "alphas": cfg.alphas,
        "scope": cfg.scope,
        "cut": cfg.cut,
        "knob_mode": cfg.knob,
        "codec": CODEC,
        "knobs": knobs,
        "tensors": [n for s in shards for n in s.tensors],
        # encoded_bytes and the rest are the writer's, from the committed parts.
        "totals": {
            "numel_per_task": numel,
            "fp32_bytes": 4 * numel * len(zoo.task_names) * len(cfg.alphas),
        },
        "extra": {"shards": len(shards)},
        **plan.manifest_fields(),
    }


def _absolute(uri: str) -> str:
    """Local paths are recorded absolute so `reconstruct` works from any working directory."""
    return uri if "://" in uri else os.path.abspath(uri)
