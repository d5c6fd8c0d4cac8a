"""The build's passes over a tensor above the chunk size, in row blocks (docs/ARCHITECTURE.md "Chunked tensors").

A tensor of more than ``chunk_numel`` elements is never held whole: each pass
reads θ0 and θt of one block of whole rows (byte ranges of the checkpoints),
computes that block's τ = θt[rows] − θ0[rows] and hands it to the block-wise
math of :mod:`tswitch_ray.switch.chunked`, whose thresholds, masks, signs and
knobs equal the whole-tensor ones bit for bit. Per (tensor, task) a worker
holds one block's θ0, θt and τ and, per α, the packed mask and signs (1 bit
per element each), so its peak no longer grows with the tensor: see
:func:`tswitch_ray.distributed.planner.chunked_build_memory_bytes`.

Scope "tensor" reads a ~1/32 sample, then each block twice (histograms with
the in-window patterns, then encode; three times in the rare case that the
sample's window misses a rank), where the unchunked path reads the tensor
once: the price of the bound. An adapter task's τ (s·B·A)
is not read by rows: its tensors take the whole-tensor path.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import torch

from tswitch_ray.artifacts.stream_encoding import encode_packed
from tswitch_ray.io.checkpoints import (
    CheckpointReader,
    TaskVectorSource,
    dtype_to_torch,
)
from tswitch_ray.switch import task_vector
from tswitch_ray.switch.binarize import KeptStats
from tswitch_ray.switch.chunked import BlockSwitches, BlockThresholds
from tswitch_ray.switch.thresholds import (
    Thresholds,
    WindowPass,
    covers,
    refine_request,
    resolve_thresholds,
    signed_histograms,
    window_request,
)
from tswitch_ray.zoo import Zoo


def chunk_numel(chunk_bytes: int | None) -> int | None:
    """Elements of one block: ``chunk_bytes`` of fp32 τ (None: no chunking)."""
    return None if not chunk_bytes else max(1, int(chunk_bytes) // 4)


def is_chunked(zoo: Zoo, task: str, name: str, limit: int | None) -> bool:
    """True when tensor ``name`` of ``task`` is processed in row blocks."""
    if limit is None or sys.byteorder != "little":  # the range readers return little-endian bytes
        return False
    if isinstance(zoo.tasks[task], TaskVectorSource):
        return False
    return zoo.base.infos()[name].numel > limit


def row_spans(shape: tuple[int, ...], limit: int) -> list[tuple[int, int]]:
    """Flat element ranges [a, b) of blocks of whole rows of at most ``limit`` elements (one row when a
    single row is larger)."""
    numel = 1
    for d in shape:
        numel *= int(d)
    row = numel // int(shape[0]) if shape and shape[0] else numel
    step = max(1, limit // max(row, 1)) * max(row, 1)
    return [(a, min(a + step, numel)) for a in range(0, numel, step)]


def _block(reader: CheckpointReader, name: str, span: tuple[int, int]) -> torch.Tensor:
    dtype = dtype_to_torch(reader.infos()[name].dtype)
    size = torch.empty((), dtype=dtype).element_size()
    return torch.frombuffer(bytearray(reader.read_range(name, span[0] * size, span[1] * size)), dtype=dtype)


def tau_blocks(zoo: Zoo, task: str, name: str, limit: int, device: Any) -> Iterator[torch.Tensor]:
    """τ of ``task`` and ``name`` as flat float32 blocks of whole rows, in order; each valid until the next."""
    buf = torch.empty(0, dtype=torch.float32, device=device)
    for span in row_spans(zoo.base.infos()[name].shape, limit):
        base = _block(zoo.base, name, span).to(device)
        # As the whole-tensor path (build._read_base): fp16/bf16 θ0 widened to fp32, fp64 kept.
        if base.dtype in (torch.float16, torch.bfloat16):
            base = base.to(torch.float32)
        if buf.numel() < base.numel():
            buf = torch.empty(base.numel(), dtype=torch.float32, device=device)
        yield task_vector(_block(zoo.tasks[task], name, span).to(device), base, name, out=buf)
        del base


# Sample of a chunked tensor (chunked_thresholds): SAMPLE_SPANS evenly spaced ranges of 1/SAMPLE_DIVISOR
# of its elements each, so the window pass below reads ~1/32 more instead of a whole second pass.
SAMPLE_SPANS = 4
SAMPLE_DIVISOR = 128


def _sample(zoo: Zoo, task: str, name: str, device: Any) -> torch.Tensor:
    numel = zoo.base.infos()[name].numel
    size, step = max(1, numel // SAMPLE_DIVISOR), numel // SAMPLE_SPANS
    parts = []
    for i in range(SAMPLE_SPANS):
        span = (i * step, min(i * step + size, numel))
        base = _block(zoo.base, name, span).to(device)
        parts.append(task_vector(_block(zoo.tasks[task], name, span).to(device), base, name))
    return torch.cat(parts)


def chunked_thresholds(zoo: Zoo, task: str, name: str, alphas: list[float], cut: str, limit: int, device: Any,
                       label: str) -> list[Thresholds]:
    """:func:`tswitch_ray.switch.tensor_thresholds` of one tensor, from its τ in row blocks.

    As scope "model" does over shards (:func:`tswitch_ray.switch.thresholds.window_request`, Floyd &
    Rivest): a ~1/32 sample predicts the buckets that hold the wanted ranks, one pass over the blocks
    counts the coarse histograms and keeps the in-window bit patterns, and when the window holds every
    rank (checked) the thresholds are resolved from them; else a fine-histogram pass over the blocks.
    """
    window = window_request(signed_histograms(_sample(zoo, task, name, device)), alphas)
    scan = WindowPass(window)
    for tau in tau_blocks(zoo, task, name, limit, device):
        scan.add(tau, label)
    hist, picked = scan.result()
    need = refine_request(hist, alphas, cut)
    if covers(window, need):
        return resolve_thresholds(hist, picked.fine(need), alphas, cut)
    acc = BlockThresholds(alphas, cut, label)
    acc.hist = hist
    for tau in tau_blocks(zoo, task, name, limit, device):
        acc.add_fine(tau)
    return acc.result()


def chunked_switches(zoo: Zoo, task: str, name: str, ths: list[Thresholds], limit: int,
                     device: Any) -> list[tuple[KeptStats, Any]]:
    """Per threshold of ``ths``: (kept statistics, encoded switch) of one tensor, from τ in row blocks;
    the same as :func:`~tswitch_ray.switch.binarize.kept_switches` and
    :func:`~tswitch_ray.artifacts.encoding.encode_kept` on the whole tensor."""
    numel = zoo.base.infos()[name].numel
    acc = BlockSwitches(numel, ths)
    for tau in tau_blocks(zoo, task, name, limit, device):
        acc.add(tau)
    return [(sw.stats, encode_packed(numel, sw.kept, sw.mask_bits, sw.sign_bits)) for sw in acc.result()]
