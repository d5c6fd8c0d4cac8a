"""The reference rows of a results table: the zoo's checkpoints as they are, nothing merged.

``base`` scores θ0 on every task (the floor); ``individual`` scores each task with
its own fine-tuned checkpoint (the ceiling, at the cost of storing every one).
"""

from __future__ import annotations

from tswitch_ray.methods.registry import MethodInfo, MethodKind, MethodOptions, register
from tswitch_ray.methods.storage import StorageModel, one_model_bytes


def individual_storage(sizes: StorageModel, alpha: float | None, options: MethodOptions, query_bytes: int) -> int:
    """Every fine-tuned checkpoint, one per task."""
    return sizes.n_tasks * sizes.model_bytes


register(MethodInfo(
    name="base", kind=MethodKind.REFERENCE, summary="The pretrained model θ0 on every task.",
    scorer="zoo-base", storage=one_model_bytes,
))
register(MethodInfo(
    name="individual", kind=MethodKind.REFERENCE, summary="Each task's own fine-tuned checkpoint.",
    scorer="zoo-task", storage=individual_storage,
))
