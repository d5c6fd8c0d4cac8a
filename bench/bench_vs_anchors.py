"""tswitch against the anchors' own code, side by side in one run on the same zoo.

Every anchor runs from its own virtual environment, made by this bench under
``--cache`` (``python -m venv``, then ``pip install -c constraints.txt SPEC``
from the configured package index; the project's constraints.txt pins torch
so pip never pulls a CUDA build). Nothing of theirs is vendored: a failed
install is recorded with pip's own error lines and that anchor is skipped.

* **mergekit** (``mergekit==0.1.5``): TIES and Task Arithmetic, run as
  ``mergekit-yaml CONFIG OUT --lazy-unpickle`` on the zoo's HF folders, against
  ``tswitch merge --method ties -O trim_scope=tensor`` / ``--method ta`` (the
  CLI, Ray executor, ``--workers 2``) with the equivalent options;
* **FusionBench** (``fusion-bench``): recorded as installed or not (its EMR
  runs on a model pool of nn.Modules, not on checkpoint files; see
  bench/results/vs_anchors.md for what was and was not run).

Each job is a fresh process tree started by this bench (the bench itself is
not counted): wall time; peak memory of the whole tree (PSS from
/proc/PID/smaps_rollup summed over the process and all its descendants —
Ray's raylet, gcs_server, agents and workers for ours — sampled every 0.25 s
and whenever the RSS sum grew 32 MiB; the RSS sum every 50 ms as an upper
bound); the load average around it. Jobs alternate ours/theirs per repeat;
the fastest run of each is reported with its own peak.

The merged weights are compared tensor by tensor (max |ours − theirs|, and
the fraction of entries that differ); the bytes our merge read (its summary,
printed by ``tswitch merge``) are divided by the zoo's bytes: how many times
the method reads the zoo.

    .venv/bin/python bench/bench_vs_anchors.py --data /work/bench_data/anchors \
        --arch llama-1b --layers 1 --tasks 4 --repeat 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_build import _pss_bytes, gib

REPO = Path(__file__).resolve().parent.parent
ANCHORS = {"mergekit": "mergekit==0.1.5", "fusion-bench": "fusion-bench==0.2.33"}


# --------------------------------------------------------------------------- anchors' venvs


@dataclass
class Venv:
    name: str
    spec: str
    path: str
    ok: bool
    error: str = ""  # pip's own error lines when the install failed
    version: str = ""


def ensure_venv(cache: Path, name: str, spec: str, python: str) -> Venv:
    """A venv with ``spec`` installed under the constraints (made once; ``.ok`` marks a finished install)."""
    path = cache / "venvs" / spec.replace("==", "-")
    marker = path / ".ok"
    pip = [str(path / "bin" / "python"), "-m", "pip"]
    if not marker.exists():
        if path.exists():
            shutil.rmtree(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([python, "-m", "venv", str(path)], check=True)
        p = subprocess.run([*pip, "install", "-q", "-c", str(REPO / "constraints.txt"), spec],
                           check=False, capture_output=True, text=True)
        if p.returncode != 0:
            lines = [ln for ln in (p.stderr + p.stdout).splitlines() if not ln.startswith("WARNING: Location")]
            return Venv(name, spec, str(path), False, "\n".join(lines[-15:]))
        marker.write_text(spec)
    show = subprocess.run([*pip, "show", name], check=False, capture_output=True, text=True).stdout
    version = next((ln.split(":", 1)[1].strip() for ln in show.splitlines() if ln.startswith("Version:")), "")
    return Venv(name, spec, str(path), True, version=version)


# --------------------------------------------------------------------------- measuring a process tree


@dataclass
class Run:
    label: str
    argv: list[str]
    seconds: float = 0.0
    pss: int = 0
    rss: int = 0
    processes: int = 0
    load_before: float = 0.0
    load_after: float = 0.0
    rc: int = 0
    output: str = ""


def _tree(root: psutil.Process) -> list[psutil.Process]:
    try:
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return [root]


def run_measured(label: str, argv: list[str], env: dict[str, str] | None = None, pss_every_s: float = 0.25,
                 grow_bytes: int = 32 * 2**20) -> Run:
    """Run ``argv`` to completion; wall time and the peak PSS / RSS sums of its whole process tree."""
    run = Run(label, argv, load_before=os.getloadavg()[0])
    stop = threading.Event()

    def sample(proc: psutil.Process) -> None:
        procs, last_pss, rss_at_pss = _tree(proc), 0.0, 0
        while not stop.is_set():
            now = time.perf_counter()
            rss = 0
            for p in procs:
                try:
                    rss += p.memory_info().rss
                except psutil.Error:
                    pass
            if now - last_pss >= pss_every_s or rss > max(run.rss, rss_at_pss + grow_bytes):
                procs = _tree(proc)
                run.processes = max(run.processes, len(procs))
                run.pss = max(run.pss, sum(_pss_bytes(p.pid) for p in procs))
                last_pss, rss_at_pss = now, rss
            run.rss = max(run.rss, rss)
            stop.wait(0.05)

    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    thread = threading.Thread(target=sample, args=(psutil.Process(proc.pid),), daemon=True)
    thread.start()
    out, _ = proc.communicate()
    run.seconds = time.perf_counter() - t0
    stop.set()
    thread.join()
    run.rc, run.output, run.load_after = proc.returncode, out, os.getloadavg()[0]
    if run.rc != 0:
        raise RuntimeError(f"{label} failed (rc {run.rc}):\n{out[-3000:]}")
    return run


# --------------------------------------------------------------------------- zoo and configs


def make_zoo(data: Path, arch: str, layers: int, tasks: int) -> Path:
    out = data / f"zoo-{arch}-l{layers}-t{tasks}-fp16"
    if not (out / "zoo.yaml").exists():
        subprocess.run([sys.executable, "-m", "tswitch_ray.cli", "zoo", "synth", "--arch", arch, "--layers",
                        str(layers), "--tasks", str(tasks), "--dtype", "fp16", "--out", str(out)], check=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    return out / "zoo.yaml"


def zoo_models(zoo_yaml: Path) -> tuple[str, dict[str, str]]:
    """The base and {task: path} of a zoo: an HF folder (LLM zoos; what mergekit reads) or one safetensors file."""
    from tswitch_ray.zoo import load_zoo

    zoo = load_zoo(str(zoo_yaml))
    raw = yaml.safe_load(zoo_yaml.read_text())

    def path(entry: Any) -> str:
        p = entry if isinstance(entry, str) else entry.get("path") or entry.get("uri")
        return str(Path(p) if os.path.isabs(p) else zoo_yaml.parent / p)

    tasks = raw["tasks"]
    by_name = tasks if isinstance(tasks, dict) else {t["name"]: t for t in tasks}
    return path(raw["base"]), {n: path(by_name[n]) for n in zoo.task_names}


def model_files(path: str) -> list[Path]:
    p = Path(path)
    return sorted(p.glob("*.safetensors")) if p.is_dir() else [p]


def zoo_bytes(base: str, tasks: dict[str, str]) -> int:
    return sum(f.stat().st_size for m in [base, *tasks.values()] for f in model_files(m))


def mergekit_config(method: str, base: str, tasks: dict[str, str], k: float, scale: float) -> dict[str, Any]:
    """mergekit's config for ours: TIES (density = k/100, weight 1, normalize: mean over agreeing tasks,
    lambda = scale) and Task Arithmetic (weight = scale, no normalisation: θ0 + scale·Στ)."""
    if method == "ties":
        models = [{"model": d, "parameters": {"weight": 1.0, "density": k / 100.0}} for d in tasks.values()]
        params = {"normalize": True, "int8_mask": False, "lambda": scale}
        name = "ties"
    else:
        models = [{"model": d, "parameters": {"weight": scale}} for d in tasks.values()]
        params = {"normalize": False, "int8_mask": False, "lambda": 1.0}
        name = "task_arithmetic"
    return {"merge_method": name, "base_model": base, "models": models, "parameters": params, "dtype": "float16"}


# --------------------------------------------------------------------------- comparing weights


def compare(ours: list[Path], theirs: list[Path], prefix: str = "") -> dict[str, Any]:
    """Per tensor of one model (its files ``ours`` / ``theirs``): max |ours − theirs|, the fraction of entries
    that differ and of those that differ by more than one unit in the last place (fp32 comparison)."""
    import torch
    from safetensors import safe_open

    def index(files: list[Path]) -> dict[str, Path]:
        out = {}
        for f in files:
            with safe_open(str(f), framework="pt") as h:
                out.update({k: f for k in h.keys()})  # noqa: SIM118 (a safe_open handle, not a dict)
        return out

    a, b = index(ours), index(theirs)
    rows = []
    for name in sorted(set(a) & set(b)):
        with safe_open(str(a[name]), framework="pt") as fa, safe_open(str(b[name]), framework="pt") as fb:
            x, y = fa.get_tensor(name).float(), fb.get_tensor(name).float()
            y16 = fb.get_tensor(name)
        d = (x - y).abs()
        # one unit in the last place of their value, in their dtype: rounding alone stays within it
        ulp = (torch.nextafter(y16, torch.full_like(y16, float("inf"))).float() - y).abs()
        rows.append({"tensor": prefix + name, "max_abs_diff": float(d.max()), "frac_differ": float((d > 0).float().mean()),
                     "frac_beyond_1ulp": float((d > ulp).float().mean()), "max_abs_value": float(y.abs().max()),
                     "numel": y.numel()})
    return {"tensors": rows, "only_ours": sorted(set(a) - set(b)), "only_theirs": sorted(set(b) - set(a))}


# --------------------------------------------------------------------------- the bench


def _read_bytes(output: str) -> float | None:
    """The bytes read that `tswitch merge` prints from its merge summary ("N shards, X GiB read, ...")."""
    m = re.search(r"shards, ([\d.]+) (B|KiB|MiB|GiB|TiB) read", output)
    if not m:
        return None
    return float(m.group(1)) * 1024 ** ["B", "KiB", "MiB", "GiB", "TiB"].index(m.group(2))


def bench_method(method: str, zoo_yaml: Path, base: str, tasks: dict[str, str], mk: Venv, work: Path,
                 args: argparse.Namespace) -> dict[str, Any]:
    cfg_path = work / f"{method}.yml"
    cfg_path.write_text(yaml.safe_dump(mergekit_config(method, base, tasks, args.k, args.scale), sort_keys=False))
    opts = ["-O", f"scale={args.scale}"] + (["-O", f"k={args.k}", "-O", "trim_scope=tensor"] if method == "ties" else [])
    ours_out, theirs_out = work / f"ours-{method}", work / f"mergekit-{method}"
    ours_argv = [sys.executable, "-m", "tswitch_ray.cli", "merge", "--zoo", str(zoo_yaml), "--method", method,
                 "--out", str(ours_out), "--overwrite", "--workers", str(args.workers), "-q", *opts]
    theirs_argv = [str(Path(mk.path) / "bin" / "mergekit-yaml"), str(cfg_path), str(theirs_out), "--lazy-unpickle",
                   "--allow-crimes", "--out-shard-size", "5B"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ours, theirs = [], []
    for i in range(args.repeat):
        order = [("ours", ours_argv, ours), ("mergekit", theirs_argv, theirs)]
        for label, argv, acc in (order if i % 2 == 0 else order[::-1]):
            out = ours_out if label == "ours" else theirs_out
            if out.exists():
                shutil.rmtree(out)
            r = run_measured(f"{label} {method}", argv, env=env)
            acc.append(r)
            print(f"  {method} {label}: {r.seconds:.1f} s, PSS {gib(r.pss)}, RSS {gib(r.rss)}, "
                  f"load {r.load_before:.1f}->{r.load_after:.1f}", flush=True)
    best_o, best_t = min(ours, key=lambda r: r.seconds), min(theirs, key=lambda r: r.seconds)
    diff = compare(sorted(ours_out.glob("*.safetensors")), sorted(theirs_out.glob("*.safetensors")))
    return {"method": method, "anchor": f"mergekit {mk.version}", "ours": [asdict(r) | {"output": r.output[-600:]} for r in ours],
            "theirs": [asdict(r) | {"output": r.output[-600:]} for r in theirs],
            "time_ratio": best_o.seconds / best_t.seconds, "pss_ratio": best_o.pss / best_t.pss,
            "rss_ratio": best_o.rss / best_t.rss, "bytes_read": _read_bytes(best_o.output), "compare": diff,
            "mergekit_config": yaml.safe_load(cfg_path.read_text())}


def bench_emr(zoo_yaml: Path, base: str, tasks: dict[str, str], fb: Venv, work: Path,
              args: argparse.Namespace) -> dict[str, Any]:
    """`tswitch merge --method emr` against FusionBench's ``emr_merge`` (fusionbench_emr_driver.py, its venv)."""
    ours_out, theirs_out = work / "ours-emr", work / "fusionbench-emr"
    ours_argv = [sys.executable, "-m", "tswitch_ray.cli", "merge", "--zoo", str(zoo_yaml), "--method", "emr",
                 "--out", str(ours_out), "--overwrite", "--workers", str(args.workers), "-q"]
    theirs_argv = [str(Path(fb.path) / "bin" / "python"), str(Path(__file__).with_name("fusionbench_emr_driver.py")),
                   str(theirs_out), base, *(f"{n}={d}" for n, d in tasks.items())]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ours, theirs = [], []
    for i in range(args.repeat):
        order = [("ours", ours_argv, ours, ours_out), ("fusionbench", theirs_argv, theirs, theirs_out)]
        for label, argv, acc, out in (order if i % 2 == 0 else order[::-1]):
            if out.exists():
                shutil.rmtree(out)
            r = run_measured(f"{label} emr", argv, env=env if label == "ours" else None)
            acc.append(r)
            print(f"  emr {label}: {r.seconds:.1f} s, PSS {gib(r.pss)}, RSS {gib(r.rss)}, "
                  f"load {r.load_before:.1f}->{r.load_after:.1f}", flush=True)
    best_o, best_t = min(ours, key=lambda r: r.seconds), min(theirs, key=lambda r: r.seconds)
    rows: list[dict[str, Any]] = []
    for name in tasks:
        rows += compare([ours_out / f"{name}.safetensors"], [theirs_out / f"{name}.safetensors"], f"{name}:")["tensors"]
    return {"method": "emr", "anchor": f"FusionBench {fb.version} emr_merge", "ours": [asdict(r) | {"output": r.output[-600:]} for r in ours],
            "theirs": [asdict(r) | {"output": r.output[-600:]} for r in theirs],
            "time_ratio": best_o.seconds / best_t.seconds, "pss_ratio": best_o.pss / best_t.pss,
            "rss_ratio": best_o.rss / best_t.rss, "bytes_read": _read_bytes(best_o.output),
            "compare": {"tensors": rows, "only_ours": [], "only_theirs": []}}


def _weighted(rows: list[dict[str, Any]], key: str) -> str:
    """An element-weighted fraction over all compared tensors."""
    n = sum(r["numel"] for r in rows)
    return f"{sum(r[key] * r['numel'] for r in rows) / n:.2e}" if n else "-"


def markdown(result: dict[str, Any]) -> str:
    lines = [(f"load average at start {result['load_start']:.2f}, at end {result['load_end']:.2f}; "
              f"zoo {gib(result['zoo_bytes'])} ({result['zoo']}); command: `{result['command']}`"), "",
             ("| method | anchor | ours s | anchor s | time ratio | ours PSS | anchor PSS | PSS ratio | ours RSS | "
              "anchor RSS | zoo reads (ours) | worst max abs diff | tensors with any diff | entries ≠ | entries > 1 ulp |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in result["methods"]:
        o = min(m["ours"], key=lambda r: r["seconds"])
        t = min(m["theirs"], key=lambda r: r["seconds"])
        rows = m["compare"]["tensors"]
        worst = max(rows, key=lambda r: r["max_abs_diff"]) if rows else {"max_abs_diff": float("nan"), "tensor": "-"}
        reads = f"{m['bytes_read'] / result['zoo_bytes']:.2f}" if m["bytes_read"] else "?"
        lines.append(f"| {m['method']} | {m['anchor']} | {o['seconds']:.1f} | {t['seconds']:.1f} | {m['time_ratio']:.2f} | "
                     f"{gib(o['pss'])} | {gib(t['pss'])} | {m['pss_ratio']:.2f} | {gib(o['rss'])} | {gib(t['rss'])} | "
                     f"{reads} | {worst['max_abs_diff']:.3g} ({worst['tensor']}) | "
                     f"{sum(r['max_abs_diff'] > 0 for r in rows)}/{len(rows)} | {_weighted(rows, 'frac_differ')} | "
                     f"{_weighted(rows, 'frac_beyond_1ulp')} |")
    for m in result["methods"]:
        lines += ["", f"{m['method']}: the 5 tensors with the largest difference", "",
                  "| tensor | max abs diff | max abs value | entries ≠ | entries > 1 ulp |", "|---|---|---|---|---|"]
        for r in sorted(m["compare"]["tensors"], key=lambda r: -r["max_abs_diff"])[:5]:
            lines.append(f"| {r['tensor']} | {r['max_abs_diff']:.3g} | {r['max_abs_value']:.3g} | "
                         f"{r['frac_differ']:.2e} | {r['frac_beyond_1ulp']:.2e} |")
    for v in result["venvs"]:
        if not v["ok"]:
            lines += ["", f"{v['spec']} could not be installed:", "", "```", v["error"], "```"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="/work/bench_data/anchors", help="zoo and merge outputs (outside the repo)")
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/tswitch-bench"), help="the anchors' venvs")
    ap.add_argument("--zoo", default=None, help="an existing LLM zoo.yaml (else one is synthesised)")
    ap.add_argument("--arch", default="llama-1b")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--method", action="append", choices=["ties", "ta", "emr"], default=None,
                    help="ties, ta (against mergekit), emr (against FusionBench); default: all three")
    ap.add_argument("--k", type=float, default=20.0, help="TIES percent kept (mergekit density = k/100)")
    ap.add_argument("--scale", type=float, default=0.3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--python", default=getattr(sys, "_base_executable", sys.executable),
                    help="interpreter the venvs are made from")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    data, cache = Path(args.data), Path(args.cache)
    data.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()[0]
    venvs = {name: ensure_venv(cache, name, spec, args.python) for name, spec in ANCHORS.items()}
    zoo_yaml = Path(args.zoo) if args.zoo else make_zoo(data, args.arch, args.layers, args.tasks)
    base, tasks = zoo_models(zoo_yaml)
    result: dict[str, Any] = {
        "command": " ".join([os.path.relpath(sys.argv[0], REPO) if sys.argv else "bench_vs_anchors.py",
                             *(argv if argv is not None else sys.argv[1:])]),
        "machine": f"{os.cpu_count()} CPUs, {gib(psutil.virtual_memory().total)} RAM, {platform.platform()}",
        "zoo": str(zoo_yaml), "zoo_bytes": zoo_bytes(base, tasks), "load_start": load_start,
        "venvs": [asdict(v) for v in venvs.values()], "methods": []}
    mk = venvs["mergekit"]
    methods = args.method or ["ties", "ta", "emr"]
    if mk.ok:
        for method in [m for m in methods if m != "emr"]:
            result["methods"].append(bench_method(method, zoo_yaml, base, tasks, mk, data, args))
    if venvs["fusion-bench"].ok and "emr" in methods:
        result["methods"].append(bench_emr(zoo_yaml, base, tasks, venvs["fusion-bench"], data, args))
    result["load_end"] = os.getloadavg()[0]
    print(markdown(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
