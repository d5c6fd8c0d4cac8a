"""Switch-build benchmark: time and peak memory of `tswitch build` against the least possible work.

On a synthetic zoo (``tswitch zoo synth``; the issue's setting is ViT-B/16 x 30
tasks, fp16, ~5 GB) it measures, side by side in one process:

* ``floor``: a plain single-process loop that reads every tensor of θ0 and of
  every θt and computes τ = θt − θ0 in fp32 (``safetensors.safe_open``; the
  least work any method must do). Run before the first build and after
  every build (``--repeat``); the fastest floor is the denominator and the
  fastest build the numerator (warm page cache for both);
* every job runs in a fresh process whose clock starts once the same modules
  (:data:`PRELOAD`: torch, safetensors, tswitch_ray's build and merge) are
  imported, as a `tswitch build` driver has them before it starts work. Until
  2026-11-23 the floor's clock also ran over its own imports of torch and
  tswitch_ray while the build's did not, which inflated the floor and made
  every build/floor ratio reported before then too small
  (bench/results/build.md gives both);
* ``build``: :func:`tswitch_ray.distributed.build.run_build` with the Ray
  executor — Ray start-up, for scope "model" a 1/32 sample and two full
  passes (coarse histograms with the sampled windows' bit patterns, then
  encode; a third, exact pass only if a window misses), Parquet writing and
  the atomic commit all included — for every α at once;
* peak memory of the whole job: a sampler thread sums the proportional set
  size (PSS, /proc/PID/smaps_rollup: shared pages such as Ray's object store
  are split between the processes that map them, so the sum is what the job
  really occupies) and the plain RSS of this process and all its descendants
  (raylet, gcs_server, dashboard agents, every worker): RSS every 50 ms, PSS
  every 0.5 s and at every new RSS maximum (see :class:`PeakMemory`: PSS
  every 50 ms cost ~0.6 core of the 2);
* ``empty Ray job``: `ray.init`, one no-op task per worker, `ray.shutdown`
  — the least time any Ray job takes here, whatever it computes;
* ``Ray job reading the zoo N times`` (N = 1, 2): `ray.init`, N rounds of
  one task per shard of the build's plan doing only the floor loop's work on
  its tensors, `ray.shutdown` — the least a Ray build that reads the zoo N
  times takes here (scope "model" reads it twice: exact global thresholds
  first, then encoding, within the memory goal), whatever its encoding costs;
* ``idle``: the same sampler over Ray freshly started with torch imported in
  the driver and in every worker, doing nothing — the floor of any Ray job;
* the memory of loading the whole zoo in fp32 (31 models: numel x 4 x 31),
  computed from the headers.

    .venv/bin/python bench/bench_build.py --zoo /work/bench_data/zoo30/zoo.yaml \
        --alpha 0.5 --alpha 0.7 --alpha 0.9 --scope model --workers 2
    .venv/bin/python bench/bench_build.py --synth 6 --data /work/bench_data   # make a zoo first

Prints a Markdown table and a JSON line (``--json FILE`` writes it).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

GiB = 2**30


# --------------------------------------------------------------------------- memory


def _pss_bytes(pid: int) -> int:
    """Proportional set size of one process (0 if it vanished)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def job_processes() -> list[psutil.Process]:
    """This process and all its descendants (Ray's gcs_server, raylet, agents and workers)."""
    me = psutil.Process()
    try:
        return [me, *me.children(recursive=True)]
    except psutil.Error:
        return [me]


@dataclass
class MemorySample:
    pss: int = 0
    rss: int = 0
    processes: int = 0
    cpu_s: float = 0.0  # for the peak: CPU seconds (user + system) of the job's processes (see PeakMemory, measure)


class PeakMemory:
    """Samples the summed PSS and RSS of the whole process tree in a thread; keeps the peaks.

    Reading /proc/PID/smaps_rollup makes the kernel walk every mapping: ~57 ms
    of CPU for the 10-12 processes of a Ray job with torch loaded (measured),
    so PSS every 50 ms kept ~0.6 of the machine's 2 cores busy and slowed the
    job it measured. RSS (/proc/PID/statm, ~0.2 ms) is therefore sampled every
    ``interval_s`` and PSS every ``pss_interval_s``, and also whenever the RSS
    sum reaches a new maximum ``grow_bytes`` above its value at the last PSS
    sample (at most every ``min_pss_gap_s``): the PSS peak comes with the RSS
    peak (more pages resident), so it is not missed. The
    process list is refreshed with the PSS samples (Ray starts workers late).

    It also keeps each descendant's last-seen CPU time (user + system,
    /proc/PID/stat, read with the RSS): their sum is the job's CPU seconds,
    short by at most one interval of each process that exits. This process
    (the sampler itself) is left out.
    """

    def __init__(self, interval_s: float = 0.05, pss_interval_s: float = 0.5, min_pss_gap_s: float = 0.1,
                 grow_bytes: int = 32 * 2**20) -> None:
        self.grow_bytes = grow_bytes
        self.interval_s = interval_s
        self.pss_interval_s = pss_interval_s
        self.min_pss_gap_s = min_pss_gap_s
        self.peak = MemorySample()
        self.samples = 0
        self.pss_samples = 0
        self._cpu: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self, procs: list[psutil.Process] | None = None, pss: bool = True) -> MemorySample:
        procs = job_processes() if procs is None else procs
        s = MemorySample(processes=len(procs))
        for p in procs:
            try:
                s.rss += p.memory_info().rss
            except psutil.Error:
                continue
            if pss:
                s.pss += _pss_bytes(p.pid)
        return s

    def _run(self) -> None:
        procs = job_processes()
        last_pss, rss_at_pss = -1e9, 0
        while not self._stop.is_set():
            now = time.perf_counter()
            rss = self.sample(procs, pss=False)
            self._sample_cpu(procs)
            due = now - last_pss >= self.pss_interval_s
            grew = rss.rss > max(self.peak.rss, rss_at_pss + self.grow_bytes)
            if due or (grew and now - last_pss >= self.min_pss_gap_s):
                procs = job_processes()
                s = self.sample(procs)
                last_pss, rss_at_pss = now, s.rss
                self.pss_samples += 1
                self.peak.pss = max(self.peak.pss, s.pss)
                rss = s
            self.samples += 1
            self.peak.rss = max(self.peak.rss, rss.rss)
            self.peak.processes = max(self.peak.processes, rss.processes)
            self._stop.wait(self.interval_s)

    def _sample_cpu(self, procs: list[psutil.Process]) -> None:
        me = os.getpid()
        for p in procs:
            if p.pid == me:
                continue
            try:
                t = p.cpu_times()
            except psutil.Error:
                continue
            self._cpu[p.pid] = t.user + t.system

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak.cpu_s = sum(self._cpu.values())


PRELOAD = ("torch", "safetensors", "tswitch_ray.zoo", "tswitch_ray.distributed.build",
           "tswitch_ray.distributed.merge")
"""Modules every measured job has imported before its clock starts (see :func:`measure`)."""


def _child(fn: Callable[[], Any], preload: tuple[str, ...], conn: Any) -> None:
    try:
        for name in preload:
            importlib.import_module(name)
        t0 = time.perf_counter()
        # CPU this process spent before the job (interpreter start, imports): subtracted from the job's CPU.
        usage = resource.getrusage(resource.RUSAGE_SELF)
        result = fn()
        conn.send(("ok", time.perf_counter() - t0, result, usage.ru_utime + usage.ru_stime))
    except BaseException as exc:  # report, then exit
        conn.send(("error", 0.0, repr(exc), 0.0))
    finally:
        conn.close()


def measure(fn: Callable[[], Any], preload: tuple[str, ...] = PRELOAD) -> tuple[float, MemorySample, Any]:
    """Wall time (measured inside the job), peak memory and CPU time of the process tree, and ``fn()``'s result.

    ``fn`` runs in a fresh spawned process, so that memory kept by an earlier
    job (allocator caches, torch's pools) is not counted and every job pays
    its own imports. Its clock starts after the child has imported
    ``preload`` (default :data:`PRELOAD`), the same modules for every job (the build's driver, the
    floor loop, the EMR baseline). The sampler covers this process, the child
    and all their descendants (Ray's processes). The CPU time counts the child
    from the clock's start and all its descendants. ``fn`` must be picklable
    (a module-level function or a functools.partial of one).
    """
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(fn, preload, child))
    with PeakMemory() as mem:
        proc.start()
        child.close()
        status, seconds, result, cpu_before = parent.recv()
        proc.join()
    if status != "ok":
        raise RuntimeError(f"benchmarked job failed: {result}")
    mem.peak.cpu_s -= cpu_before
    return seconds, mem.peak, result


def _warm_worker() -> int:
    import torch  # noqa: F401  (what every shard task imports)

    import tswitch_ray.distributed.build  # noqa: F401

    return os.getpid()


def empty_ray_job(workers: int) -> int:
    """The least any Ray job costs: start a local Ray, run one no-op task per worker, shut down."""
    import ray

    # Nested, so cloudpickle ships it by value: a module-level one was looked up by name in the worker's
    # own __main__ and not found (this module is the job process's __main__).
    def noop() -> int:
        return os.getpid()

    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    try:
        remote = ray.remote(num_cpus=1)(noop)
        return len(set(ray.get([remote.remote() for _ in range(workers)])))
    finally:
        ray.shutdown()


def ray_read_floor(zoo_uri: str, workers: int, passes: int, shard_bytes: int | None) -> int:
    """The least any Ray build that reads the zoo ``passes`` times can take here.

    Start a local Ray as the build does, then ``passes`` rounds of one task per
    shard of the build's own plan, each doing only the floor loop's work on
    its tensors (read, τ in fp32: no statistics, no encoding, no writing),
    then shut Ray down. Scope "model" needs two reads of the zoo (exact
    global thresholds before encoding, under the memory goal), so its build
    can be no faster than this job with ``passes=2``.
    """
    import ray

    from tswitch_ray.distributed.build import BuildConfig
    from tswitch_ray.distributed.planner import plan_shards
    from tswitch_ray.zoo import load_zoo

    zoo = load_zoo(zoo_uri)
    shards = plan_shards(zoo.tensor_infos(), shard_bytes or BuildConfig.model_fields["shard_bytes"].default)
    base_path, task_paths = zoo.base.uri, [zoo.tasks[t].uri for t in zoo.task_names]
    # This module is the job process's __main__ (see empty_ray_job): ship its functions by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[floor_tensors.__module__])
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    try:
        remote = ray.remote(num_cpus=1)(floor_tensors)
        done = 0
        for _ in range(passes):
            ray.get([remote.remote(base_path, task_paths, list(s.tensors)) for s in shards])
            done += len(shards)
        return done
    finally:
        ray.shutdown()


def idle_ray_baseline(workers: int, settle_s: float = 3.0) -> MemorySample:
    """Peak memory of Ray started and idle, torch imported in the driver and in ``workers`` workers."""
    import ray
    import torch  # noqa: F401

    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    try:
        remote = ray.remote(num_cpus=1)(_warm_worker)
        pids = set(ray.get([remote.remote() for _ in range(4 * workers)]))
        with PeakMemory() as mem:
            time.sleep(settle_s)
        mem.peak.processes = max(mem.peak.processes, len(pids))
        return mem.peak
    finally:
        ray.shutdown()


# --------------------------------------------------------------------------- zoo


def zoo_files(zoo_uri: str) -> tuple[str, list[str]]:
    """Local paths of the base and the task checkpoints of a zoo manifest."""
    from tswitch_ray.zoo import load_zoo

    zoo = load_zoo(zoo_uri)
    return zoo.base.uri, [zoo.tasks[t].uri for t in zoo.task_names]


def zoo_numel(zoo_uri: str) -> int:
    from tswitch_ray.zoo import load_zoo

    return sum(i.numel for i in load_zoo(zoo_uri).tensor_infos().values())


def drop_page_cache_hint(paths: list[str]) -> None:
    """Not possible without root; the bench warms the cache instead (floor run first)."""


def floor_tensors(base_path: str, task_paths: list[str], names: list[str] | None = None) -> float:
    """The least work on some tensors (all when ``names`` is None): read θ0 and every θt, τ = θt − θ0 in fp32.

    Returns a sum of one element of every τ, so that nothing is optimised away.
    """
    import torch
    from safetensors import safe_open

    base_h = safe_open(base_path, framework="pt")
    task_hs = [safe_open(p, framework="pt") for p in task_paths]
    check = 0.0
    for name in base_h.keys() if names is None else names:
        base = base_h.get_tensor(name)
        if not base.is_floating_point():
            continue
        base32 = base.to(torch.float32)
        for h in task_hs:
            tau = h.get_tensor(name).to(torch.float32)
            tau.sub_(base32)
            check += float(tau.view(-1)[0])  # touch the result
    return check


def floor_loop(zoo_uri: str) -> float:
    """The floor: :func:`floor_tensors` over the whole zoo, in this one process."""
    base_path, task_paths = zoo_files(zoo_uri)
    return floor_tensors(base_path, task_paths)


# --------------------------------------------------------------------------- build


@dataclass
class BuildRun:
    seconds: float
    peak: MemorySample
    encoded_bytes: int
    fp32_bytes: int
    shards: int
    phase_seconds: dict[str, float] = field(default_factory=dict)


def run_build_bench(zoo_uri: str, out: str, alphas: list[float], scope: str, workers: int, executor: str,
                    shard_mb: float | None, max_in_flight: int | None) -> BuildRun:
    from tswitch_ray.distributed.build import BuildConfig

    kw: dict[str, Any] = {}
    if shard_mb:
        kw["shard_bytes"] = int(shard_mb * 2**20)
    cfg = BuildConfig(zoo=zoo_uri, out=out, alphas=alphas, scope=scope, executor=executor, num_workers=workers,
                      max_in_flight=max_in_flight, show_progress=False, overwrite=True, **kw)
    seconds, peak, summary = measure(functools.partial(_build_job, cfg))
    return BuildRun(seconds, peak, *summary)


def _build_job(cfg: Any) -> tuple[int, int, int, dict[str, float]]:
    from tswitch_ray.distributed.build import run_build

    s = run_build(cfg)
    return s.encoded_bytes, s.fp32_bytes, s.shards, s.phase_seconds


def synth(data: str, tasks: int, arch: str = "vit-b-16") -> str:
    from tswitch_ray.zoo.synth import synth_zoo

    out = os.path.join(data, f"zoo-{arch}-{tasks}")
    if os.path.exists(os.path.join(out, "zoo.yaml")):
        return os.path.join(out, "zoo.yaml")
    return synth_zoo(arch, tasks, "fp16", out, seed=0)


def dir_bytes(path: str) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def emit_result(result: dict[str, Any], json_path: str | None) -> None:
    """The bench's machine-readable line: printed, and written to ``json_path`` when given."""
    line = json.dumps(result)
    print(line)
    if json_path:
        Path(json_path).write_text(line + "\n")


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", help="zoo manifest (else --synth N makes one under --data)")
    ap.add_argument("--synth", type=int, default=0, help="make a ViT-B/16 fp16 zoo with N tasks")
    ap.add_argument("--data", default="/work/bench_data")
    ap.add_argument("--alpha", type=float, action="append", dest="alphas")
    ap.add_argument("--scope", default="model", choices=["tensor", "model"])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--executor", default="ray", choices=["ray", "local"])
    ap.add_argument("--shard-mb", type=float, default=None)
    ap.add_argument("--max-in-flight", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=1,
                    help="build runs, each followed by a floor run (the fastest of each is the ratio's)")
    ap.add_argument("--skip-idle", action="store_true")
    ap.add_argument("--read-floor-passes", type=int, action="append", default=None,
                    help="Ray jobs that only read the zoo N times (default: 1 and 2; 0 skips them)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    alphas = sorted(set(args.alphas or [0.5, 0.7, 0.9]))
    args.read_floor_passes = [n for n in (args.read_floor_passes or [1, 2]) if n > 0]
    zoo_uri = args.zoo or synth(args.data, args.synth or 6)

    base_path, task_paths = zoo_files(zoo_uri)
    zoo_bytes = sum(os.path.getsize(p) for p in [base_path, *task_paths])
    numel = zoo_numel(zoo_uri)
    n_models = 1 + len(task_paths)

    idle = None if args.skip_idle or args.executor != "ray" else idle_ray_baseline(args.workers)
    empty_s = measure(functools.partial(empty_ray_job, args.workers))[0] if args.executor == "ray" else None

    shard_bytes = int(args.shard_mb * 2**20) if args.shard_mb else None
    read_passes = args.read_floor_passes if args.executor == "ray" else []
    read_floor_runs: dict[int, list[float]] = {n: [] for n in read_passes}

    floor_times, floor_cpus = [], []
    t, floor_peak, _ = measure(functools.partial(floor_loop, zoo_uri))
    floor_times.append(t)
    floor_cpus.append(floor_peak.cpu_s)
    tmp = tempfile.mkdtemp(prefix="bench-build-", dir=args.data if os.path.isdir(args.data) else None)
    runs = []
    try:
        for i in range(args.repeat):
            runs.append(run_build_bench(zoo_uri, os.path.join(tmp, f"switches-{i}"), alphas, args.scope,
                                        args.workers, args.executor, args.shard_mb, args.max_in_flight))
            # A floor after every build: the machine's load drifts, and both sides get their fastest run.
            t, after_peak, _ = measure(functools.partial(floor_loop, zoo_uri))
            floor_times.append(t)
            floor_cpus.append(after_peak.cpu_s)
            # After a floor, so the page cache is as warm for them as for the build.
            for n in read_passes:
                read_floor_runs[n].append(
                    measure(functools.partial(ray_read_floor, zoo_uri, args.workers, n, shard_bytes))[0])
        art_bytes = dir_bytes(os.path.join(tmp, "switches-0"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    best = min(runs, key=lambda r: r.seconds)
    read_floors = {n: min(ts) for n, ts in read_floor_runs.items()}
    floor = min(floor_times)
    floor_cpu = floor_cpus[floor_times.index(floor)]
    result = {
        "zoo": zoo_uri, "tasks": len(task_paths), "zoo_bytes": zoo_bytes, "numel_per_model": numel,
        "alphas": alphas, "scope": args.scope, "workers": args.workers, "executor": args.executor,
        "shard_mb": args.shard_mb, "floor_s": floor_times, "build_s": [r.seconds for r in runs],
        "ratio": best.seconds / floor, "phase_s": best.phase_seconds, "build_cpu_s": best.peak.cpu_s,
        "floor_cpu_s": floor_cpu, "empty_ray_job_s": empty_s, "ray_read_floor_s": read_floor_runs,
        "peak_pss": best.peak.pss, "peak_rss": best.peak.rss, "peak_processes": best.peak.processes,
        "floor_peak_pss": floor_peak.pss,
        "idle_pss": idle.pss if idle else None, "idle_rss": idle.rss if idle else None,
        "load_all_fp32_bytes": 4 * numel * n_models,
        "encoded_bytes": best.encoded_bytes, "artifact_bytes": art_bytes, "fp32_task_vector_bytes": best.fp32_bytes,
        "shards": best.shards, "cpus": os.cpu_count(), "platform": platform.platform(),
    }
    print(f"| zoo | {len(task_paths)} tasks + base, {zoo_bytes / 1e9:.2f} GB, {numel / 1e6:.1f} M params/model |")
    print("| --- | --- |")
    print(f"| α, scope | {alphas}, {args.scope} |")
    print(f"| floor loop (read + τ in fp32, 1 process) | {', '.join(f'{x:.1f} s' for x in floor_times)} |")
    print(f"| build ({args.executor}, {args.workers} workers, {best.shards} shards) | "
          f"{', '.join(f'{r.seconds:.1f} s' for r in runs)} |")
    print(f"| **ratio build / floor** | **{result['ratio']:.2f}** |")
    if empty_s is not None:
        print(f"| empty Ray job (start, {args.workers} no-op tasks, shut down) | {empty_s:.1f} s = "
              f"{empty_s / floor:.2f} x floor |")
    for n, secs in read_floors.items():
        print(f"| Ray job reading the zoo {n}x (start, floor work per shard, {args.workers} workers, shut down) | "
              f"{', '.join(f'{x:.1f} s' for x in read_floor_runs[n])}; fastest = {secs / floor:.2f} x floor |")
    print(f"| build phases (wall) | {', '.join(f'{k} {v:.1f} s' for k, v in best.phase_seconds.items())} |")
    print(f"| CPU time: build job (all processes) / fastest floor loop | {best.peak.cpu_s:.1f} s / {floor_cpu:.1f} s |")
    print(f"| peak memory of the job (Σ PSS / Σ RSS, {best.peak.processes} processes) | "
          f"{gib(best.peak.pss)} / {gib(best.peak.rss)} |")
    if idle:
        print(f"| idle Ray + torch (Σ PSS / Σ RSS) | {gib(idle.pss)} / {gib(idle.rss)} |")
    print(f"| floor loop peak (PSS) | {gib(floor_peak.pss)} |")
    print(f"| all {n_models} models in fp32 | {gib(4 * numel * n_models)} |")
    print(f"| artifacts | {art_bytes / 1e6:.1f} MB = {100 * best.encoded_bytes / best.fp32_bytes:.2f} % of fp32 τ |")
    emit_result(result, args.json)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
