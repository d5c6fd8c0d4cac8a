"""Synthetic LLM zoos with the tensor names, shapes and files of Hugging Face Llama checkpoints.

For benchmarks and tests at LLM scale without downloading one:

* every model is a folder as ``LlamaForCausalLM.save_pretrained`` writes it:
  ``config.json`` (a ``LlamaConfig``), safetensors shards
  ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``
  (or one ``model.safetensors``), tensors named and shaped as the model's
  state dict (``model.embed_tokens.weight``,
  ``model.layers.N.self_attn.{q,k,v,o}_proj.weight``,
  ``model.layers.N.mlp.{gate,up,down}_proj.weight``, the two RMSNorms per
  layer, ``model.norm.weight``, and ``lm_head.weight`` unless the embeddings
  are tied, in which case it is absent as in the real files);
* presets: ``llama-1b`` (Llama-3.2-1B's shapes: hidden 2048, 16 layers,
  intermediate 8192, vocabulary 128256, 32 query / 8 key-value heads, tied),
  ``llama-8b-embed`` (Llama-3-8B's shapes, untied, 2 of its 32 layers by
  default: its 128256 × 4096 embedding and head dominate) and ``llama-tiny``
  (hidden 64, 2 layers, for tests); ``layers`` cuts the depth;
* the base is N(0, 0.02) with RMSNorm weights near 1; each task adds a
  fine-tune-like τ: for a matrix, a seeded rank-8 product U·Vᵀ plus a sparse
  (1 %) heavy-tailed part, for a norm a small dense vector, each at a
  per-(task, tensor) log-normal scale around 1e-3; the stored task weight is
  (θ0 + τ) rounded to the dtype (bf16 by default).

Generation streams: one tensor per model at a time, itself generated in row
blocks, so a 128256 × 4096 bf16 embedding needs its bf16 base and one task's
bf16 copy (2 GiB) plus a block, whatever the number of tasks. Every (model,
tensor, block) has its own seed, so a zoo cut with ``layers`` holds exactly the
full zoo's tensors. ``zoo.yaml`` is written last.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import yaml

from tswitch_ray.errors import ConfigError
from tswitch_ray.io.atomic import atomic_write
from tswitch_ray.io.fs import join_uri
from tswitch_ray.io.safetensors import INDEX_FILE, SINGLE_FILE, SafetensorsStreamWriter, all_or_none

# Llama-3 family shapes (the models' config.json); "layers" is the preset's default depth.
LLM_ARCHS: dict[str, dict[str, Any]] = {
    "llama-1b": {"hidden": 2048, "layers": 16, "max_layers": 16, "intermediate": 8192, "vocab": 128256,
                 "heads": 32, "kv_heads": 8, "tied": True, "rope_theta": 500000.0, "bos": 128000, "eos": 128001},
    "llama-8b-embed": {"hidden": 4096, "layers": 2, "max_layers": 32, "intermediate": 14336, "vocab": 128256,
                       "heads": 32, "kv_heads": 8, "tied": False, "rope_theta": 500000.0, "bos": 128000,
                       "eos": 128001},
    "llama-tiny": {"hidden": 64, "layers": 2, "max_layers": 2, "intermediate": 128, "vocab": 256, "heads": 4,
                   "kv_heads": 2, "tied": False, "rope_theta": 10000.0, "bos": 0, "eos": 1},
}
_DTYPES = {"bf16": ("BF16", torch.bfloat16), "fp16": ("F16", torch.float16), "fp32": ("F32", torch.float32)}

TAU_RANK = 8
TAU_MEDIAN_SCALE = 1e-3
SPARSE_FRACTION = 0.01
BLOCK_ELEMENTS = 1 << 22  # 16 MiB of fp32 per generated row block
DEFAULT_SHARD_BYTES = 2 * 2**30


def llm_settings(arch: str, layers: int | None = None, tied: bool | None = None) -> dict[str, Any]:
    """The preset ``arch`` with its depth cut to ``layers`` and its embeddings tied or not (``None``: the preset's)."""
    if arch not in LLM_ARCHS:
        raise ConfigError(f"unknown LLM architecture {arch!r}; choose one of {', '.join(LLM_ARCHS)}.")
    cfg = dict(LLM_ARCHS[arch])
    if layers is not None:
        if not 0 <= layers <= cfg["max_layers"]:
            raise ConfigError(f"layers must be between 0 and {cfg['max_layers']} for {arch}, got {layers}.")
        cfg["layers"] = layers
    if tied is not None:
        cfg["tied"] = tied
    return cfg


def llama_layout(cfg: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor ``LlamaForCausalLM.save_pretrained`` writes, in state-dict order."""
    h, head_dim = cfg["hidden"], cfg["hidden"] // cfg["heads"]
    q, kv, inter = cfg["heads"] * head_dim, cfg["kv_heads"] * head_dim, cfg["intermediate"]
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (cfg["vocab"], h))]
    for i in range(cfg["layers"]):
        b = f"model.layers.{i}."
        out += [
            (b + "self_attn.q_proj.weight", (q, h)),
            (b + "self_attn.k_proj.weight", (kv, h)),
            (b + "self_attn.v_proj.weight", (kv, h)),
            (b + "self_attn.o_proj.weight", (h, q)),
            (b + "mlp.gate_proj.weight", (inter, h)),
            (b + "mlp.up_proj.weight", (inter, h)),
            (b + "mlp.down_proj.weight", (h, inter)),
            (b + "input_layernorm.weight", (h,)),
            (b + "post_attention_layernorm.weight", (h,)),
        ]
    out.append(("model.norm.weight", (h,)))
    if not cfg["tied"]:
        out.append(("lm_head.weight", (cfg["vocab"], h)))
    return out


def llama_config(cfg: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """``config.json`` of the preset, as ``LlamaConfig.to_dict`` spells its fields."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg["hidden"],
        "intermediate_size": cfg["intermediate"],
        "num_hidden_layers": cfg["layers"],
        "num_attention_heads": cfg["heads"],
        "num_key_value_heads": cfg["kv_heads"],
        "head_dim": cfg["hidden"] // cfg["heads"],
        "vocab_size": cfg["vocab"],
        "hidden_act": "silu",
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": cfg["rope_theta"],
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": cfg["tied"],
        "bos_token_id": cfg["bos"],
        "eos_token_id": cfg["eos"],
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def _generator(seed: int, model_index: int, name: str, block: int = 0) -> torch.Generator:
    """A torch RNG for one (model, tensor, row block), independent of every other."""
    ss = np.random.SeedSequence([seed, model_index, zlib.crc32(name.encode()), block])
    return torch.Generator().manual_seed(int(ss.generate_state(1, np.uint64)[0] >> 1))


def _row_blocks(shape: tuple[int, ...]) -> Iterator[tuple[int, int, int]]:
    """(block index, first row, end row) of a tensor generated in blocks of about BLOCK_ELEMENTS."""
    rows = shape[0]
    step = max(1, BLOCK_ELEMENTS // max(1, math.prod(shape[1:])))
    for k, start in enumerate(range(0, rows, step)):
        yield k, start, min(rows, start + step)


def _base_block(name: str, shape: tuple[int, ...], seed: int, block: int, start: int, end: int) -> torch.Tensor:
    z = torch.randn((end - start, *shape[1:]), generator=_generator(seed, 0, name, block))
    return 1.0 + 0.05 * z if name.endswith("norm.weight") else 0.02 * z


class _TaskDelta:
    """τ of one (task, tensor): rank-8 U·Vᵀ + sparse heavy-tailed entries (matrices) or dense (vectors)."""

    def __init__(self, name: str, shape: tuple[int, ...], task: int, seed: int) -> None:
        self.name, self.shape, self.task, self.seed = name, shape, task, seed
        g = _generator(seed, task, name, 0)
        u1, u2 = torch.rand(2, generator=g, dtype=torch.float64).tolist()
        normal = math.sqrt(-2.0 * math.log(max(u1, 1e-300))) * math.cos(2 * math.pi * u2)  # Box-Muller
        self.scale = TAU_MEDIAN_SCALE * math.exp(0.7 * normal)
        if len(shape) == 2:
            self.u = torch.randn(shape[0], TAU_RANK, generator=g)
            self.v = torch.randn(shape[1], TAU_RANK, generator=g) * (self.scale / math.sqrt(TAU_RANK))

    def block(self, block: int, start: int, end: int) -> torch.Tensor:
        g = _generator(self.seed, self.task, self.name, block + 1)  # 0 seeds the factors
        rows = (end - start, *self.shape[1:])
        if len(self.shape) != 2:
            return torch.randn(rows, generator=g) * self.scale
        tau = self.u[start:end] @ self.v.T
        hit = torch.rand(rows, generator=g) < SPARSE_FRACTION
        # Student-t(3)-like tail: a normal over the root of an Exp(1), clamped finite.
        tail = torch.randn(rows, generator=g) / torch.rand(rows, generator=g).clamp_(min=1e-6).log_().neg_().sqrt_()
        tau += hit * tail.clamp_(-50.0, 50.0) * (3.0 * self.scale)
        return tau


def _shards(layout: list[tuple[str, tuple[int, ...]]], itemsize: int, shard_bytes: int
            ) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Tensors packed in order into shards of at most ``shard_bytes`` (a larger tensor gets its own), as HF does."""
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in layout:
        nbytes = math.prod(shape) * itemsize
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += nbytes
    return groups


def _shard_file(i: int, n: int) -> str:
    return SINGLE_FILE if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"


def _write_shard(group: list[tuple[str, tuple[int, ...]]], uris: list[str], dtype: tuple[str, torch.dtype],
                 seed: int, storage_options: dict[str, Any] | None, meta: dict[str, str]) -> None:
    """One shard of the base and of every task, tensor by tensor, block by block."""
    st_dtype, torch_dtype = dtype
    layout = [(n, s, st_dtype) for n, s in group]
    opened = (SafetensorsStreamWriter(uri, layout, storage_options, meta) for uri in uris)
    with all_or_none(opened) as writers:
        for name, shape in group:
            base = torch.empty(shape, dtype=torch_dtype)
            for k, a, b in _row_blocks(shape):
                base[a:b] = _base_block(name, shape, seed, k, a, b)
            writers[0].write(name, base)
            theta = torch.empty_like(base)
            for task in range(1, len(uris)):
                delta = _TaskDelta(name, shape, task, seed)
                for k, a, b in _row_blocks(shape):
                    theta[a:b] = delta.block(k, a, b).add_(base[a:b])
                writers[task].write(name, theta)
            del base, theta


def synth_llm_zoo(arch: str, n_tasks: int, dtype: str, out_dir: str, seed: int = 0, layers: int | None = None,
                  tied: bool | None = None, shard_bytes: int = DEFAULT_SHARD_BYTES,
                  storage_options: dict[str, Any] | None = None, name: str | None = None) -> str:
    """Write a synthetic Llama-shaped zoo to ``out_dir``; returns the manifest URI.

    Folders ``base/`` and ``task_XX/`` (HF checkpoint folders, sharded at
    ``shard_bytes``), then ``zoo.yaml``. See the module docstring.
    """
    if dtype not in _DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r} for a synthetic LLM zoo; choose bf16, fp16 or fp32.")
    if n_tasks < 1:
        raise ConfigError(f"a synthetic zoo needs at least one task, got n_tasks={n_tasks}.")
    if shard_bytes <= 0:
        raise ConfigError(f"the shard size must be positive, got {shard_bytes}.")
    cfg = llm_settings(arch, layers, tied)
    layout = llama_layout(cfg)
    digits = max(2, len(str(n_tasks)))
    models = ["base"] + [f"task_{i:0{digits}d}" for i in range(1, n_tasks + 1)]
    out_dir = out_dir.rstrip("/") or out_dir
    torch_dtype = _DTYPES[dtype][1]
    groups = _shards(layout, torch.empty((), dtype=torch_dtype).element_size(), shard_bytes)
    params = json.dumps({"arch": arch, "n_tasks": n_tasks, "dtype": dtype, "seed": seed, "layers": cfg["layers"],
                         "tied": cfg["tied"]})
    meta = {"format": "pt", "tswitch_synth": params}
    for i, group in enumerate(groups, start=1):
        uris = [join_uri(out_dir, f"{m}/{_shard_file(i, len(groups))}") for m in models]
        _write_shard(group, uris, _DTYPES[dtype], seed, storage_options, meta)
    config = json.dumps(llama_config(cfg, torch_dtype), indent=2).encode()
    for m in models:
        atomic_write(join_uri(out_dir, f"{m}/config.json"), config, storage_options)
        if len(groups) > 1:
            atomic_write(join_uri(out_dir, f"{m}/{INDEX_FILE}"), _index(groups, torch_dtype), storage_options)
    manifest = {
        "name": name or f"synth-{arch}-{n_tasks}x-{dtype}-{cfg['layers']}l",
        "base": "base",
        "tasks": [{"name": t, "uri": t} for t in models[1:]],
    }
    manifest_uri = join_uri(out_dir, "zoo.yaml")
    atomic_write(manifest_uri, yaml.safe_dump(manifest, sort_keys=False).encode(), storage_options)
    return manifest_uri


def _index(groups: list[list[tuple[str, tuple[int, ...]]]], dtype: torch.dtype) -> bytes:
    itemsize = torch.empty((), dtype=dtype).element_size()
    weight_map = {n: _shard_file(i, len(groups)) for i, g in enumerate(groups, start=1) for n, _ in g}
    total = sum(math.prod(s) * itemsize for g in groups for _, s in g)
    return json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2).encode()
