"""LoRA adapters as tasks vs the same tasks merged into full checkpoints: `tswitch build` side by side.

Writes a bf16 LlamaForCausalLM base (transformers ``save_pretrained``) and N
LoRA adapters on every linear layer (peft ``get_peft_model`` with seeded
non-zero factors, ``save_pretrained``), plus each adapter's
``merge_and_unload()`` saved as a full bf16 checkpoint — the step users did by
hand before adapters were read directly. Then it builds switches (local
executor, scope "tensor") from both zoos, each in a fresh process, and prints
the zoo's task bytes on disk, the build's wall time and peak RSS (``wait4``),
and the fraction of switch mask elements where the two builds differ (the
dense zoo's τ is θ0 + s·B·A rounded to bf16, minus θ0; the adapter zoo's is
s·B·A exactly).

    python bench/bench_lora_build.py --work /tmp/lora-bench --hidden 1024 --layers 8 --tasks 4 --rank 16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

BUILD = """
import sys, json
from tswitch_ray.distributed.build import BuildConfig, run_build
s = run_build(BuildConfig(zoo=sys.argv[1], out=sys.argv[2], alphas=[0.6], executor="local", show_progress=False))
print(json.dumps({"encoded_bytes": s.encoded_bytes, "tasks": s.tasks}))
"""


def _write_zoo(work: Path, args: argparse.Namespace) -> None:
    import peft
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                                   num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                                   num_key_value_heads=max(1, args.hidden // 256), vocab_size=args.vocab,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(str(work / "base"))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for t in range(args.tasks):
        model = transformers.LlamaForCausalLM.from_pretrained(str(work / "base"), dtype=torch.bfloat16)
        pm = peft.get_peft_model(model, peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=targets))
        g = torch.Generator().manual_seed(t + 1)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_" in name:
                    p.copy_(0.02 * torch.randn(p.shape, generator=g))
        pm.save_pretrained(str(work / "lora" / f"t{t}"))
        pm.merge_and_unload().save_pretrained(str(work / "dense" / f"t{t}"))
    for kind in ("lora", "dense"):
        tasks = [{"name": f"t{t}", "uri": f"{kind}/t{t}"} for t in range(args.tasks)]
        (work / f"zoo-{kind}.yaml").write_text(yaml.safe_dump({"name": kind, "base": "base", "tasks": tasks}))


def _build(work: Path, kind: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = work / f"switches-{kind}"
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", BUILD, str(work / f"zoo-{kind}.yaml"), str(out)],
                            stdout=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if status != 0:
        raise SystemExit(f"build of the {kind} zoo failed")
    summary = json.loads(proc.stdout.read().decode().strip().splitlines()[-1])
    task_bytes = sum(f.stat().st_size for f in (work / kind).rglob("*") if f.is_file())
    return {"seconds": seconds, "peak_rss": usage.ru_maxrss * 1024, "task_bytes": task_bytes, **summary}


def _mask_difference(work: Path, tasks: int) -> float:
    from tswitch_ray.artifacts import ArtifactReader

    a, b = ArtifactReader(str(work / "switches-lora")), ArtifactReader(str(work / "switches-dense"))
    differ = total = 0
    for t in range(tasks):
        for (na, ma, _, _), (nb, mb, _, _) in zip(a.iter_switches(f"t{t}", 0.6), b.iter_switches(f"t{t}", 0.6),
                                                  strict=True):
            assert na == nb, (na, nb)
            differ += int(np.count_nonzero(ma != mb))
            total += ma.size
    return differ / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args()
    work = Path(args.work)
    if not (work / "zoo-dense.yaml").exists():
        _write_zoo(work, args)
    rows = {kind: _build(work, kind) for kind in ("lora", "dense")}
    print(f"load average {os.getloadavg()[0]:.1f}; {args.tasks} tasks, hidden {args.hidden}, {args.layers} layers, "
          f"vocab {args.vocab}, r = {args.rank}, bf16")
    print("| zoo | task bytes on disk | build s | peak RSS MiB |")
    print("| --- | ---: | ---: | ---: |")
    for kind, r in rows.items():
        print(f"| {kind} | {r['task_bytes'] / 2**20:.1f} MiB | {r['seconds']:.1f} | {r['peak_rss'] / 2**20:.0f} |")
    print(f"mask elements differing between the two builds: {100 * _mask_difference(work, args.tasks):.2f} %")


if __name__ == "__main__":
    main()
