"""Rebuilding weights from a task switch: docs/MATH.md "Reconstruction" (paper 000 eqs. 5 and 7)."""

from __future__ import annotations

import numpy as np
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


def _kernel_view(t: torch.Tensor) -> np.ndarray | None:
    """A flat NumPy view of a contiguous CPU fp32 or bf16 tensor (bf16 as its uint16 bits); None otherwise."""
    if t.device.type != "cpu" or not t.is_contiguous() or t.dtype not in (torch.float32, torch.bfloat16):
        return None
    flat = t.detach().reshape(-1)
    return flat.numpy() if t.dtype == torch.float32 else flat.view(torch.int16).numpy().view(np.uint16)


def _planes_on(device: torch.device, numel: int, positions: np.ndarray, signs: np.ndarray, kept: int,
               inverted: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat (mask, positive) built on ``device`` from the coded positions: only those and the signs travel."""
    pos = torch.from_numpy(positions).to(device)
    mask = torch.zeros(numel, dtype=torch.bool, device=device)
    mask[pos] = True
    if inverted:
        mask = ~mask
    bits = torch.from_numpy(np.unpackbits(signs, count=kept).view(bool)).to(device)
    positive = torch.zeros(numel, dtype=torch.bool, device=device)
    positive[torch.nonzero(mask).flatten() if inverted else pos] = bits
    return mask, positive


def reconstruct_into(theta_0: torch.Tensor, positions: np.ndarray, signs: np.ndarray, kept: int, inverted: bool,
                     knob: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`reconstruct` (θt ≈ θ0 + λ·Mt⊙St, paper 000 eq. 7) from a switch's compact form, the same bytes.

    docs/MATH.md "Reconstruction" (paper 000 eq. 7).

    ``positions`` are the ascending flat indices of the kept elements (of the
    dropped ones when ``inverted``), ``signs`` the packed sign bits of the
    kept elements (MSB first, 1 = positive), as the switch codec decodes them.
    Written into ``out`` (θ0's shape and dtype; may be ``theta_0`` itself),
    else into a new tensor. A contiguous fp32 tensor on the CPU, or bf16 into
    a separate ``out``, takes one compiled pass; any other dtype or device
    builds the boolean planes there and takes :func:`reconstruct`.
    """
    numel = theta_0.numel()
    if positions.size > numel or (positions.size and int(positions[-1]) >= numel) or kept > numel:
        raise ArtifactError(
            f"switch with {positions.size} coded positions up to {int(positions[-1]) if positions.size else -1} "
            f"does not fit the base tensor of shape {tuple(theta_0.shape)}; the artifacts were built for another "
            "base model."
        )
    if out is None:
        out = torch.empty_like(theta_0, memory_format=torch.contiguous_format)
    elif out.shape != theta_0.shape or out.dtype != theta_0.dtype or out.device != theta_0.device:
        raise ValueError(f"out must have θ0's shape, dtype and device {tuple(theta_0.shape)}, {theta_0.dtype}, "
                         f"{theta_0.device}; got {tuple(out.shape)}, {out.dtype}, {out.device}")
    src, dst = _kernel_view(theta_0), _kernel_view(out)
    if src is not None and dst is not None:
        from tswitch_ray.switch import _apply_kernels as ak  # numba compiles on first use, not at import

        if theta_0.dtype == torch.float32:
            ak.apply_f32(src, positions, signs, bool(inverted), np.float32(knob), dst)
            return out
        if out.data_ptr() != theta_0.data_ptr() and not ak.apply_bf16(src, positions, signs, bool(inverted),
                                                                       np.float32(knob), dst):
            return out  # in place, a NaN redo would have lost θ0: bf16 in place takes the tensor path
    mask, positive = _planes_on(theta_0.device, numel, positions, signs, kept, inverted)
    with torch.no_grad():
        out.copy_(reconstruct(theta_0, mask.reshape(theta_0.shape), positive.reshape(theta_0.shape), knob))
    return out
