"""Peak memory of `tswitch build`, compared with the streaming bound.

The build streams the checkpoints tensor by tensor, so its memory should not
depend on how large the models are, only on the largest tensor. The bound
checked here (issue 3) is

    peak RSS  <=  fixed overhead + 3 x largest_tensor_bytes x (N + 1)

N is the number of tasks, so N + 1 checkpoints. largest_tensor_bytes is the
fp32 size of the largest selected tensor. The fixed overhead is the peak RSS
of a process that only imports torch and tswitch_ray (the modules
`tswitch build` imports), loads the build's compiled loops (numba, one tiny
call each) and opens the zoo: it reads the manifest, validates every header
and computes the base fingerprint.

How it is measured: each process runs in a small wrapper (RUNNER below). The
wrapper calls the real CLI entry point `tswitch_ray.cli:main` with the given
arguments. It then reads the process's own VmHWM (peak resident set, from
/proc/self/status) before the interpreter tears down, and leaves with
os._exit. Interpreter teardown after `import torch` alone adds about 120 MiB
of RSS on this machine, and that has nothing to do with the build.
`os.wait4` also gives ru_maxrss; it is reported too and equals VmHWM up to
the page counters' slack. While the job runs, psutil samples the whole
process tree every 50 ms: Σ RSS over the process and all its descendants, and
Σ PSS, which counts shared pages once. For `--executor ray` that tree holds
the Ray daemons and workers that the CLI's ray.init starts, so the sums are
the whole job.

    .venv/bin/python bench/bench_build_memory.py                    # 8 x ViT-B/32 fp32, local then ray
    .venv/bin/python bench/bench_build_memory.py --executor local --md bench/results/build_memory.md
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

RUNNER = r"""
import json, os, sys, traceback
report, mode, args = sys.argv[1], sys.argv[2], sys.argv[3:]
code = 0
try:
    if mode == "overhead":
        import torch, tswitch_ray, tswitch_ray.cli, tswitch_ray.distributed.build  # what `tswitch build` imports
        if args[1:] == ["ray"]:  # what a Ray worker has on top: the ray package
            import ray
        # ... and the compiled (numba) loops the build runs: their code is fixed
        # overhead too, like torch's (one call each loads them from numba's cache).
        from tswitch_ray.artifacts.encoding import encode_kept
        from tswitch_ray.switch import tensor_thresholds
        from tswitch_ray.switch.binarize import kept_switches
        from tswitch_ray.switch.thresholds import RefineRequest, WindowPass
        x = torch.linspace(-1, 1, 64)
        ths = tensor_thresholds(x, [0.5, 0.9])
        for sw in kept_switches(x, ths):
            encode_kept(64, sw.positions, sw.positive, dropped_pos=sw.dropped)
        WindowPass(RefineRequest()).add(x)
        from tswitch_ray.zoo import load_zoo
        zoo = load_zoo(args[0])
        zoo.validate()
        zoo.fingerprint()
    else:
        from tswitch_ray.cli import main
        sys.argv = ["tswitch", *args]
        main()
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
except BaseException:
    traceback.print_exc()
    code = 1
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
kib = lambda key: int(status[key].split()[0]) * 1024
with open(report, "w") as f:
    json.dump({"code": code, "vmhwm": kib("VmHWM"), "vmrss": kib("VmRSS")}, f)
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
"""

MiB = 2**20


@dataclass
class Peak:
    """What one measured process (tree) used."""

    code: int
    vmhwm: int  # peak RSS of the main process, before interpreter teardown
    ru_maxrss: int  # from wait4 (also before teardown: the runner exits with os._exit)
    tree_rss: int = 0  # peak of Σ RSS over the process tree (sampled)
    tree_pss: int = 0  # peak of Σ PSS over the process tree (sampled)
    max_procs: int = 0
    peak_by_kind: dict[str, int] = field(default_factory=dict)  # largest sampled RSS per process kind
    seconds: float = 0.0
    stdout: str = ""
    stderr: str = ""


def _kind(proc) -> str:
    try:
        name = proc.name()
        cmd = " ".join(proc.cmdline()[:3])
    except Exception:  # noqa: BLE001 - the process may be gone
        return "?"
    if name.startswith("ray::") or "default_worker.py" in cmd:
        return "ray worker"
    for k in ("raylet", "gcs_server", "dashboard", "log_monitor", "runtime_env", "monitor.py"):
        if k in name or k in cmd:
            return k
    return name


def measure(mode: str, args: list[str], sample_s: float = 0.05, env: dict[str, str] | None = None) -> Peak:
    """Run RUNNER in a fresh interpreter (``mode`` "overhead" or "cli") and return its peaks."""
    import psutil

    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "report.json")
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", RUNNER, report, mode, *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)
        out: dict[str, str] = {}
        readers = [threading.Thread(target=lambda k, s: out.__setitem__(k, s.read()), args=(k, s), daemon=True)
                   for k, s in (("stdout", proc.stdout), ("stderr", proc.stderr))]
        for r in readers:
            r.start()
        peak = Peak(code=-1, vmhwm=0, ru_maxrss=0)
        done = threading.Event()

        def sample() -> None:
            root = psutil.Process(proc.pid)
            tick = 0
            while not done.is_set():
                try:
                    procs = [root, *root.children(recursive=True)]
                except psutil.Error:
                    break
                rss = pss = 0
                for p in procs:
                    try:
                        r = p.memory_info().rss
                        rss += r
                        kind = "tswitch (driver)" if p.pid == proc.pid else _kind(p)
                        peak.peak_by_kind[kind] = max(peak.peak_by_kind.get(kind, 0), r)
                        if tick % 4 == 0:
                            pss += p.memory_full_info().pss
                    except psutil.Error:
                        pass
                peak.tree_rss = max(peak.tree_rss, rss)
                if tick % 4 == 0:
                    peak.tree_pss = max(peak.tree_pss, pss)
                peak.max_procs = max(peak.max_procs, len(procs))
                tick += 1
                done.wait(sample_s)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, ru = os.wait4(proc.pid, 0)
        done.set()
        sampler.join()
        for r in readers:
            r.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        peak.seconds = time.perf_counter() - t0
        peak.ru_maxrss = ru.ru_maxrss * 1024
        peak.stdout, peak.stderr = out.get("stdout", ""), out.get("stderr", "")
        try:
            rep = json.loads(Path(report).read_text())
        except (FileNotFoundError, ValueError):
            raise RuntimeError(f"measured process died (exit {proc.returncode}):\n{peak.stderr[-3000:]}") from None
        peak.code, peak.vmhwm = rep["code"], rep["vmhwm"]
        return peak


def _reported_worker_peaks(stdout: str) -> str:
    """The "peak RSS per worker" row of `tswitch build`'s summary table, as printed."""
    for line in stdout.splitlines():
        if "peak RSS per worker" in line:
            return line.split("peak RSS per worker", 1)[1].strip(" │|\t")
    return ""


def largest_tensor_bytes(zoo_uri: str) -> tuple[int, str, int]:
    """(fp32 bytes of the largest selected tensor, its name, number of tasks)."""
    from tswitch_ray.zoo import load_zoo

    zoo = load_zoo(zoo_uri)
    infos = zoo.validate()
    name = max(infos, key=lambda n: infos[n].numel)
    return 4 * infos[name].numel, name, len(zoo.task_names)


def build_args(zoo: str, out: str, executor: str, alphas: list[float], extra: list[str]) -> list[str]:
    args = ["build", "--zoo", zoo, "--out", out, "--executor", executor, "--quiet"]
    for a in alphas:
        args += ["--alpha", str(a)]
    return args + extra


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="vit-b-32")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--dtype", default="fp32", help="fp32 keeps 'largest tensor bytes' unambiguous")
    ap.add_argument("--layers", type=int, default=None, help="truncate the depth (default: the whole tower)")
    ap.add_argument("--alpha", type=float, action="append", default=None, help="repeatable (default 0.6)")
    ap.add_argument("--executor", choices=["local", "ray"], action="append", default=None,
                    help="repeatable (default: local and ray)")
    ap.add_argument("--workers", type=int, default=2, help="--workers for the ray run")
    ap.add_argument("--zoo-dir", default=None, help="where the synthetic zoo lives (reused if present)")
    ap.add_argument("--md", default=None, help="also write the table and command as Markdown here")
    args = ap.parse_args()
    alphas = args.alpha or [0.6]
    executors = args.executor or ["local", "ray"]

    from tswitch_ray.zoo.synth import synth_zoo

    zoo_dir = Path(args.zoo_dir or Path(tempfile.gettempdir()) / f"tswitch-bench-{args.arch}-{args.tasks}x-{args.dtype}"
                   f"{'' if args.layers is None else f'-{args.layers}l'}")
    zoo = zoo_dir / "zoo.yaml"
    if not zoo.exists():
        t = time.perf_counter()
        synth_zoo(args.arch, args.tasks, args.dtype, str(zoo_dir), seed=0, layers=args.layers)
        print(f"synthesised {zoo} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    largest, largest_name, n_tasks = largest_tensor_bytes(str(zoo))
    ckpt_bytes = sum(p.stat().st_size for p in zoo_dir.glob("base.safetensors"))
    streaming = 3 * largest * (n_tasks + 1)

    overhead = measure("overhead", [str(zoo)])
    ray_overhead = measure("overhead", [str(zoo), "ray"]) if "ray" in executors else None
    rows = []
    for ex in executors:
        with tempfile.TemporaryDirectory() as tmp:
            extra = ["--workers", str(args.workers)] if ex == "ray" else []
            peak = measure("cli", build_args(str(zoo), os.path.join(tmp, "switches"), ex, alphas, extra))
        if peak.code != 0:
            raise SystemExit(f"build with --executor {ex} failed ({peak.code}):\n{peak.stderr[-3000:]}")
        rows.append((ex, peak))

    cmd = " ".join(shlex.quote(a) for a in [".venv/bin/python", "bench/bench_build_memory.py", *sys.argv[1:]])
    lines = [
        f"Zoo: synthetic {args.arch} visual tower, {n_tasks} tasks + base, {args.dtype}"
        f"{'' if args.layers is None else f', {args.layers} blocks'}; {ckpt_bytes / MiB:.0f} MiB per checkpoint, "
        f"{(n_tasks + 1) * ckpt_bytes / MiB:.0f} MiB in all; α = {alphas}.",
        f"Largest tensor: {largest_name}, {largest / MiB:.1f} MiB in fp32.",
        f"Streaming term 3 × largest × (N+1) = 3 × {largest / MiB:.1f} MiB × {n_tasks + 1} = {streaming / MiB:.0f} MiB.",
        f"Fixed overhead (peak RSS of a process that imports torch + tswitch_ray, loads the compiled loops and opens the zoo): "
        f"{overhead.vmhwm / MiB:.0f} MiB.",
        f"Bound = overhead + streaming term = {(overhead.vmhwm + streaming) / MiB:.0f} MiB.",
        "",
        "| executor | peak RSS of the `tswitch` process | − overhead | bound | within bound | Σ RSS whole job | "
        "Σ PSS whole job | processes | largest Ray worker RSS | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for ex, p in rows:
        worker = p.peak_by_kind.get("ray worker")
        lines.append(
            f"| {ex} | {p.vmhwm / MiB:.0f} MiB | {(p.vmhwm - overhead.vmhwm) / MiB:+.0f} MiB | "
            f"{(overhead.vmhwm + streaming) / MiB:.0f} MiB | {'yes' if p.vmhwm <= overhead.vmhwm + streaming else 'NO'} | "
            f"{p.tree_rss / MiB:.0f} MiB | {p.tree_pss / MiB:.0f} MiB | {p.max_procs} | "
            f"{'—' if worker is None else f'{worker / MiB:.0f} MiB'} | {p.seconds:.0f} |"
        )
    lines.append("")
    lines.append(f"ru_maxrss (wait4): overhead {overhead.ru_maxrss / MiB:.0f} MiB; "
                 + "; ".join(f"{ex} {p.ru_maxrss / MiB:.0f} MiB" for ex, p in rows) + ".")
    for ex, p in rows:
        if ex == "ray":
            assert ray_overhead is not None
            reported = _reported_worker_peaks(p.stdout)
            lines.append(
                f"Ray workers: each is its own process with its own fixed overhead. A process that imports ray + "
                f"torch + tswitch_ray and opens the zoo peaks at {ray_overhead.vmhwm / MiB:.0f} MiB, so the "
                f"per-worker bound is {(ray_overhead.vmhwm + streaming) / MiB:.0f} MiB. The peak RSS the workers "
                f"report themselves (ru_maxrss, in the build's summary) is {reported or 'n/a'}; the largest sampled "
                f"worker RSS is {p.peak_by_kind.get('ray worker', 0) / MiB:.0f} MiB.")
            kinds = ", ".join(f"{k} {v / MiB:.0f}" for k, v in sorted(p.peak_by_kind.items(), key=lambda kv: -kv[1]))
            lines.append(f"Ray run, largest sampled RSS per process kind (MiB): {kinds}.")
    text = "\n".join(lines)
    print(text)
    if args.md:
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.md).write_text(f"Command:\n\n```\n{cmd}\n```\n\n{text}\n")


if __name__ == "__main__":
    main()
