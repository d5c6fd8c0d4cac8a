"""Rebuilding weights from a task switch: docs/MATH.md "Reconstruction" (paper 000 eqs. 5 and 7)."""

from __future__ import annotations

import torch

from tswitch_ray.errors import ArtifactError


def switch_delta(mask: torch.Tensor, positive: torch.Tensor, knob: float) -> torch.Tensor:
    """The binarized task vector λ · M ⊙ S of paper 000 eq. (5), float32.

    docs/MATH.md "Reconstruction" (paper 000 eq. 5).

    Entries are +λ where kept and positive, −λ where kept and not positive,
    0 elsewhere, with λ rounded once to float32.
    """
    if mask.shape != positive.shape:
        raise ArtifactError(
            f"switch mask has shape {tuple(mask.shape)} but its sign plane has "
            f"{tuple(positive.shape)}; the switch artifact is corrupt."
        )
    lam = torch.tensor(float(knob), dtype=torch.float32, device=mask.device)
    delta = torch.where(positive, lam, -lam)
    delta.mul_(mask)  # ±λ·1 or ±λ·0: exact
    return delta


def reconstruct(
    theta_0: torch.Tensor, mask: torch.Tensor, positive: torch.Tensor, knob: float
) -> torch.Tensor:
    """θt ≈ θ0 + λ · Mt ⊙ St (paper 000 eq. 7), computed in fp32, returned in θ0's dtype.

    docs/MATH.md "Reconstruction" (paper 000 eq. 7).

    ``mask`` and ``positive`` must have θ0's shape; ``theta_0`` is not modified.
    """
    if mask.shape != theta_0.shape:
        raise ArtifactError(
            f"switch of shape {tuple(mask.shape)} does not fit the base tensor of shape "
            f"{tuple(theta_0.shape)}; the artifacts were built for another base model."
        )
    out = switch_delta(mask, positive, knob)
    out.add_(theta_0)  # widens θ0 to fp32 on the fly; one rounding, as θ0 + δ in fp32
    return out.to(theta_0.dtype)
