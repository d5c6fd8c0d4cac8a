"""Merging a tensor above the chunk size in row blocks, for the methods whose merge is per element.

Task Arithmetic and weight averaging (``elementwise`` methods: no statistics
rounds, each output element a function of the same element of θ0 and every τ)
give the same bytes from row blocks as from the whole tensor, so a worker holds
N + 1 blocks instead of N + 1 whole tensors. Methods with per-tensor statistics
(EMR's rescalers and elected vector, TIES' top-k trims, ...) sum or select over
the whole tensor in an order the block path cannot reproduce bit for bit, so
they keep the whole-tensor path (docs/ARCHITECTURE.md "Chunked tensors").
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from tswitch_ray.distributed.chunked_build import _block, row_spans
from tswitch_ray.io.checkpoints import TaskVectorSource
from tswitch_ray.switch import task_vector
from tswitch_ray.zoo import Zoo, check_finite


def merges_in_blocks(method: Any, zoo: Zoo, name: str, limit: int | None) -> bool:
    """True when ``method`` merges tensor ``name`` of ``zoo`` in row blocks of ``limit`` elements."""
    if not limit or not getattr(method, "elementwise", False) or method.stat_rounds:
        return False
    if any(isinstance(zoo.tasks[t], TaskVectorSource) for t in zoo.task_names):
        return False  # an adapter's τ (s·B·A) is not read by rows
    return zoo.base.infos()[name].numel > limit


def merge_blocks(method: Any, zoo: Zoo, name: str, limit: int, device: Any, params: Any,
                 check: bool) -> Iterator[Any]:
    """The merged tensor ``name`` as flat blocks in order (one per output model for a per-task method)."""
    for span in row_spans(zoo.base.infos()[name].shape, limit):
        base = _block(zoo.base, name, span).to(device)
        taus = []
        for task in zoo.task_names:
            tau = task_vector(_block(zoo.tasks[task], name, span).to(device), base, name)
            if check:
                check_finite(tau, zoo.tasks[task].uri, name)
            taus.append(tau)
        merged = method.merge_tensor(name, base, taus, params)
        del taus
        yield [m.to(base.dtype) for m in merged] if method.per_task else [merged.to(base.dtype)]
        del base, merged
