"""Synthetic model zoos with the tensor layout of open_clip's ViT vision towers (and Llama's: synth_llm.py).

Real zoos (ViT-B/32 x 8 tasks, the 30-ViT benchmark) cannot be downloaded
here, so tests and benchmarks run on synthetic ones of the same shapes:

* tensor names, shapes and order are those of ``visual.*`` in the state dict
  of ``open_clip.create_model(arch, pretrained=None)`` (computed from the
  architecture config, so no model is ever allocated; checked against
  open_clip in the tests);
* the base is randomly initialised (std 0.02 for weight matrices and biases,
  ``width**-0.5`` for the embeddings and projection as in open_clip,
  LayerNorm weights near 1);
* each task vector tau_t is heavy-tailed and different per task and tensor:
  Student-t with 3 degrees of freedom (normalised to unit variance) times a
  per-(task, tensor) scale drawn log-normally around 4e-4 (the order of
  fine-tuned CLIP task vectors), and for about a quarter of (task, tensor)
  pairs a random 10-60 % of entries exactly zero. The task checkpoint stores
  ``(theta_0 + tau_t)`` rounded to the storage dtype, so low-precision
  rounding creates further exact zeros, as in real fp16 zoos.

Generation streams tensor by tensor into all N+1 files at once (one tensor in
memory at a time), and is deterministic: every (task, tensor) pair has its own
seed derived from ``seed``, the task index and the tensor name, so a zoo
truncated with ``layers`` holds exactly the same tensors as the full one.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

import numpy as np
import torch
import yaml

from tswitch_ray.errors import ConfigError
from tswitch_ray.io.atomic import atomic_write
from tswitch_ray.io.fs import join_uri
from tswitch_ray.io.safetensors import SafetensorsStreamWriter, all_or_none
from tswitch_ray.zoo.synth_llm import LLM_ARCHS, synth_llm_zoo

# open_clip model configs (ViT-*-*.json): vision width, depth, patch size,
# image size and joint embedding dim.
ARCHS: dict[str, dict[str, int]] = {
    "vit-b-32": {"width": 768, "layers": 12, "patch": 32, "image": 224, "embed": 512},
    "vit-b-16": {"width": 768, "layers": 12, "patch": 16, "image": 224, "embed": 512},
    "vit-l-14": {"width": 1024, "layers": 24, "patch": 14, "image": 224, "embed": 768},
}
OPEN_CLIP_NAMES = {"vit-b-32": "ViT-B-32", "vit-b-16": "ViT-B-16", "vit-l-14": "ViT-L-14"}
_DTYPES = {"fp16": ("F16", torch.float16), "fp32": ("F32", torch.float32), "bf16": ("BF16", torch.bfloat16)}

TAU_MEDIAN_SCALE = 4e-4
TAU_DF = 3


def vision_tower_layout(arch: str, layers: int | None = None) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every ``visual.*`` tensor of open_clip's ``arch``, in state-dict order.

    ``layers`` keeps only the first ``layers`` residual blocks.
    """
    if arch not in ARCHS:
        raise ConfigError(f"unknown synthetic architecture {arch!r}; choose one of {', '.join([*ARCHS, *LLM_ARCHS])}.")
    cfg = ARCHS[arch]
    depth = cfg["layers"] if layers is None else layers
    if not 0 <= depth <= cfg["layers"]:
        raise ConfigError(f"layers must be between 0 and {cfg['layers']} for {arch}, got {layers}.")
    w, p = cfg["width"], cfg["patch"]
    grid = cfg["image"] // p
    out: list[tuple[str, tuple[int, ...]]] = [
        ("visual.class_embedding", (w,)),
        ("visual.positional_embedding", (grid * grid + 1, w)),
        ("visual.proj", (w, cfg["embed"])),
        ("visual.conv1.weight", (w, 3, p, p)),
        ("visual.ln_pre.weight", (w,)),
        ("visual.ln_pre.bias", (w,)),
    ]
    for i in range(depth):
        b = f"visual.transformer.resblocks.{i}."
        out += [
            (b + "ln_1.weight", (w,)),
            (b + "ln_1.bias", (w,)),
            (b + "attn.in_proj_weight", (3 * w, w)),
            (b + "attn.in_proj_bias", (3 * w,)),
            (b + "attn.out_proj.weight", (w, w)),
            (b + "attn.out_proj.bias", (w,)),
            (b + "ln_2.weight", (w,)),
            (b + "ln_2.bias", (w,)),
            (b + "mlp.c_fc.weight", (4 * w, w)),
            (b + "mlp.c_fc.bias", (4 * w,)),
            (b + "mlp.c_proj.weight", (w, 4 * w)),
            (b + "mlp.c_proj.bias", (w,)),
        ]
    out += [("visual.ln_post.weight", (w,)), ("visual.ln_post.bias", (w,))]
    return out


def _generator(seed: int, model_index: int, name: str) -> torch.Generator:
    """A torch RNG for one (model, tensor) pair, independent of every other pair."""
    ss = np.random.SeedSequence([seed, model_index, zlib.crc32(name.encode())])
    return torch.Generator().manual_seed(int(ss.generate_state(1, np.uint64)[0] >> 1))


def _base_tensor(name: str, shape: tuple[int, ...], width: int, seed: int) -> torch.Tensor:
    z = torch.randn(shape, generator=_generator(seed, 0, name))
    if ".ln_" in name:
        return 1.0 + 0.05 * z if name.endswith(".weight") else 0.02 * z
    if name in ("visual.class_embedding", "visual.positional_embedding", "visual.proj"):
        return z * width**-0.5
    return 0.02 * z


def _task_vector(name: str, shape: tuple[int, ...], task_index: int, seed: int) -> torch.Tensor:
    g = _generator(seed, task_index, name)
    params = torch.rand(3, generator=g, dtype=torch.float64).tolist()
    # log-normal scale: exp(0.7 * N(0,1)) with N(0,1) by Box-Muller from two uniforms
    normal = float(np.sqrt(-2.0 * np.log(max(params[0], 1e-300))) * np.cos(2 * np.pi * params[1]))
    scale = TAU_MEDIAN_SCALE * float(np.exp(0.7 * normal))
    zero_frac = 0.1 + 0.5 * params[2] / 0.25 if params[2] < 0.25 else 0.0
    # Student-t(3) = Z / sqrt(chi2(3)/3), chi2(3) = 2 Gamma(3/2) = 2 (Exp(1) + Z'^2/2):
    # three cheap torch draws instead of a slow gamma sampler.
    z = torch.randn(shape, generator=g)
    z2 = torch.randn(shape, generator=g)
    e = torch.rand(shape, generator=g).clamp_(min=1e-12).log_().neg_()
    chi2 = e.mul_(2.0).addcmul_(z2, z2)
    t = z.div_(chi2.div_(TAU_DF).sqrt_())
    t.clamp_(-100.0, 100.0)  # keep the tail heavy but finite
    t.mul_(scale / np.sqrt(TAU_DF / (TAU_DF - 2)))  # unit variance, then the tensor's scale
    if zero_frac:
        t[torch.rand(shape, generator=g) < zero_frac] = 0.0
    return t


def _write_vision_checkpoints(out_dir: str, task_names: list[str], params: dict[str, Any],
                              storage_options: dict[str, Any] | None) -> None:
    """``base.safetensors`` and one file per task, written together tensor by tensor (one tensor in memory)."""
    arch, dtype, seed = params["arch"], params["dtype"], params["seed"]
    st_dtype, torch_dtype = _DTYPES[dtype]
    layout = vision_tower_layout(arch, params["layers"])
    width = ARCHS[arch]["width"]
    st_layout = [(n, s, st_dtype) for n, s in layout]

    def meta(role: str) -> dict[str, str]:
        return {"format": "pt", "tswitch_synth": json.dumps({**params, "role": role})}

    roles = [("base", "base.safetensors")] + [(t, f"{t}.safetensors") for t in task_names]
    opened = (SafetensorsStreamWriter(join_uri(out_dir, f), st_layout, storage_options, meta(r)) for r, f in roles)
    with all_or_none(opened) as writers:
        for tname, shape in layout:
            base = _base_tensor(tname, shape, width, seed).to(torch_dtype)
            writers[0].write(tname, base)
            base32 = base.float()
            for k in range(1, len(task_names) + 1):
                theta = (base32 + _task_vector(tname, shape, k, seed)).to(torch_dtype)
                writers[k].write(tname, theta)
            del base, base32


def synth_zoo(
    arch: str,
    n_tasks: int,
    dtype: str,
    out_dir: str,
    seed: int = 0,
    layers: int | None = None,
    storage_options: dict[str, Any] | None = None,
    name: str | None = None,
    tied: bool | None = None,
    shard_bytes: int | None = None,
) -> str:
    """Write a synthetic zoo to ``out_dir`` (local path or fsspec URL); returns the manifest URI.

    ``arch`` ``llama-1b``, ``llama-8b-embed`` or ``llama-tiny`` writes a
    Llama-shaped zoo of HF checkpoint folders instead (bf16 by default;
    ``tied``, ``shard_bytes``: see :func:`~tswitch_ray.zoo.synth_llm.synth_llm_zoo`).

    Files: ``zoo.yaml``, ``base.safetensors`` and ``task_XX.safetensors``
    (task names ``task_XX``, 1-based). ``arch`` is ``vit-b-32``, ``vit-b-16``
    or ``vit-l-14``; ``dtype`` ``fp16``, ``fp32`` (or ``bf16``); ``layers``
    truncates the depth for fast tests. Memory stays at one tensor whatever
    the zoo size (a 30-task ViT-B/16 fp16 zoo is ~5 GB on disk).
    """
    if arch in LLM_ARCHS:
        extra = {} if shard_bytes is None else {"shard_bytes": shard_bytes}
        return synth_llm_zoo(arch, n_tasks, dtype, out_dir, seed=seed, layers=layers, tied=tied,
                             storage_options=storage_options, name=name, **extra)
    if tied is not None or shard_bytes is not None:
        raise ConfigError(f"tied embeddings and shards are options of the LLM architectures ({', '.join(LLM_ARCHS)}), "
                          f"not of {arch}.")
    if dtype not in _DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r} for a synthetic zoo; choose fp16, fp32 or bf16.")
    if n_tasks < 1:
        raise ConfigError(f"a synthetic zoo needs at least one task, got n_tasks={n_tasks}.")
    digits = max(2, len(str(n_tasks)))
    task_names = [f"task_{i:0{digits}d}" for i in range(1, n_tasks + 1)]
    out_dir = out_dir.rstrip("/") or out_dir
    params = {"arch": arch, "n_tasks": n_tasks, "dtype": dtype, "seed": seed, "layers": layers}
    _write_vision_checkpoints(out_dir, task_names, params, storage_options)
    manifest = {
        "name": name or f"synth-{arch}-{n_tasks}x-{dtype}" + (f"-{layers}l" if layers is not None else ""),
        "base": "base.safetensors",
        "tasks": [{"name": t, "uri": f"{t}.safetensors"} for t in task_names],
    }
    manifest_uri = join_uri(out_dir, "zoo.yaml")
    atomic_write(manifest_uri, yaml.safe_dump(manifest, sort_keys=False).encode(), storage_options)
    return manifest_uri
