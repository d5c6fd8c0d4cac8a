"""Which convention explains each difference between mergekit's TIES and ours, on one tensor of a zoo.

Run with the Python of the venv bench_vs_anchors.py made for mergekit (it imports mergekit's own
``sparsify.magnitude`` and ``get_mask``):

    ~/.cache/tswitch-bench/venvs/mergekit-0.1.5/bin/python bench/ties_conventions_vs_mergekit.py \
        ZOO_DIR OURS.safetensors THEIRS_DIR TENSOR [--k 20 --scale 0.3]

Steps, each changing one convention, each compared with the previous one (entries that differ):

1. mergekit's merge_group rebuilt from its functions in the checkpoint dtype (fp16): must equal its file;
2. the same in fp32, rounded once at the end: the fp16 arithmetic's share;
3. the trim keeps every entry with |τ| ≥ the cut value (ties at the cut kept, rank d − int(d·k/100), ours and
   the TIES reference) instead of exactly max(1, int(k·n)) by argsort: the trim convention's share;
4. where the trimmed sum is exactly 0, the sign is the model-wide majority (ours) instead of +1 (mergekit's
   ``sum >= 0``); printed: how many such entries there are;
and step 4 compared with our file. ``--method ta``: step 1, step 2, and step 2 against our file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from mergekit.merge_methods.generalized_task_arithmetic import get_mask
from mergekit.sparsify import magnitude
from safetensors import safe_open


def tensor(folder: Path, name: str) -> torch.Tensor:
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            if name in h.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                return h.get_tensor(name)
    raise KeyError(name)


def mergekit_ties(base: torch.Tensor, thetas: list[torch.Tensor], k: float, scale: float,
                  trim: str = "argsort", zero_sign: float = 1.0) -> torch.Tensor:
    """mergekit 0.1.5 merge_group for TIES (weight 1, normalize, lambda = scale) in base's dtype."""
    deltas = torch.stack([t - base for t in thetas])
    for i in range(len(deltas)):
        if trim == "argsort":
            deltas[i] = magnitude(deltas[i], density=k / 100.0)
        else:  # ties at the cut kept: |τ| ≥ the r-th smallest |τ|, r = d − int(d·k/100)
            a = deltas[i].abs().float().reshape(-1)
            r = a.numel() - int(a.numel() * (k / 100.0))
            if r > 0:
                cut = torch.kthvalue(a, r).values
                deltas[i] = torch.where(deltas[i].abs().float() >= cut, deltas[i], 0)
    mask = get_mask(deltas, method="sum", mask_dtype=base.dtype)
    if zero_sign != 1.0:
        total = deltas.sum(dim=0)
        sign = deltas.sign().to(base.dtype)
        mask = torch.where(total == 0, sign == zero_sign, mask.bool()).to(base.dtype)
    mixed = (deltas * mask).sum(dim=0)
    divisor = mask.sum(dim=0)
    divisor[divisor == 0] = 1
    return (base + mixed / divisor * scale).to(base.dtype)


def mergekit_ta(base: torch.Tensor, thetas: list[torch.Tensor], scale: float) -> torch.Tensor:
    """mergekit 0.1.5 merge_group for task_arithmetic (weight = scale, no normalisation) in base's dtype."""
    deltas = torch.stack([t - base for t in thetas])
    weights = torch.full((len(thetas),), scale, dtype=deltas.dtype)
    while deltas.dim() > weights.dim():
        weights.unsqueeze_(-1)
    deltas.mul_(weights)
    return (base + deltas.sum(dim=0)).to(base.dtype)


def differ(a: torch.Tensor, b: torch.Tensor) -> str:
    d = (a.float() - b.float()).abs()
    return f"{int((d > 0).sum())} of {d.numel()} entries differ (max {float(d.max()):.3g})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("zoo_dir")
    ap.add_argument("ours")
    ap.add_argument("theirs_dir")
    ap.add_argument("tensor")
    ap.add_argument("--method", choices=["ties", "ta"], default="ties")
    ap.add_argument("--k", type=float, default=20.0)
    ap.add_argument("--scale", type=float, default=0.3)
    ap.add_argument("--majority", type=float, default=1.0, help="the model-wide majority sign our merge used (+1 or -1; try both)")
    args = ap.parse_args()
    zoo = Path(args.zoo_dir)
    base = tensor(zoo / "base", args.tensor)
    thetas = [tensor(d, args.tensor) for d in sorted(zoo.glob("task_*"))]
    theirs = tensor(Path(args.theirs_dir), args.tensor)
    with safe_open(args.ours, framework="pt") as h:
        ours = h.get_tensor(args.tensor)
    if args.method == "ta":
        s1 = mergekit_ta(base, thetas, args.scale)
        print(f"1 rebuilt (fp16) vs mergekit's file: {differ(s1, theirs)}")
        s2 = mergekit_ta(base.float(), [t.float() for t in thetas], args.scale).to(base.dtype)
        print(f"2 fp32 arithmetic vs 1: {differ(s2, s1)}")
        print(f"2 vs our file: {differ(s2, ours)}")
        return
    s1 = mergekit_ties(base, thetas, args.k, args.scale)
    print(f"1 rebuilt (fp16) vs mergekit's file: {differ(s1, theirs)}")
    b32, t32 = base.float(), [t.float() for t in thetas]
    s2 = mergekit_ties(b32, t32, args.k, args.scale).to(base.dtype)
    print(f"2 fp32 arithmetic vs 1: {differ(s2, s1)}")
    s3 = mergekit_ties(b32, t32, args.k, args.scale, trim="ties").to(base.dtype)
    print(f"3 ties at the cut kept vs 2: {differ(s3, s2)}")
    s4 = mergekit_ties(b32, t32, args.k, args.scale, trim="ties", zero_sign=args.majority).to(base.dtype)
    print(f"4 zero-sum sign = {args.majority:+.0f} vs 3: {differ(s4, s3)}")
    print(f"4 vs our file: {differ(s4, ours)}")


if __name__ == "__main__":
    main()
