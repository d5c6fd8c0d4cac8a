"""Small jobs: `tswitch build` wall time on a 0.6 MB zoo, in-process (the default below the threshold) vs Ray.

Each run is the real CLI in a fresh process (`python -m tswitch_ray.cli build ...`), timed from the
outside, so Python start-up and imports are in both; the runs alternate (in-process, Ray, in-process,
...) ``--repeats`` times so both see the same load. The zoo: θ0 and 3 tasks, fp32, 4 tensors each
(~150 kB per checkpoint).

    .venv/bin/python bench/bench_small_jobs.py --work /tmp/bench_small --out bench/results/small_jobs.md
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

LAYOUT = {"embed.weight": (64, 256), "blocks.0.attn.weight": (64, 64), "blocks.0.mlp.weight": (128, 64),
          "head.weight": (10, 64)}


def make_zoo(folder: str) -> str:
    import torch
    import yaml
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    base = {k: 0.02 * torch.randn(s, generator=g) for k, s in LAYOUT.items()}
    save_file(base, f"{folder}/base.safetensors")
    tasks = []
    for t in ("a", "b", "c"):
        save_file({k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in base.items()}, f"{folder}/{t}.safetensors")
        tasks.append({"name": t, "uri": f"{t}.safetensors"})
    with open(f"{folder}/zoo.yaml", "w") as f:
        yaml.safe_dump({"name": "small", "base": "base.safetensors", "tasks": tasks}, f, sort_keys=False)
    return f"{folder}/zoo.yaml"


def build_once(zoo: str, out: str, extra: list[str]) -> tuple[float | None, str]:
    """Wall seconds of one CLI build and its output; None when the build failed (the output says why)."""
    shutil.rmtree(out, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tswitch_ray.cli", "build", "--zoo", zoo, "--out", out,
                           "--alpha", "0.6", *extra], capture_output=True, text=True, env=env, check=False)
    seconds = time.perf_counter() - t0
    return (None if proc.returncode else seconds), proc.stdout + proc.stderr


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/bench_small")
    ap.add_argument("--out", default="bench/results/small_jobs.md")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    zoo = make_zoo(f"{args.work}/zoo")
    zoo_bytes = sum(os.path.getsize(f"{args.work}/zoo/{f}") for f in os.listdir(f"{args.work}/zoo")
                    if f.endswith(".safetensors"))
    load_start = os.getloadavg()
    times: dict[str, list[float]] = {"in-process (default)": [], "--executor ray": []}
    failed: dict[str, list[str]] = {k: [] for k in times}
    said = ""
    for _ in range(args.repeats):
        for label, out_dir, extra in (("in-process (default)", "sw-auto", []),
                                      ("--executor ray", "sw-ray", ["--executor", "ray"])):
            s, out = build_once(zoo, f"{args.work}/{out_dir}", extra)
            said = next((line for line in out.splitlines() if "small job" in line), said)
            if s is None:
                failed[label].append(out.strip().splitlines()[-1] if out.strip() else "no output")
            else:
                times[label].append(s)
    med = {k: statistics.median(v) if v else float("nan") for k, v in times.items()}
    lines = [
        "# Small jobs: `tswitch build` on a 0.6 MB zoo, in-process vs Ray",
        "",
        "Measured by `bench/bench_small_jobs.py` (numbers from one run of it).",
        "",
        "```",
        ".venv/bin/python bench/bench_small_jobs.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "```",
        "",
        (f"Machine: {platform.platform()}, {os.cpu_count()} CPUs; load average {' / '.join(f'{v:.1f}' for v in load_start)}"
         f" (1/5/15 min) at the start, {' / '.join(f'{v:.1f}' for v in os.getloadavg())} at the end. Zoo: "
         f"{zoo_bytes / 1e6:.2f} MB (θ0 + 3 tasks, fp32). Wall time of the whole CLI process (start-up and imports "
         f"included), runs alternating, median of {args.repeats}."),
        "",
        "| run | median s | all runs (s) | failed runs |",
        "|---|---|---|---|",
        *[f"| {k} | {med[k]:.1f} | {', '.join(f'{v:.1f}' for v in vs)} | {len(failed[k])} "
          f"{'(' + failed[k][0][:120] + ')' if failed[k] else ''} |" for k, vs in times.items()],
        "",
        f"In-process / Ray: **{med['in-process (default)'] / med['--executor ray']:.2f} ×**. The CLI said: `{said}`",
        "",
    ]
    text = "\n".join(lines)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
