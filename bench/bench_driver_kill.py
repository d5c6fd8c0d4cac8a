"""Seconds from a SIGKILL of a driver that started a local Ray to the last of that Ray's processes gone.

    python bench/bench_driver_kill.py [--runs N]

Two drivers, side by side: one calls ``ray.init()`` itself (Ray's own fate
sharing only), one starts Ray through ``RayExecutor`` (with the watcher of
``tswitch_ray/distributed/ray_reaper.py``). Each runs one task, lists the Ray
processes below it, and is killed; the bench polls until none is left.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import psutil

DRIVERS = {
    "ray.init": "import ray; ray.init(num_cpus=1, log_to_driver=False, include_dashboard=False)\n"
                "ray.get(ray.remote(lambda: 1).remote())\n",
    "RayExecutor": "from tswitch_ray.distributed.executor import RayExecutor, WorkItem\n"
                   "ex = RayExecutor(num_cpus=1); list(ex.map(abs, [WorkItem(0, (-1,))]))\n",
}
AGENTS = ("DashboardAgent", "RuntimeEnvAgent")


def _ray_below(pid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.Process(pid).children(recursive=True):
        try:
            if p.name().startswith("ray::") or any("/ray/" in a for a in p.cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def one(kind: str) -> float:
    env = dict(os.environ, RAY_TMPDIR=tempfile.mkdtemp(prefix="tsr-bench-", dir="/tmp"))
    code = DRIVERS[kind] + "print('up', flush=True)\nimport time; time.sleep(3600)\n"
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    assert proc.stdout.readline().strip() == "up"
    while True:  # the agents start a moment after ray.init returns
        procs = _ray_below(proc.pid)
        names = " ".join(" ".join(p.cmdline()) for p in procs if _alive(p))
        if all(a in names for a in AGENTS):
            break
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    t0 = time.monotonic()
    while any(_alive(p) for p in procs):
        time.sleep(0.1)
    return time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=1)
    args = ap.parse_args()
    for _ in range(args.runs):
        for kind in DRIVERS:
            print(f"{kind:12s} last Ray process gone {one(kind):5.1f} s after the driver's SIGKILL", flush=True)


if __name__ == "__main__":
    main()
