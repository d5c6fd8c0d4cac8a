"""Task vectors: the difference between a fine-tuned and the pretrained weights."""

from __future__ import annotations

import math

import torch

from tswitch_ray.errors import ZooError


def task_vector(theta_t: torch.Tensor, theta_0: torch.Tensor, name: str | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """τt = θt − θ0, computed and returned in float32.

    docs/MATH.md "Task vectors" (paper 000 Sec. 3.1; paper 002 eq. 2): Task
    Arithmetic's task vector (Ilharco et al.), as used by paper 000. The
    inputs may be stored as fp32, fp16 or bf16; both are widened to fp32
    (exact) before the single rounded subtraction, so the result does not
    depend on the storage dtype beyond the stored values themselves.

    ``name`` is only used in error messages. Neither input is modified.
    ``out``: a flat float32 buffer of at least ``theta_t.numel()`` elements on
    the same device to compute into (the result is a view of it): a loop over
    many tensors then reuses one buffer, where a fresh multi-megabyte tensor
    each time measured twice as slow (page faults).
    """
    label = name or "<unnamed tensor>"
    if theta_t.shape != theta_0.shape:
        raise ZooError(
            f"tensor {label!r}: the fine-tuned checkpoint has shape {tuple(theta_t.shape)} but the "
            f"base has {tuple(theta_0.shape)}; a task vector needs both models to share the "
            "architecture, so check that the task checkpoint was fine-tuned from this base."
        )
    if not (theta_t.is_floating_point() and theta_0.is_floating_point()):
        raise ZooError(
            f"tensor {label!r}: task vectors need floating-point weights, got {theta_t.dtype} "
            f"(task) and {theta_0.dtype} (base); exclude integer buffers from the zoo with "
            "'exclude:' globs."
        )
    if out is not None:
        out = out[: theta_t.numel()].view(theta_t.shape)
        out.copy_(theta_t)
        out.sub_(theta_0)
        return out
    # copy=True: for an fp32 input .to() would otherwise alias it and sub_ would
    # overwrite the caller's checkpoint tensor.
    out = theta_t.to(torch.float32, copy=True)
    # sub_ widens theta_0 to fp32 on the fly (exact), so no second temporary.
    out.sub_(theta_0)
    return out


def lora_task_vector(lora_a: torch.Tensor, lora_b: torch.Tensor, alpha: float, use_rslora: bool = False,
                     transpose: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """τ = s · B·A of one LoRA-adapted weight, computed and returned in float32.

    docs/MATH.md "LoRA task vectors" (Hu et al., LoRA, eq. 3 and Sec. 4.1; rsLoRA,
    Kalajdzievski 2023): ``lora_a`` is A (r × in), ``lora_b`` is B (out × r), r = A's rows, and
    the scaling s = α/r, or α/√r with rsLoRA: the update peft's
    ``merge_and_unload`` adds to the base weight, kept in fp32 instead of being
    rounded into the weight's dtype. ``transpose``: the weight is stored (in ×
    out), as GPT-2's Conv1D (peft's ``fan_in_fan_out``) and embeddings are.
    ``out``: a flat float32 buffer of at least τ's size to compute into (the
    result is a view of it).
    """
    rank = lora_a.shape[0]
    if lora_a.dim() != 2 or lora_b.dim() != 2 or lora_b.shape[1] != rank or rank == 0:
        raise ZooError(
            f"LoRA factors of shapes A {tuple(lora_a.shape)} and B {tuple(lora_b.shape)} do not form a "
            "rank-r update B·A (A must be r × in, B out × r, both 2-D)."
        )
    scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
    # Same order as peft's get_delta_weight: (B·A), then × s.
    delta = lora_b.to(torch.float32) @ lora_a.to(torch.float32)
    if transpose:
        delta = delta.T
    if out is None:
        return delta.mul_(scaling).contiguous()
    view = out[: delta.numel()].view(delta.shape)
    torch.mul(delta, scaling, out=view)
    return view
