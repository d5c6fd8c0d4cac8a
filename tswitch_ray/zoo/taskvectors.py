"""τ of one task and tensor, whatever the task's source: θt − θ0 of a dense checkpoint, or the τ
an adapter yields directly (:class:`~tswitch_ray.io.checkpoints.TaskVectorSource`)."""

from __future__ import annotations

import torch

from tswitch_ray.io.checkpoints import CheckpointReader, TaskVectorSource
from tswitch_ray.switch.taskvec import task_vector


def read_task_vector(task: CheckpointReader, name: str, base: torch.Tensor,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """τ of tensor ``name`` of ``task`` in float32 on ``base``'s device (``base``: θ0 of ``name``).

    ``out``: a flat float32 buffer of at least the tensor's size to compute into (the result is a view of it).
    A LoRA adapter's τ is exact (s · B·A in fp32), not θ0 + s · B·A rounded to the stored dtype and back.
    """
    if isinstance(task, TaskVectorSource):
        return task.task_vector(name, base, out=out)
    return task_vector(task.read(name).to(base.device), base, name, out=out)
