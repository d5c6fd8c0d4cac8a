"""Peak RSS of `tswitch build --executor local` on one large tensor, chunked and whole (issue 16, point 1).

The zoo: one ROWS × COLS fp16 "embed.weight" and TASKS tasks (θt = θ0 + 0.01·N(0, 1)).
Each build runs in its own process (bench_build_memory.measure: VmHWM, the peak
resident set of the process that ran the build in-process); the fixed overhead
is the same module's "overhead" process (torch, tswitch_ray, compiled loops,
zoo opened). Printed: each peak, the peak above the overhead, and the planner's
estimate (distributed/planner.py chunked_build_memory_bytes) minus its fixed
TASK_OVERHEAD_BYTES, which stands for the same overhead.

    PYTHONPATH=. python bench/bench_chunked_memory.py --rows 32000 --cols 2048 --tasks 4 --chunk-mb 8
    PYTHONPATH=. python bench/bench_chunked_memory.py --rows 128000 --cols 2048 --tasks 2 --chunk-mb 64 --no-whole
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_build_memory as bench

MiB = 2**20


def write_zoo(root: Path, rows: int, cols: int, tasks: int) -> str:
    import torch
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(rows, cols, generator=g).half()
    save_file({"embed.weight": base}, str(root / "base.safetensors"))
    lines = []
    for t in range(tasks):
        task = (base.float() + 0.01 * torch.randn(rows, cols, generator=g)).half()
        save_file({"embed.weight": task}, str(root / f"t{t}.safetensors"))
        lines.append(f"  - {{name: t{t}, uri: t{t}.safetensors}}\n")
    (root / "zoo.yaml").write_text("name: big\nbase: base.safetensors\ntasks:\n" + "".join(lines))
    return str(root / "zoo.yaml")


def estimate(zoo: str, chunk_mb: float, n_alphas: int) -> int:
    """The planner's estimate for the zoo's one shard, without its fixed per-task overhead."""
    from tswitch_ray.distributed.chunked_build import chunk_numel
    from tswitch_ray.distributed.planner import (
        TASK_OVERHEAD_BYTES,
        chunked_build_memory_bytes,
        plan_shards,
    )
    from tswitch_ray.zoo import load_zoo

    (shard,) = plan_shards(load_zoo(zoo).tensor_infos(), 8 * MiB)
    return chunked_build_memory_bytes(shard, chunk_numel(int(chunk_mb * MiB)), n_alphas) - TASK_OVERHEAD_BYTES


def run(zoo: str, out: Path, chunk_mb: float, alphas: list[float]) -> dict[str, int]:
    """Peaks of the overhead process and of one build with ``--chunk-mb chunk_mb`` (0: whole)."""
    overhead = bench.measure("overhead", [zoo])
    assert overhead.code == 0, overhead.stderr[-2000:]
    peak = bench.measure("cli", bench.build_args(zoo, str(out), "local", alphas, ["--chunk-mb", str(chunk_mb)]))
    assert peak.code == 0, peak.stderr[-2000:]
    return {"overhead": overhead.vmhwm, "peak": peak.vmhwm, "estimate": estimate(zoo, chunk_mb, len(alphas)),
            "seconds": int(peak.seconds)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=32000)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--chunk-mb", type=float, action="append", help="block size(s) to measure (default 8)")
    ap.add_argument("--no-whole", action="store_true", help="skip the unchunked build (--chunk-mb 0)")
    ap.add_argument("--alpha", type=float, action="append")
    args = ap.parse_args()
    alphas = args.alpha or [0.6]
    with tempfile.TemporaryDirectory() as tmp:
        zoo = write_zoo(Path(tmp) / "zoo", args.rows, args.cols, args.tasks)
        print(f"{args.rows} x {args.cols} fp16, {args.tasks} tasks, alphas {alphas}; fp32 tensor "
              f"{4 * args.rows * args.cols / MiB:.0f} MiB")
        print("| --chunk-mb | peak RSS MiB | above overhead MiB | planner estimate MiB | estimate / measured | s |")
        print("|---|---|---|---|---|---|")
        for mb in (args.chunk_mb or [8]) + ([] if args.no_whole else [0]):
            r = run(zoo, Path(tmp) / f"out{mb}", mb, alphas)
            above = r["peak"] - r["overhead"]
            print(f"| {mb:g} | {r['peak'] / MiB:.0f} | {above / MiB:.0f} | {r['estimate'] / MiB:.0f} | "
                  f"{r['estimate'] / above:.2f} | {r['seconds']} |")


if __name__ == "__main__":
    main()
