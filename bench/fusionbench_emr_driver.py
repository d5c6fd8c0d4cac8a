"""Runs FusionBench's own ``emr_merge`` on checkpoint files; executed by bench_vs_anchors.py with the Python
of the venv it made for fusion-bench (nothing of FusionBench is copied here).

FusionBench applies EMR to in-memory models (``fusion_bench.method.emr_merging``); its math is
``fusion_bench.method.emr_merging.utils.emr_merge(task_vectors)`` → (τuni, masks, rescalers). This driver
does what any user of it must do around it: load θ0 and every θt in fp32, τt = θt − θ0, call ``emr_merge``,
then write θt' = θ0 + λt·Mt⊙τuni in the checkpoints' dtype, one ``TASK.safetensors`` per task.

    python fusionbench_emr_driver.py OUT BASE NAME=TASK [NAME=TASK ...]   (files or shard folders)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from fusion_bench.method.emr_merging.utils import emr_merge
from safetensors import safe_open
from safetensors.torch import save_file


def load(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a model: one safetensors file, or a folder of shards."""
    p = Path(path)
    out: dict[str, torch.Tensor] = {}
    for f in sorted(p.glob("*.safetensors")) if p.is_dir() else [p]:
        with safe_open(str(f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})  # noqa: SIM118 (a safe_open handle, not a dict)
    return out


def main(argv: list[str]) -> None:
    out, base_dir, tasks = Path(argv[0]), argv[1], [a.split("=", 1) for a in argv[2:]]
    base = load(base_dir)
    dtypes = {k: v.dtype for k, v in base.items()}
    floats = [k for k, v in base.items() if v.is_floating_point()]
    base32 = {k: base[k].float() for k in floats}
    taus = []
    for _, path in tasks:
        sd = load(path)
        taus.append({k: sd.pop(k).float().sub_(base32[k]) for k in floats})
    unified, masks, rescalers = emr_merge(taus)
    del taus
    out.mkdir(parents=True, exist_ok=True)
    for t, (name, _) in enumerate(tasks):
        sd = {k: (base32[k] + float(rescalers[t]) * masks[k][t] * unified[k]).to(dtypes[k]) if k in base32
              else base[k] for k in base}
        save_file(sd, str(out / f"{name}.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1:])
