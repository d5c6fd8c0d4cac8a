"""Growing-zoo benchmark: what a build of a zoo that gained one task costs against a clean build of the grown zoo.

    PYTHONPATH=. python bench/bench_incremental.py --tasks 5 --layers 2 --work /tmp/bench-incremental

On a synthetic zoo (``tswitch zoo synth``, ViT-B/32 layout, fp16) it runs, in
one process with the local executor (numba compiled by a warm-up build first,
so no timed build pays for it), for each scope:

* ``v1``: a build of the first N−1 tasks into a fresh set;
* ``v2``: the same command with the zoo of N tasks onto that set (computes task N only);
* ``rerun``: the same command again (up to date: nothing to do);
* ``clean``: a build of the N tasks into a fresh set.

It prints the wall time, bytes read and (task, shard) parts computed / reused of
each, and v2 / clean. The bytes read are deterministic; times are noisy on a shared machine.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import yaml

from tswitch_ray.distributed.build import BuildConfig, run_build
from tswitch_ray.zoo.synth import synth_zoo


def _build(zoo: str, out: Path, scope: str, alphas: list[float]) -> tuple[float, object]:
    t0 = time.perf_counter()
    s = run_build(BuildConfig(zoo=zoo, out=str(out), alphas=alphas, scope=scope, executor="local",
                              show_progress=False))
    return time.perf_counter() - t0, s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=5)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--alpha", type=float, action="append", default=None)
    ap.add_argument("--work", default="/tmp/bench-incremental")
    args = ap.parse_args()
    alphas = args.alpha or [0.6, 0.9]
    work = Path(args.work)
    zoo = Path(synth_zoo("vit-b-32", args.tasks, "fp16", str(work / "zoo"), seed=1, layers=args.layers))
    manifest = yaml.safe_load(zoo.read_text())
    manifest["tasks"] = manifest["tasks"][:-1]
    smaller = zoo.with_name("zoo-minus-one.yaml")
    smaller.write_text(yaml.safe_dump(manifest))
    mib = 2**20
    for scope in ("tensor", "model"):
        for d in ("warm", "grown", "clean"):
            shutil.rmtree(work / f"{scope}-{d}", ignore_errors=True)
        _build(str(smaller), work / f"{scope}-warm", scope, alphas)
        rows = [("v1", *_build(str(smaller), work / f"{scope}-grown", scope, alphas)),
                ("v2", *_build(str(zoo), work / f"{scope}-grown", scope, alphas)),
                ("rerun", *_build(str(zoo), work / f"{scope}-grown", scope, alphas)),
                ("clean", *_build(str(zoo), work / f"{scope}-clean", scope, alphas))]
        print(f"scope {scope}, {args.tasks} tasks, α {alphas}")
        print("| build | version | seconds | MiB read | tasks computed | parts computed / reused |")
        print("|---|---|---|---|---|---|")
        for name, sec, s in rows:
            print(f"| {name} | {s.version} | {sec:.2f} | {s.bytes_read / mib:.0f} | {len(s.tasks_computed)} | "
                  f"{s.parts_computed} / {s.parts_reused} |")
        v2, clean = rows[1][1], rows[3][1]
        print(f"v2 / clean: {v2 / clean:.2f}\n")


if __name__ == "__main__":
    main()
