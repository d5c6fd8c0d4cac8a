"""GPU ÷ CPU time of the steps that have a CUDA path, measured side by side in one run.

    python bench/bench_device.py [--numel 16000000] [--repeats 3]

Exact threshold selection of one tensor (switch/thresholds.py), and a task's
weights from its switches with θ0 resident (serving.SwitchServer.apply) on a
small synthetic zoo. Prints each step's median seconds on CPU and on CUDA and
their ratio; exits 2 with a one-line reason where CUDA is absent.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch


def _median(fn: Callable[[], object], repeats: int, sync: bool) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _selection(numel: int, repeats: int) -> tuple[float, float]:
    from tswitch_ray.switch.thresholds import tensor_thresholds

    tau = torch.randn(numel, generator=torch.Generator().manual_seed(0)).mul_(1e-3)
    alphas = [0.6, 0.8, 0.9]
    gpu = tau.cuda()
    if tensor_thresholds(gpu, alphas) != tensor_thresholds(tau, alphas):
        raise SystemExit("error: CUDA thresholds differ from the CPU's; see tests/test_switch_thresholds.py")
    return (_median(lambda: tensor_thresholds(tau, alphas), repeats, False),
            _median(lambda: tensor_thresholds(gpu, alphas), repeats, True))


def _serving(repeats: int) -> tuple[float, float]:
    from tswitch_ray.distributed.build import BuildConfig, run_build
    from tswitch_ray.serving import SwitchServer
    from tswitch_ray.zoo.synth import synth_zoo

    root = tempfile.mkdtemp(prefix="tswitch-device-")
    zoo = synth_zoo("vit-b-32", 2, "fp32", os.path.join(root, "zoo"), seed=0, layers=2)
    out = os.path.join(root, "switches")
    run_build(BuildConfig(zoo=str(zoo), out=out, alphas=[0.6], executor="local", show_progress=False))
    cpu, gpu = SwitchServer(out, str(zoo), device="cpu"), SwitchServer(out, str(zoo), device="cuda")
    task = cpu.tasks[0]
    cpu.apply(task, 0.6), gpu.apply(task, 0.6)  # switches read once, then cached
    return (_median(lambda: cpu.apply(task, 0.6), repeats, False),
            _median(lambda: gpu.apply(task, 0.6), repeats, True))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--numel", type=int, default=16_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("error: no CUDA device here; run this on a GPU machine (bench/device_check.sh).", file=sys.stderr)
        return 2
    print(f"device: {torch.cuda.get_device_name(0)}; load average {os.getloadavg()}")
    print("| step | CPU s | CUDA s | CUDA ÷ CPU |\n|---|---|---|---|")
    for name, (c, g) in {f"threshold selection, {args.numel:,} elements, 3 α": _selection(args.numel, args.repeats),
                         "SwitchServer.apply, synthetic ViT zoo, 2 layers": _serving(args.repeats)}.items():
        print(f"| {name} | {c:.3f} | {g:.3f} | {g / c:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
