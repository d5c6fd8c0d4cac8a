"""Rebuilding weights from a task switch: docs/MATH.md "Reconstruction" (paper 000 eqs. 5 and 7)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

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


class SwitchPositions(Protocol):
    """A switch's compact form, as the codec decodes it (:class:`tswitch_ray.artifacts.encoding.SwitchPositions`)."""

    numel: int
    kept: int
    inverted: bool
    signs: np.ndarray  # packed sign bits of the kept elements, MSB first, 1 = positive

    def blocks(self) -> Iterator[np.ndarray]: ...  # ascending coded positions (kept, or dropped if inverted)

    def positions_on(self, device: torch.device) -> torch.Tensor: ...  # all of them, as a tensor on device


def _planes_on(device: torch.device, sw: SwitchPositions) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat (mask, positive) built on ``device`` from the coded positions (decoded there off the CPU)."""
    pos = sw.positions_on(device)
    mask = torch.zeros(sw.numel, dtype=torch.bool, device=device)
    mask[pos] = True
    if sw.inverted:
        mask = ~mask
    bits = torch.from_numpy(np.unpackbits(sw.signs, count=sw.kept).view(bool)).to(device)
    positive = torch.zeros(sw.numel, dtype=torch.bool, device=device)
    positive[torch.nonzero(mask).flatten() if sw.inverted else pos] = bits
    return mask, positive


def _apply_compiled(src: np.ndarray, dst: np.ndarray, sw: SwitchPositions, knob: float, bf16: bool) -> int:
    """One pass of the compiled kernels over the position blocks; returns the NaN sums (bf16 only, else 0)."""
    from tswitch_ray.switch import _apply_kernels as ak  # numba compiles on first use, not at import

    lam, signs, nans = np.float32(knob), sw.signs, 0
    if not sw.inverted:
        if dst is not src:
            np.copyto(dst, src)  # θ0 everywhere, then the kept elements
        kernel, j = (ak.kept_bf16 if bf16 else ak.kept_f32), 0
        for block in sw.blocks():
            nans += kernel(src, block, j, signs, lam, dst) or 0
            j += block.size
        return nans
    between = ak.between_bf16 if bf16 else ak.between_f32
    prev, j = -1, 0
    for block in sw.blocks():
        res = between(src, block, prev, j, signs, lam, dst, 0)
        prev, j, nans = res[0], res[1], nans + (res[2] if bf16 else 0)
    res = between(src, np.empty(0, np.int64), prev, j, signs, lam, dst, sw.numel)  # the kept run after the last
    return nans + (res[2] if bf16 else 0)


def reconstruct_into(theta_0: torch.Tensor, sw: SwitchPositions, knob: float,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`reconstruct` (θt ≈ θ0 + λ·Mt⊙St, paper 000 eq. 7) from a switch's compact form, the same bytes.

    docs/MATH.md "Reconstruction" (paper 000 eq. 7).

    Written into ``out`` (θ0's shape, dtype and device; may be ``theta_0``
    itself), else into a new tensor. A contiguous fp32 or bf16 tensor on the
    CPU takes the compiled kernels (θ0 copied, then the kept elements summed;
    for inverted switches one interleaved pass); any other dtype or device
    builds the boolean planes there and takes :func:`reconstruct`.
    """
    if sw.numel != theta_0.numel():
        raise ArtifactError(
            f"switch of {sw.numel} elements does not fit the base tensor of shape {tuple(theta_0.shape)}; "
            "the artifacts were built for another base model."
        )
    if out is None:
        out = torch.empty_like(theta_0, memory_format=torch.contiguous_format)
    elif out.shape != theta_0.shape or out.dtype != theta_0.dtype or out.device != theta_0.device:
        raise ValueError(f"out must have θ0's shape, dtype and device {tuple(theta_0.shape)}, {theta_0.dtype}, "
                         f"{theta_0.device}; got {tuple(out.shape)}, {out.dtype}, {out.device}")
    src, dst = _kernel_view(theta_0), _kernel_view(out)
    in_place = out.data_ptr() == theta_0.data_ptr()
    if src is not None and dst is not None and not (in_place and theta_0.dtype == torch.bfloat16):
        if in_place:
            dst = src
        # bf16 in place is excluded above: a NaN redo needs θ0 intact.
        if not _apply_compiled(src, dst, sw, knob, theta_0.dtype == torch.bfloat16):
            return out
    mask, positive = _planes_on(theta_0.device, sw)
    with torch.no_grad():
        out.copy_(reconstruct(theta_0, mask.reshape(theta_0.shape), positive.reshape(theta_0.shape), knob))
    return out
