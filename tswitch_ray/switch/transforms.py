"""Task-vector transforms: P-Discard, Bin-Discard (paper 000) and DARE."""

from __future__ import annotations

import torch

from tswitch_ray.errors import ConfigError
from tswitch_ray.switch.binarize import KnobMode, binarize, kept_stats, knob
from tswitch_ray.switch.reconstruct import switch_delta
from tswitch_ray.switch.thresholds import Thresholds


def p_discard(tau: torch.Tensor, th: Thresholds) -> torch.Tensor:
    """P-Discard, paper 000 eq. (3): τ where kept (τ > t⁺ or −τ > t⁻), else 0; float32.

    docs/MATH.md "Thresholds (P-Discard cut)" (paper 000 eq. 3).
    """
    mask, _ = binarize(tau, th)
    t = tau if tau.dtype == torch.float32 else tau.to(torch.float32)
    return torch.where(mask, t, torch.zeros((), dtype=torch.float32, device=t.device))


def bin_discard(tau: torch.Tensor, th: Thresholds, knob_mode: KnobMode | str = "rms") -> torch.Tensor:
    """Bin-Discard, paper 000 eqs. (5)–(6): λ · M ⊙ S with λ from this tensor's kept entries; float32.

    docs/MATH.md "Switches and knobs" (paper 000 eqs. 5–6).
    """
    mask, positive = binarize(tau, th)
    return switch_delta(mask, positive, knob(kept_stats(tau, mask), knob_mode))


def dare(tau: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """DARE (Yu et al. 2024, the random baseline of paper 000 Sec. 3.2): τ · Bernoulli(1−p) / (1−p).

    docs/MATH.md "DARE" (DARE paper, the definition of Drop And REscale).

    Each entry is dropped with probability ``p`` and survivors are rescaled
    so the expectation is τ. Draws come from a ``torch.Generator`` seeded with
    ``seed`` on τ's device: identical across runs on the same device type
    (CPU and CUDA generators give different streams). Returns float32.
    """
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0.0 <= float(p) < 1.0):
        raise ConfigError(
            f"DARE drop probability p={p!r} is outside [0, 1); use e.g. 0.5 or 0.9 "
            "(p=1 would drop every entry)."
        )
    t = tau if tau.dtype == torch.float32 else tau.to(torch.float32)
    gen = torch.Generator(device=t.device)
    gen.manual_seed(int(seed))
    out = torch.empty_like(t, dtype=torch.float32)
    out.bernoulli_(1.0 - float(p), generator=gen)
    out.mul_(t)
    out.div_(1.0 - float(p))
    return out
