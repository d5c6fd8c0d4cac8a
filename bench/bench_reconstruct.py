"""Reconstruct benchmark: a task's weights from its switches against loading or copying its checkpoint.

Side by side in one run, each timed step in its own fresh process (its clock
starts after imports; peak RSS is that process's ``ru_maxrss``), warm page
cache (every file is read once before any timing, and every step repeats
``--repeats`` times; the median is reported):

* **serving** (θ0 already in memory): ``SwitchServer.apply(task)``, a task's
  full state dict from its switches (encoded, read once) and the resident θ0,
  and ``SwitchServer.switch_to(module, task)``, the same written into a live
  module's parameters in place — against ``safetensors.torch.load_file`` of
  the task's checkpoint. Goal ≤ 0.5×. The first ``apply``, which also reads
  the task's switches from storage, is reported too.
* **to a file**: :func:`tswitch_ray.reconstruct.reconstruct_task` (what
  ``tswitch reconstruct`` runs: read θ0 and the switches, write every tensor,
  fsync, rename) — against copying the task's checkpoint (read it, write it
  in 16 MiB blocks, fsync). Goal ≤ 1.2×.

Zoos: ``vit``: ``tswitch_ray.zoo.synth`` ViT-B/16, fp32, 2 tasks (86 M
parameters per model); ``llama``: a Llama-shaped bf16 zoo made here with the
tensor names and shapes of Hugging Face ``LlamaForCausalLM`` (hidden 2048,
intermediate 5632, 32 heads / 4 KV heads, vocabulary 32000 — TinyLlama-1.1B's
shapes — truncated to ``--llama-layers`` layers), 2 tasks. Switches: T-Switch,
α = 0.6, scope "tensor", rms knobs, built in-process.

    BENCH_THREADS=2 .venv/bin/python bench/bench_reconstruct.py --work /tmp/bench_reconstruct \\
        --out bench/results/reconstruct.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

LLAMA = {"hidden": 2048, "intermediate": 5632, "heads": 32, "kv_heads": 4, "vocab": 32000}


def llama_layout(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of LlamaForCausalLM's state dict (transformers' names), ``layers`` decoder layers."""
    h, i, v = LLAMA["hidden"], LLAMA["intermediate"], LLAMA["vocab"]
    kv = h // LLAMA["heads"] * LLAMA["kv_heads"]
    out = [("model.embed_tokens.weight", (v, h))]
    for n in range(layers):
        p = f"model.layers.{n}."
        out += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)), (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def make_llama_zoo(out_dir: str, layers: int, n_tasks: int = 2, seed: int = 0) -> str:
    """A Llama-shaped bf16 zoo: θ0 ~ N(0, 0.02²) (norms 1), each θt = θ0 + a heavy-tailed τ, one file per model."""
    import torch
    import yaml
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    base, tasks = {}, [{} for _ in range(n_tasks)]
    for name, shape in llama_layout(layers):
        b = torch.ones(shape) if name.endswith("norm.weight") else 0.02 * torch.randn(shape, generator=g)
        base[name] = b.to(torch.bfloat16)
        for t in tasks:
            tau = torch.randn(shape, generator=g) * torch.randn(shape, generator=g) * 1e-3
            t[name] = (base[name].float() + tau).to(torch.bfloat16)
    save_file(base, f"{out_dir}/base.safetensors", metadata={"format": "pt"})
    for k, t in enumerate(tasks, 1):
        save_file(t, f"{out_dir}/task_{k:02d}.safetensors", metadata={"format": "pt"})
    manifest = {"name": f"llama-shaped-{layers}l-bf16", "base": "base.safetensors",
                "tasks": [{"name": f"task_{k:02d}", "uri": f"task_{k:02d}.safetensors"} for k in range(1, n_tasks + 1)]}
    with open(f"{out_dir}/zoo.yaml", "w") as f:
        yaml.safe_dump(manifest, f, sort_keys=False)
    return f"{out_dir}/zoo.yaml"


def prepare(work: str, zoo: str, llama_layers: int) -> tuple[str, str]:
    """The zoo and its switches under ``work/zoo`` (made once; reused when present)."""
    from tswitch_ray.distributed.build import BuildConfig, run_build
    from tswitch_ray.options import RunOptions
    from tswitch_ray.zoo.synth import synth_zoo

    zdir, arts = f"{work}/{zoo}/zoo", f"{work}/{zoo}/switches"
    if not os.path.exists(f"{zdir}/zoo.yaml"):
        print(f"[{zoo}] synthesising the zoo...", file=sys.stderr, flush=True)
        if zoo == "vit":
            synth_zoo("vit-b-16", 2, "fp32", zdir)
        else:
            make_llama_zoo(zdir, llama_layers)
    if not os.path.exists(f"{arts}/manifest.json"):
        print(f"[{zoo}] building the switches...", file=sys.stderr, flush=True)
        run_build(BuildConfig(zoo=f"{zdir}/zoo.yaml", out=arts, alphas=[0.6],
                              run=RunOptions(executor="local", show_progress=False)))
    return f"{zdir}/zoo.yaml", arts


# ------------------------------------------------------------------ steps (each runs in a child process)


def _module_of(state: dict) -> object:
    """A live nn.Module whose parameters carry exactly ``state``'s names and tensors (a stand-in for a model)."""
    from torch import nn

    root = nn.Module()
    for name, t in state.items():
        *path, leaf = name.split(".")
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, nn.Module())
            mod = getattr(mod, part)
        mod.register_parameter(leaf, nn.Parameter(t.clone(), requires_grad=False))
    return root


def _timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def step(name: str, zoo_yaml: str, arts: str, task: str, repeats: int, scratch: str, device: str) -> dict:
    """One timed step; returns its times (s) and what it says about itself."""
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    zdir = os.path.dirname(zoo_yaml)
    ckpt = f"{zdir}/{task}.safetensors"
    res: dict = {}
    if name in ("load", "load_materialised", "load_into_module"):
        from safetensors.torch import load_file

        load_file(ckpt)  # warm: page cache and allocator
        if name == "load":  # as returned: may still be backed by the file's pages (lazy)
            res["times"] = _timed(lambda: load_file(ckpt, device=device), repeats)
        elif name == "load_materialised":  # every tensor in this process's own memory, as apply() returns
            res["times"] = _timed(lambda: {k: v.clone() for k, v in load_file(ckpt, device=device).items()},
                                  repeats)
        else:  # a task switch by checkpoint: the live module's parameters overwritten, as switch_to does
            module = _module_of(load_file(ckpt, device=device))
            res["times"] = _timed(lambda: module.load_state_dict(load_file(ckpt, device=device)), repeats)
    elif name in ("apply", "switch_to"):
        from tswitch_ray.serving import SwitchServer

        server = SwitchServer(arts, zoo_yaml, device=device)
        t0 = time.perf_counter()
        sd = server.apply(task)
        res["first_apply_s"] = time.perf_counter() - t0  # reads the task's switches too
        if name == "apply":
            del sd
            res["times"] = _timed(lambda: server.apply(task), repeats)
        else:
            module = _module_of(sd)
            del sd
            res["times"] = _timed(lambda: server.switch_to(module, task), repeats)
    elif name == "reconstruct":
        from tswitch_ray.reconstruct import reconstruct_task

        out = f"{scratch}/reconstructed.safetensors"
        reconstruct_task(arts, task, 0.6, out, zoo_uri=zoo_yaml)
        res["times"] = _timed(lambda: reconstruct_task(arts, task, 0.6, out, zoo_uri=zoo_yaml), repeats)
        res["bytes_out"] = os.path.getsize(out)
    elif name == "copy":
        out = f"{scratch}/copied.safetensors"

        def copy() -> None:
            with open(ckpt, "rb") as src, open(out, "wb") as dst:
                while block := src.read(16 << 20):
                    dst.write(block)
                dst.flush()
                os.fsync(dst.fileno())

        copy()
        res["times"] = _timed(copy, repeats)
        res["bytes_out"] = os.path.getsize(out)
    else:
        raise SystemExit(f"unknown step {name}")
    res["peak_rss"] = _vm_hwm()
    return res


def _vm_hwm() -> int:
    """This process's peak resident set (VmHWM; ru_maxrss would carry the parent's peak across exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def run_child(name: str, zoo_yaml: str, arts: str, args: argparse.Namespace, device: str) -> dict:
    cmd = [sys.executable, __file__, "--step", name, "--zoo-yaml", zoo_yaml, "--arts", arts, "--task", "task_01",
           "--repeats", str(args.repeats), "--work", args.work, "--device", device]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()},
                          check=False)
    if proc.returncode:
        raise SystemExit(f"step {name} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def report(args: argparse.Namespace, results: dict, load: tuple, seconds: float) -> str:
    import torch

    lines = [
        "# Reconstruct and switching against loading / copying the checkpoint",
        "",
        "Measured by `bench/bench_reconstruct.py` (every number below is from one run of it).",
        "",
        "```",
        "BENCH_THREADS=2 .venv/bin/python bench/bench_reconstruct.py " + " ".join(sys.argv[1:]),
        "```",
        "",
        (f"Machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
         f"load average {load[0][0]:.2f} / {load[0][1]:.2f} / {load[0][2]:.2f} (1/5/15 min) at the start and "
         f"{load[1][0]:.2f} / {load[1][1]:.2f} / {load[1][2]:.2f} at the end (shared machine: ratios of steps run "
         f"in the same minutes, not absolute times, are the result). Median of {args.repeats} repeats per step, "
         f"warm page cache, each step in a fresh process; peak RSS = that process's VmHWM. Whole run "
         f"{seconds:.0f} s."),
        "",
        "| zoo | checkpoint | step | device | median s | peak RSS | ratio | goal |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for zoo, r in results.items():
        size = f"{r['ckpt_bytes'] / 2**20:.0f} MiB"
        for dev, steps in r["devices"].items():
            load_s = statistics.median(steps["load_materialised"]["times"])
            into_s = statistics.median(steps["load_into_module"]["times"])
            rows = [("load_file, as returned (lazy: backed by the file's pages)", steps["load"], None, ""),
                    ("load_file + every tensor materialised", steps["load_materialised"], None, ""),
                    ("SwitchServer.apply (vs materialised load)", steps["apply"], load_s, "≤ 0.5 × load"),
                    ("load_file into the live module (load_state_dict)", steps["load_into_module"], None, ""),
                    ("SwitchServer.switch_to, in place (vs load into module)", steps["switch_to"], into_s,
                     "≤ 0.5 × load")]
            if "copy" in steps:
                copy_s = statistics.median(steps["copy"]["times"])
                rows += [("copy (read + write + fsync)", steps["copy"], None, ""),
                         ("reconstruct_task → file", steps["reconstruct"], copy_s, "≤ 1.2 × copy")]
            for label, st, ref, goal in rows:
                med = statistics.median(st["times"])
                ratio = f"**{med / ref:.2f} ×**" if ref else ""
                lines.append(f"| {zoo} | {size} | {label} | {dev} | {med:.3f} | {_gib(st['peak_rss'])} | {ratio} | {goal} |")
            first = steps["apply"]["first_apply_s"]
            lines.append(f"| {zoo} | {size} | first apply (reads the switches) | {dev} | {first:.3f} | | "
                         f"{first / load_s:.2f} × load | |")
        lines.append(f"| {zoo} | | switches per task on disk (set size / tasks) | | | | {r['switch_bytes'] / 2**20:.1f} MiB "
                     f"({100 * r['switch_bytes'] / r['ckpt_bytes']:.1f} % of the checkpoint) | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/bench_reconstruct")
    ap.add_argument("--out", default="bench/results/reconstruct.md")
    ap.add_argument("--zoos", default="vit,llama")
    ap.add_argument("--llama-layers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--step", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--zoo-yaml", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--arts", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--task", default="task_01", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.step:
        print(json.dumps(step(args.step, args.zoo_yaml, args.arts, args.task, args.repeats, args.work, args.device)))
        return
    import torch

    t0 = time.perf_counter()
    prepared = {zoo: prepare(args.work, zoo, args.llama_layers) for zoo in args.zoos.split(",")}
    load_start = os.getloadavg()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results = {}
    for zoo, (zoo_yaml, arts) in prepared.items():
        ckpt = f"{os.path.dirname(zoo_yaml)}/task_01.safetensors"
        with open(f"{arts}/manifest.json") as f:
            sw = json.load(f)
        per_task = sum(p["bytes"] for p in sw["parts"]) / len(sw["tasks"])
        results[zoo] = {"ckpt_bytes": os.path.getsize(ckpt), "switch_bytes": per_task, "devices": {}}
        for dev in devices:
            names = ["load", "load_materialised", "apply", "load_into_module", "switch_to"]
            names += ["copy", "reconstruct"] if dev == "cpu" else []
            steps = {}
            for name in names:
                print(f"[{zoo}] {name} on {dev}...", file=sys.stderr, flush=True)
                steps[name] = run_child(name, zoo_yaml, arts, args, dev)
            results[zoo]["devices"][dev] = steps
    text = report(args, results, (load_start, os.getloadavg()), time.perf_counter() - t0)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
