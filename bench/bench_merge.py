"""EMR merge benchmark: `tswitch merge --method emr` (streamed, Ray) against a load-everything EMR in plain torch.

Same zoo, same process, side by side:

* ``baseline``: plain torch, no tswitch code — load θ0 and all θt in fp32
  (what "just load the zoo" costs: numel x 4 x (N + 1) bytes), compute
  τt = θt − θ0 in place, elect τuni per tensor (sign of Στt, zero sum → −1;
  max |τt| among agreeing entries), the per-tensor-mean rescaler terms, then
  for each task θt = θ0 + λt·Mt⊙τuni in the storage dtype, written with
  ``safetensors.torch.save_file`` to ``<task>.safetensors``;
* ``merge``: :func:`tswitch_ray.distributed.merge.run_merge` with the Ray
  executor (Ray start-up, statistics round, merge round, staging and the
  final files included);
* ``floor``: the read + τ loop of bench_build.py, for reference;
* peak memory (Σ PSS and Σ RSS of the whole process tree) of each, and of
  idle Ray + torch, sampled as in bench_build.py; every job in a fresh
  process whose clock starts after the same imports (bench_build.PRELOAD).

The two outputs are compared tensor by tensor (``--check``).

    .venv/bin/python bench/bench_merge.py --zoo /work/bench_data/zoo30/zoo.yaml --workers 2
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_build import emit_result, floor_loop, gib, idle_ray_baseline, measure, zoo_files, zoo_numel  # noqa: E402


def emr_load_everything(zoo_uri: str, out_dir: str) -> list[str]:
    """EMR-Merging (paper 003) the obvious way: every model in memory, plain torch."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from tswitch_ray.zoo import load_zoo

    zoo = load_zoo(zoo_uri)
    base_path, task_paths = zoo_files(zoo_uri)
    names = list(zoo.task_names)
    with safe_open(base_path, framework="pt") as f:
        keys = list(f.keys())
        base = {k: f.get_tensor(k) for k in keys}
    dtypes = {k: v.dtype for k, v in base.items()}
    floats = [k for k in keys if base[k].is_floating_point()]
    base32 = {k: (base[k].float() if k in floats else base[k]) for k in keys}
    taus: list[dict[str, torch.Tensor]] = []
    for p in task_paths:
        with safe_open(p, framework="pt") as f:
            taus.append({k: f.get_tensor(k).float().sub_(base32[k]) for k in floats})
    # elect + rescaler terms (tensor_mean: Σ over tensors of mean|τt| / Σ of mean|Mt⊙τuni|)
    num = [0.0] * len(taus)
    den = [0.0] * len(taus)
    uni: dict[str, torch.Tensor] = {}
    for k in floats:
        total = taus[0][k].clone()
        for td in taus[1:]:
            total += td[k]
        flag = torch.where(total > 0, 1.0, -1.0)
        mag = torch.zeros_like(flag)
        for td in taus:
            mag = torch.maximum(mag, torch.where(td[k] * flag > 0, td[k].abs(), 0.0))
        u = mag * flag
        uni[k] = u
        n = u.numel()
        for t, td in enumerate(taus):
            num[t] += float(td[k].abs().sum(dtype=torch.float64)) / n
            den[t] += float(torch.where(td[k] * u > 0, u.abs(), 0.0).sum(dtype=torch.float64)) / n
    lams = [a / b if b > 0 else 0.0 for a, b in zip(num, den)]
    outs = []
    for t, name in enumerate(names):
        sd = {}
        for k in keys:
            if k in floats:
                sd[k] = (base32[k] + lams[t] * torch.where(taus[t][k] * uni[k] > 0, uni[k], 0.0)).to(dtypes[k])
            else:
                sd[k] = base[k]
        path = os.path.join(out_dir, f"{name}.safetensors")
        save_file(sd, path)
        outs.append(path)
    return outs


def run_merge_bench(zoo_uri: str, out: str, workers: int, executor: str, shard_mb: float | None,
                    max_in_flight: int | None) -> tuple[float, Any, Any]:
    from tswitch_ray.distributed.merge import MergeConfig

    kw: dict[str, Any] = {}
    if shard_mb:
        kw["shard_bytes"] = int(shard_mb * 2**20)
    cfg = MergeConfig(zoo=zoo_uri, method="emr", out=out, executor=executor, num_workers=workers,
                      max_in_flight=max_in_flight, show_progress=False, **kw)
    return measure(functools.partial(_merge_job, cfg))


def _merge_job(cfg: Any) -> int:
    from tswitch_ray.distributed.merge import run_merge

    return run_merge(cfg).shards


def compare(a_dir: str, b_dir: str) -> tuple[int, float]:
    """(files compared, largest |difference| over all tensors)."""
    import torch
    from safetensors import safe_open

    worst = 0.0
    files = sorted(p.name for p in Path(a_dir).glob("*.safetensors"))
    for name in files:
        with safe_open(os.path.join(a_dir, name), framework="pt") as fa, \
                safe_open(os.path.join(b_dir, name), framework="pt") as fb:
            for k in fa.keys():
                x, y = fa.get_tensor(k), fb.get_tensor(k)
                if x.is_floating_point():
                    worst = max(worst, float((x.float() - y.float()).abs().max()))
                elif not torch.equal(x, y):
                    worst = float("inf")
    return len(files), worst


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", required=True)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--executor", default="ray", choices=["ray", "local"])
    ap.add_argument("--shard-mb", type=float, default=None)
    ap.add_argument("--max-in-flight", type=int, default=None)
    ap.add_argument("--data", default="/work/bench_data")
    ap.add_argument("--skip-idle", action="store_true")
    ap.add_argument("--skip-baseline", action="store_true", help="no load-everything run (needs ~11 GiB for 30 tasks)")
    ap.add_argument("--check", action="store_true", help="compare merge and baseline outputs")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    base_path, task_paths = zoo_files(args.zoo)
    zoo_bytes = sum(os.path.getsize(p) for p in [base_path, *task_paths])
    numel = zoo_numel(args.zoo)
    n_models = 1 + len(task_paths)
    idle = None if args.skip_idle or args.executor != "ray" else idle_ray_baseline(args.workers)
    floor_s, _, _ = measure(functools.partial(floor_loop, args.zoo))
    tmp = tempfile.mkdtemp(prefix="bench-merge-", dir=args.data if os.path.isdir(args.data) else None)
    try:
        base_s = base_peak = None
        if not args.skip_baseline:
            os.makedirs(os.path.join(tmp, "baseline"))
            base_s, base_peak, _ = measure(functools.partial(emr_load_everything, args.zoo, os.path.join(tmp, "baseline")))
        merge_s, merge_peak, shards = run_merge_bench(args.zoo, os.path.join(tmp, "merge"), args.workers,
                                                      args.executor, args.shard_mb, args.max_in_flight)
        checked = compare(os.path.join(tmp, "baseline"), os.path.join(tmp, "merge")) if args.check and base_s else None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = {
        "zoo": args.zoo, "tasks": len(task_paths), "zoo_bytes": zoo_bytes, "numel_per_model": numel,
        "workers": args.workers, "executor": args.executor, "shards": shards,
        "floor_s": floor_s, "baseline_s": base_s, "merge_s": merge_s,
        "ratio_vs_baseline": merge_s / base_s if base_s else None, "ratio_vs_floor": merge_s / floor_s,
        "merge_peak_pss": merge_peak.pss, "merge_peak_rss": merge_peak.rss, "merge_processes": merge_peak.processes,
        "baseline_peak_pss": base_peak.pss if base_peak else None,
        "baseline_peak_rss": base_peak.rss if base_peak else None,
        "idle_pss": idle.pss if idle else None, "idle_rss": idle.rss if idle else None,
        "load_all_fp32_bytes": 4 * numel * n_models, "check": checked,
    }
    print(f"| zoo | {len(task_paths)} tasks + base, {zoo_bytes / 1e9:.2f} GB |")
    print("| --- | --- |")
    print(f"| floor loop (read + τ, 1 process) | {floor_s:.1f} s |")
    if base_s:
        print(f"| load-everything EMR (plain torch, 1 process) | {base_s:.1f} s, peak {gib(base_peak.pss)} PSS |")
    print(f"| `tswitch merge --method emr` ({args.executor}, {args.workers} workers, {shards} shards) | "
          f"{merge_s:.1f} s, peak {gib(merge_peak.pss)} PSS / {gib(merge_peak.rss)} RSS |")
    if base_s:
        print(f"| **ratio merge / load-everything** | **{merge_s / base_s:.2f}** |")
    print(f"| ratio merge / floor | {merge_s / floor_s:.2f} |")
    if idle:
        print(f"| idle Ray + torch | {gib(idle.pss)} PSS / {gib(idle.rss)} RSS |")
    print(f"| all {n_models} models in fp32 | {gib(4 * numel * n_models)} |")
    if checked:
        print(f"| outputs compared | {checked[0]} files, max |Δ| {checked[1]:.3g} |")
    emit_result(result, args.json)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
