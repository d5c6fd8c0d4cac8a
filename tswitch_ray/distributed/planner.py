"""Shard planning: which tensors travel together to one Ray task.

A shard keeps one layer's tensors together (so a worker reads each layer's
byte ranges once per checkpoint) and shards are balanced by bytes. Each shard
carries a memory estimate that the executor passes to Ray as the task's
``memory`` resource, so the scheduler never oversubscribes a node.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from typing import Mapping

from tswitch_ray.zoo import TensorInfo

FLOAT_DTYPES = frozenset({"F32", "F16", "BF16", "F64"})

# Fixed per-task overhead (Python objects, Parquet writer buffers, allocator slack).
TASK_OVERHEAD_BYTES = 96 * 2**20

_LAYER_RE = re.compile(r"^(.*?\.\d+)\.")


def layer_of(name: str) -> str:
    """Layer key of a tensor name: everything up to the first numbered module.

    ``visual.transformer.resblocks.3.attn.in_proj_weight`` -> ``visual.transformer.resblocks.3``;
    names without a numbered module group by their parent module.
    """
    m = _LAYER_RE.match(name)
    if m:
        return m.group(1)
    return name.rsplit(".", 1)[0] if "." in name else name


@dataclass(frozen=True)
class Shard:
    """A group of tensors processed by one task."""

    shard_id: int
    tensors: tuple[str, ...]
    nbytes: int  # stored bytes of these tensors in ONE checkpoint
    max_numel: int  # largest tensor in the shard (bounds the working set)


def switchable(info: TensorInfo) -> bool:
    """Only floating-point tensors have task vectors; others are copied from θ0."""
    return info.dtype in FLOAT_DTYPES


def plan_shards(infos: Mapping[str, TensorInfo], target_bytes: int = 64 * 2**20) -> list[Shard]:
    """Group tensors by layer into shards of about ``target_bytes`` (one checkpoint's bytes).

    Consecutive layers are packed together until the target is reached; a
    layer larger than the target is split between its tensors (a tensor is
    never split). The plan depends only on the names, shapes and dtypes, so it
    is identical across runs and resumes.
    """
    if target_bytes <= 0:
        raise ValueError("target_bytes must be positive")
    layers: dict[str, list[TensorInfo]] = {}
    for info in infos.values():
        if switchable(info):
            layers.setdefault(layer_of(info.name), []).append(info)

    shards: list[Shard] = []
    current: list[TensorInfo] = []

    def flush() -> None:
        if current:
            shards.append(
                Shard(
                    shard_id=len(shards),
                    tensors=tuple(i.name for i in current),
                    nbytes=sum(i.nbytes for i in current),
                    max_numel=max(_numel(i) for i in current),
                )
            )
            current.clear()

    for members in layers.values():
        layer_bytes = sum(i.nbytes for i in members)
        if layer_bytes > target_bytes:
            flush()
            for info in members:
                if current and sum(i.nbytes for i in current) + info.nbytes > target_bytes:
                    flush()
                current.append(info)
            flush()
            continue
        if current and sum(i.nbytes for i in current) + layer_bytes > target_bytes:
            flush()
        current.extend(members)
    flush()
    return shards


def _numel(info: TensorInfo) -> int:
    n = 1
    for d in info.shape:
        n *= d
    return n


def build_memory_bytes(shard: Shard) -> int:
    """Working set of a switch-build task: θ0 and one θt at a time.

    Per element of the largest tensor: fp32 θ0 (4 B), one stored θt (≤ 4 B),
    fp32 τ (4 B), the level byte, two int32 kept-position buffers and one
    dropped-position buffer (12 B), kept signs (1 B) and the window pass's
    pattern scratch (4 B): ≈ 8 fp32 copies, independent of the number of
    tasks because tasks are streamed one after another inside the shard.
    """
    return TASK_OVERHEAD_BYTES + 8 * 4 * shard.max_numel


# Temporaries of writing one switch from its packed mask (artifacts/stream_encoding.py): a block of
# 1 Mi positions as int64, its gaps and their shifts.
ENCODE_BLOCK_BYTES = 32 * 2**20


def chunked_build_memory_bytes(shard: Shard, chunk_numel: int | None, n_alphas: int = 1) -> int:
    """:func:`build_memory_bytes` when tensors above ``chunk_numel`` elements go in row blocks
    (distributed/chunked_build.py).

    Per element of a block, 3.5 fp32 copies: θ0 and θt as read and widened, τ, and the
    histogram keys or the level bytes and kept values (they do not live at once). Per element of
    the whole tensor and α, 1.2 bytes: the packed mask and signs, their byte copies, the encoded
    streams and the Parquet part. Plus the encoder's block temporaries. Fitted to the peaks of
    bench/bench_chunked_memory.py (docs/RESULTS.md §11): 0.74-1.35 x the measured peaks (blocks
    below glibc's mmap threshold stay in the heap, so the peak is not linear in the block).
    """
    if not chunk_numel or shard.max_numel <= chunk_numel:
        return build_memory_bytes(shard)
    per_tensor = n_alphas * int(1.2 * shard.max_numel)
    return TASK_OVERHEAD_BYTES + int(3.5 * 4 * chunk_numel) + ENCODE_BLOCK_BYTES + per_tensor


def merge_memory_bytes(shard: Shard, n_tasks: int) -> int:
    """Working set of a merge task: every task's τ of one tensor at once, plus temporaries."""
    return TASK_OVERHEAD_BYTES + (n_tasks + 5) * 4 * shard.max_numel


def chunked_merge_memory_bytes(shard: Shard, n_tasks: int, chunk_numel: int | None) -> int:
    """:func:`merge_memory_bytes` of a per-element method merging tensors above ``chunk_numel`` elements in
    row blocks (distributed/chunked_merge.py): every task's τ of one block at once."""
    if not chunk_numel or shard.max_numel <= chunk_numel:
        return merge_memory_bytes(shard, n_tasks)
    return TASK_OVERHEAD_BYTES + (n_tasks + 5) * 4 * chunk_numel


def plan_digest(shards: list[Shard]) -> str:
    """Stable digest of a plan (part of the resume key)."""
    payload = json.dumps([asdict(s) for s in shards], sort_keys=True).encode()
    return hashlib.sha256(payload).hexdigest()[:16]
