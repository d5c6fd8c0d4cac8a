"""`reconstruct_task` of one task, timed in whichever tswitch_ray is on PYTHONPATH, with the output's sha256.

Run it against two checkouts in the same minutes to compare them side by side (before / after a change):

    git archive 1bace74 tswitch_ray | tar -x -C /tmp/base
    for root in /tmp/base .; do (cd $root && PYTHONPATH=$root python $OLDPWD/bench/compare_reconstruct.py \\
        /tmp/bench_reconstruct/vit/switches /tmp/bench_reconstruct/vit/zoo/zoo.yaml); done

(the zoos and switches of ``bench/bench_reconstruct.py``). Prints the package used, the best of
``--repeats`` times after one warm-up and the first 16 hex digits of the written file's sha256.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time

import tswitch_ray
from tswitch_ray.reconstruct import reconstruct_task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("artifacts")
    ap.add_argument("zoo")
    ap.add_argument("--task", default="task_01")
    ap.add_argument("--alpha", type=float, default=0.6)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    out = f"/tmp/compare-reconstruct-{os.getpid()}.safetensors"
    reconstruct_task(args.artifacts, args.task, args.alpha, out, zoo_uri=args.zoo)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        reconstruct_task(args.artifacts, args.task, args.alpha, out, zoo_uri=args.zoo)
        times.append(time.perf_counter() - t0)
    with open(out, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    os.unlink(out)
    print(os.path.dirname(tswitch_ray.__file__), f"{min(times):.2f} s", digest)


if __name__ == "__main__":
    main()
