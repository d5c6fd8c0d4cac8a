"""Per-input routing on the demo zoo: Auto-Switch over k and m, WEMoE and E-WEMoE.

Uses the demo zoo (``tswitch_ray.eval.demo_zoo``: tiny open_clip ViT, 32x32,
width 96, 3 layers, 8 tasks, 400 eval rows per task). Query sets (Auto-Switch)
and test-time-adaptation sets (WEMoE) are the zoo's held-out unlabeled sample
``data/<task>/train.parquet`` (128 rows per task, disjoint from the eval rows).
Switches: T-Switch with α = 0.6, per-tensor thresholds and rms knobs (the
authors' settings), built here with ``tswitch_ray.switch``. References on the
same eval rows: the base model, Task Arithmetic (s = 0.3) and T-Switch with
the oracle task (each task scored with its own switch).

    .venv/bin/python bench/bench_routing.py --zoo /tmp/demo/zoo --out bench/results/routing.md

Writes a Markdown report (numbers measured by this run) and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

from tswitch_ray.eval.autoswitch_eval import evaluate_autoswitch, rebuild_state_dict
from tswitch_ray.eval.evaluate import evaluate, load_demo
from tswitch_ray.eval.wemoe_eval import evaluate_wemoe
from tswitch_ray.methods.base import merge_in_memory
from tswitch_ray.methods.task_arithmetic import TaskArithmetic
from tswitch_ray.switch.binarize import binarize, kept_stats, knob
from tswitch_ray.switch.thresholds import tensor_thresholds


def build_switches(base, task_sds, alpha=0.6):
    out = []
    for sd in task_sds:
        sw = {}
        for name, b in base.items():
            if not b.is_floating_point():
                continue
            tau = sd[name].float() - b.float()
            th = tensor_thresholds(tau, [alpha], name)[0]
            mask, positive = binarize(tau, th)
            sw[name] = (mask.flatten(), positive.flatten(), knob(kept_stats(tau, mask), "rms"))
        out.append(sw)
    return out


class DenseRebuild:
    """Before (until the int8 planes and window grouping): every weight vector's weights rebuilt from the
    boolean masks, θ0 + Σ wt·λt·where(M, ±1, 0) per task and tensor (:func:`_combine_from_masks`)."""

    def __init__(self, base_sd, switches, device):
        self.base_sd, self.switches = base_sd, switches

    def state_dict(self, weights):
        w = [float(v) for v in (weights.tolist() if isinstance(weights, torch.Tensor) else weights)]
        out = {}
        for name, base in self.base_sd.items():
            pairs = [(sw[name], wt) for sw, wt in zip(self.switches, w) if name in sw and wt != 0.0]
            out[name] = _combine_from_masks(base, pairs) if pairs and base.is_floating_point() else base
        return out


def _combine_from_masks(base, pairs):
    acc = base.to(torch.float32)
    for (mask, positive, knob), wt in pairs:
        signed = torch.where(positive, 1.0, -1.0)
        acc = acc + (wt * float(knob)) * torch.where(mask, signed, 0.0).reshape(acc.shape)
    return acc.to(base.dtype)


def compare_autoswitch(args, adapter, base, switches, tasks, eval_sets, unl):
    """Auto-Switch k = 10, m = 100 before and after (dense rebuild + per-batch groups vs int8 planes +
    window groups), side by side in this process; returns the Markdown rows."""
    from tswitch_ray.eval import autoswitch_eval

    runs = {}
    for label in ("before", "after"):
        print(f"auto-switch k=10 m=100 {label}...", file=sys.stderr, flush=True)
        kw = {}
        if label == "before":
            autoswitch_eval.SignedSwitches, saved = DenseRebuild, autoswitch_eval.SignedSwitches
            kw["group_window"] = args.batch_size  # groups formed inside each batch
        try:
            runs[label] = evaluate_autoswitch(adapter, base, switches, tasks, eval_sets, unl, examples_per_task=100,
                                              k=10, limit=args.limit, device="cpu", batch_size=args.batch_size, **kw)
        finally:
            if label == "before":
                autoswitch_eval.SignedSwitches = saved
    same = all(runs["before"]["per_task"][t]["accuracy"] == runs["after"]["per_task"][t]["accuracy"] for t in tasks)
    rows = []
    for label, res in runs.items():
        groups = sum(r["groups"] for r in res["per_task"].values())
        note = (f"throughput ratio **{res['throughput_ratio']:.3f}**, {groups} weight groups, {res['models_built']} rebuilds "
                f"({res['rebuild_seconds']:.1f} s), {res['seconds']:.0f} s")
        rows.append(avg_row(f"Auto-Switch k = 10, m = 100, {label}", res, tasks, note))
    rows.append(f"\nSame accuracy on every task before and after: **{same}**; throughput ratio after / before: "
                f"**{runs['after']['throughput_ratio'] / runs['before']['throughput_ratio']:.2f} ×**.")
    return rows, runs


def avg_row(name, res, tasks, extra=""):
    cells = " | ".join(f"{100 * res['per_task'][t]['accuracy']:.1f}" for t in tasks)
    return f"| {name} | {cells} | **{100 * res['average']:.2f}** | {extra} |"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--zoo", default="/tmp/demo/zoo")
    ap.add_argument("--out", default="bench/results/routing.md")
    ap.add_argument("--ks", default="1,5,10,20")
    ap.add_argument("--ms", default="10,25,50,100")
    ap.add_argument("--limit", type=int, default=None, help="eval rows per task (default: all)")
    ap.add_argument("--tta-steps", type=int, default=200)
    ap.add_argument("--lrs", default="1e-4,1e-3", help="TTA learning rates to try for WEMoE / E-WEMoE")
    ap.add_argument("--json", default=None, help="also dump raw results here")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--compare-only", action="store_true",
                    help="only Auto-Switch k = 10, m = 100 before / after, side by side (with the references)")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    t_all = time.perf_counter()
    load_start = os.getloadavg()

    demo = load_demo(args.zoo)
    adapter, tasks = demo.adapter, demo.tasks
    base = demo.state_dict("base")
    task_sds = [demo.state_dict(t) for t in tasks]
    eval_sets = {t: demo.eval_dataset(t) for t in tasks}
    unl = {t: demo.train_dataset(t) for t in tasks}
    raw: dict = {}
    rows: list[str] = []
    auto_rows: list[str] = []
    wemoe_rows: list[str] = []
    header = "| method | " + " | ".join(tasks) + " | avg | notes |"
    sep = "|" + "---|" * (len(tasks) + 3)

    def plain(name, sd):
        m = adapter.build(sd)
        res = {"per_task": {t: evaluate(adapter, m, eval_sets[t], t, limit=args.limit, device="cpu") for t in tasks}}
        res["average"] = sum(r["accuracy"] for r in res["per_task"].values()) / len(tasks)
        return res

    def write(final=False):
        total = time.perf_counter() - t_all
        cmd = "BENCH_THREADS=2 .venv/bin/python bench/bench_routing.py " + " ".join(argv if argv is not None else sys.argv[1:])
        lines = [
            "# Per-input routing on the demo zoo: Auto-Switch and WEMoE / E-WEMoE",
            "",
            "Measured by `bench/bench_routing.py` (numbers below are from one run of that script; accuracy in %).",
            "",
            "```",
            cmd.strip(),
            "```",
            "",
            f"Machine: {platform.platform()}, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, CPU only, shared with other jobs (timings are indicative). "
            f"Zoo: `{args.zoo}` ({len(tasks)} tasks, recipe {demo.info.get('recipe_hash', demo.info.get('recipe', '?'))}). "
            f"Eval rows per task: {args.limit or 'all'}. Query / TTA sets: `data/<task>/train.parquet` (unlabeled use). "
            + (f"Whole run: {total:.0f} s." if final else f"PARTIAL: {total:.0f} s so far, run still going.")
            + f" Load average (1/5/15 min) at the start {' / '.join(f'{v:.1f}' for v in load_start)}, now "
            + f"{' / '.join(f'{v:.1f}' for v in os.getloadavg())}.",
            "",
            "## References",
            "",
            header, sep, *rows,
            "",
            "## Auto-Switch (paper 000 eq. 8)",
            "",
            "Defaults: k = 10, m = 100, per-input weights, query features from θ0 + (1/T)·Σ λt·Mt⊙St (`feature_model=\"average\"`).",
            "'routing hit' = inputs whose largest kNN weight is their own task; 'throughput ratio' = Auto-Switch inputs/s "
            "(feature pass + kNN + rebuilds + grouped passes) / plain single-model inputs/s on the same inputs.",
            "",
            header, sep, *auto_rows,
            "",
            "## WEMoE / E-WEMoE (paper 002)",
            "",
            f"Defaults: λ = 0.3, router W ~ N(0, 0.1²), b1 = λ, hidden = MLP input width, Adam, batch 16, {args.tta_steps} TTA steps "
            "round-robin over tasks. Entropy = mean prediction entropy over the TTA splits before → after adaptation.",
            "",
            header, sep, *wemoe_rows,
            "",
        ]
        text = "\n".join(lines)
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(raw, f, indent=1, default=str)
        return text

    print("references...", file=sys.stderr, flush=True)
    raw["base"] = plain("base", base)
    rows.append(avg_row("pretrained θ0", raw["base"], tasks))
    raw["ta"] = plain("ta", merge_in_memory(TaskArithmetic(scale=0.3), base, task_sds))
    rows.append(avg_row("Task Arithmetic (s = 0.3)", raw["ta"], tasks))
    switches = build_switches(base, task_sds)
    ts = {"per_task": {}}
    for i, t in enumerate(tasks):
        onehot = [1.0 if j == i else 0.0 for j in range(len(tasks))]
        m = adapter.build(rebuild_state_dict(base, switches, onehot))
        ts["per_task"][t] = evaluate(adapter, m, eval_sets[t], t, limit=args.limit, device="cpu")
    ts["average"] = sum(r["accuracy"] for r in ts["per_task"].values()) / len(tasks)
    raw["tswitch_oracle"] = ts
    rows.append(avg_row("T-Switch α = 0.6, oracle task", ts, tasks))
    write()
    compare_rows, raw["compare"] = compare_autoswitch(args, adapter, base, switches, tasks, eval_sets, unl)
    auto_rows.extend(compare_rows)
    write()
    if args.compare_only:
        print(write(final=True))
        return

    ks = [int(v) for v in args.ks.split(",")]
    ms = [int(v) for v in args.ms.split(",")]
    grid = [(10, m, "average", False) for m in sorted(set(ms) | {100})] + [(k, 100, "average", False) for k in ks if k != 10]
    grid += [(10, 100, "base", False), (10, 100, "average", True)]
    for k, m, fm, aob in grid:
        print(f"auto-switch k={k} m={m} {fm} avg_batch={aob}...", file=sys.stderr, flush=True)
        res = evaluate_autoswitch(adapter, base, switches, tasks, eval_sets, unl, examples_per_task=m, k=k,
                                  limit=args.limit, device="cpu", feature_model=fm, average_over_batch=aob)
        raw[f"auto_k{k}_m{m}_{fm}_{int(aob)}"] = res
        hit = sum(r["routing_hit_rate"] * r["n"] for r in res["per_task"].values()) / sum(r["n"] for r in res["per_task"].values())
        note = (f"routing hit {100 * hit:.1f} %, {res['models_built']} rebuilds, "
                f"throughput ratio {res['throughput_ratio']:.3f}, {res['seconds']:.0f} s")
        label = f"Auto-Switch k = {k}, m = {m}" + ("" if fm == "average" else f", features: {fm}") + (", batch-averaged weights" if aob else "")
        auto_rows.append(avg_row(label, res, tasks, note))
        write()

    print("wemoe without TTA...", file=sys.stderr, flush=True)
    res0 = evaluate_wemoe(adapter, base, task_sds, tasks, eval_sets, unl, tta_steps=0, limit=args.limit, device="cpu")
    raw["wemoe_no_tta"] = {k: v for k, v in res0.items() if k != "tta_losses"}
    wemoe_rows.append(avg_row("WEMoE, no TTA (routers at init)", res0, tasks, f"{res0['seconds']:.0f} s"))
    write()
    for lr in [float(v) for v in args.lrs.split(",")]:
        for variant, kf in (("wemoe", None), ("e-wemoe", 0.1), ("e-wemoe", 0.01)):
            print(f"{variant} keep={kf} lr={lr}...", file=sys.stderr, flush=True)
            res = evaluate_wemoe(adapter, base, task_sds, tasks, eval_sets, unl, variant=variant, keep_fraction=kf,
                                 tta_steps=args.tta_steps, lr=lr, limit=args.limit, device="cpu", measure_entropy=True)
            raw[f"{variant}_{kf}_{lr}"] = {k: v for k, v in res.items() if k != "tta_losses"}
            name = "WEMoE" if variant == "wemoe" else f"E-WEMoE-{round(100 * (1 - kf))} %"
            note = (f"lr {lr:g}, {res['tta_steps']} TTA steps ({res['tta_seconds']:.0f} s), entropy {res['entropy_before']:.3f} → "
                    f"{res['entropy_after']:.3f}, {res['n_routers']} router(s), {res['router_parameters']} router params, {res['seconds']:.0f} s total")
            wemoe_rows.append(avg_row(f"{name}", res, tasks, note))
            write()

    print(write(final=True))


if __name__ == "__main__":
    main()
