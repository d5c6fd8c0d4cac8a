"""Switch encoding benchmark: size and speed of codec rice-v1 vs the authors' group-of-4 format.

Synthetic ViT-B/32 (open_clip visual tower) tensor shapes, heavy-tailed task
vectors (Student-t, df = 3), exact per-tensor P-Discard thresholds (scope
"tensor", computed here with ``torch.kthvalue``) for each α. For every α it
measures bits per element of

* ours (codec rice-v1, payload bytes incl. byte padding, round trip checked),
* the entropy bound Σ numel·H(kept fraction) + kept, per tensor,
* naive bit planes (2 bits: mask + sign),
* the authors' format (lfy-123/Binary-Task-Switch ``compress_util.py``:
  one presence bit per group of 4, then for each present group its 4 mask
  bits and one sign bit per kept element), sized exactly with numpy,

and encode/decode wall time of ours (whole model) vs the authors' Python
loops over groups, timed on a subsample of ``--sample`` elements and scaled
linearly to the whole model.

    .venv/bin/python bench/bench_encoding.py            # prints a Markdown table
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from tswitch_ray.artifacts import decode_switch, encode_switch


def vit_b32_shapes(layers: int = 12) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of open_clip ViT-B/32's visual tower (width 768, patch 32, 224 px, output 512)."""
    d, mlp = 768, 3072
    shapes: dict[str, tuple[int, ...]] = {
        "conv1.weight": (d, 3, 32, 32),
        "class_embedding": (d,),
        "positional_embedding": (50, d),
        "ln_pre.weight": (d,),
        "ln_pre.bias": (d,),
    }
    for i in range(layers):
        p = f"transformer.resblocks.{i}."
        shapes.update({
            p + "ln_1.weight": (d,),
            p + "ln_1.bias": (d,),
            p + "attn.in_proj_weight": (3 * d, d),
            p + "attn.in_proj_bias": (3 * d,),
            p + "attn.out_proj.weight": (d, d),
            p + "attn.out_proj.bias": (d,),
            p + "ln_2.weight": (d,),
            p + "ln_2.bias": (d,),
            p + "mlp.c_fc.weight": (mlp, d),
            p + "mlp.c_fc.bias": (mlp,),
            p + "mlp.c_proj.weight": (d, mlp),
            p + "mlp.c_proj.bias": (d,),
        })
    shapes.update({"ln_post.weight": (d,), "ln_post.bias": (d,), "proj": (d, 512)})
    return shapes


def switch_of(tau: torch.Tensor, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Exact P-Discard (docs/MATH.md "Thresholds (P-Discard cut)"): d = floor(α·n),
    threshold = d-th smallest, kept strictly above."""
    mask = torch.zeros_like(tau, dtype=torch.bool)
    for sign in (1.0, -1.0):
        vals = sign * tau[sign * tau > 0]
        d = math.floor(alpha * vals.numel())
        t = vals.kthvalue(d).values.item() if d else 0.0
        mask |= sign * tau > t
    return mask.numpy(), (tau > 0).numpy()


def entropy_bits(numel: int, kept: int) -> float:
    p = kept / numel
    h = 0.0 if p in (0.0, 1.0) else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))
    return numel * h + kept


def authors_bits(mask: np.ndarray) -> int:
    present = mask.reshape(-1, 4).any(axis=1)
    return present.size + 4 * int(present.sum()) + int(mask.sum())


# --- the authors' format, as Python loops over groups ---------------------------
# A port of compress_to_bitarray / decompress_from_bitarray (group_size 4). The
# original appends '0'/'1' strings to a `bitarray`; here an ASCII bytearray
# takes their place (appending is C-speed in both), so the loop cost is theirs.

def authors_encode(ternary: np.ndarray, group_size: int = 4) -> bytearray:
    tensor = ternary.reshape(-1)
    reshaped = tensor.reshape(-1, group_size)
    mark_array = np.any(reshaped != 0, axis=1)
    bits = bytearray("".join("1" if m else "0" for m in mark_array).encode())
    mapping = {0: "00", 1: "01", -1: "10"}
    _ = np.array([mapping[x] for x in tensor.tolist()])  # computed (and unused) in the original too
    for i, mark in enumerate(mark_array):
        if mark:
            group = reshaped[i]
            nz = [j for j, v in enumerate(group) if v != 0]
            bits += "".join(str(int(abs(group[j]))) for j in range(group_size)).encode()
            bits += "".join("1" if group[j] == 1 else "0" for j in nz).encode()
    return bits


def authors_decode(bits: bytearray, numel: int, group_size: int = 4) -> np.ndarray:
    one = ord("1")
    mark_len = numel // group_size
    marks = bits[:mark_len]
    out = np.zeros(numel).reshape(-1, group_size)
    data = bits[mark_len:]
    idx = 0
    for i, mark in enumerate(marks):
        if mark == one:
            gbits = data[idx: idx + group_size]
            nnz = sum(1 for b in gbits if b == one)
            idx += group_size
            signs = data[idx: idx + nnz]
            idx += nnz
            group, k = [], 0
            for b in gbits:
                if b == one:
                    group.append(1 if signs[k] == one else -1)
                    k += 1
                else:
                    group.append(0)
            out[i] = group
    return out.reshape(-1)


@dataclass
class Acc:
    numel: int = 0
    ours_bits: int = 0
    bound_bits: float = 0.0
    authors_bits: int = 0
    enc_s: float = 0.0
    dec_s: float = 0.0
    kept: int = 0
    per_tensor_ratio: list[float] = field(default_factory=list)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.5, 0.7, 0.9, 0.99])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sample", type=int, default=200_000, help="elements timed for the authors' loops")
    args = ap.parse_args()

    shapes = vit_b32_shapes(args.layers)
    total = sum(math.prod(s) for s in shapes.values())
    acc = {a: Acc() for a in args.alphas}
    sample_masks: dict[float, tuple[np.ndarray, np.ndarray]] = {}
    rng = np.random.default_rng(args.seed)
    for name, shape in shapes.items():
        tau = torch.from_numpy((1e-3 * rng.standard_t(3, size=shape)).astype(np.float32)).reshape(-1)
        for a in args.alphas:
            mask, positive = switch_of(tau, a)
            t0 = time.perf_counter()
            enc = encode_switch(mask, positive)
            t1 = time.perf_counter()
            m2, p2 = decode_switch(enc)
            t2 = time.perf_counter()
            if not (np.array_equal(m2, mask) and np.array_equal(p2, positive & mask)):
                raise SystemExit(f"round trip failed: {name} alpha={a}")
            s = acc[a]
            s.numel += mask.size
            s.kept += enc.kept
            s.ours_bits += enc.nbits
            s.bound_bits += entropy_bits(mask.size, enc.kept)
            s.authors_bits += authors_bits(mask)
            s.enc_s += t1 - t0
            s.dec_s += t2 - t1
            if name.endswith("mlp.c_fc.weight") and a not in sample_masks:
                sample_masks[a] = (mask[: args.sample].copy(), positive[: args.sample].copy())

    # The authors' loops, on a subsample of one c_fc weight, scaled to the model.
    loop_rate: dict[float, tuple[float, float]] = {}
    for a, (mask, positive) in sample_masks.items():
        ternary = np.where(mask, np.where(positive, 1, -1), 0).astype(np.int8)
        t0 = time.perf_counter()
        bits = authors_encode(ternary)
        t1 = time.perf_counter()
        back = authors_decode(bits, ternary.size)
        t2 = time.perf_counter()
        if not np.array_equal(back, ternary):
            raise SystemExit(f"authors' format round trip failed at alpha={a}")
        if len(bits) != authors_bits(mask):
            raise SystemExit("authors' size formula disagrees with their loops")
        loop_rate[a] = ((t1 - t0) / ternary.size, (t2 - t1) / ternary.size)

    print(f"ViT-B/32 visual tower shapes ({len(shapes)} tensors, {total / 1e6:.1f} M elements), "
          f"Student-t(3) task vector, per-tensor exact thresholds; {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, numpy {np.__version__}, {torch.get_num_threads()} threads.\n")
    print("| α | ours bits/elem | entropy bound | ours / bound | authors' bits/elem | authors' / bound | "
          "naive | ours % of fp32 | ours enc s | ours dec s | authors' enc s (est.) | authors' dec s (est.) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for a in args.alphas:
        s = acc[a]
        er, dr = loop_rate[a]
        print(f"| {a} | {s.ours_bits / s.numel:.4f} | {s.bound_bits / s.numel:.4f} | "
              f"{s.ours_bits / s.bound_bits:.3f} | {s.authors_bits / s.numel:.4f} | "
              f"{s.authors_bits / s.bound_bits:.3f} | 2 | {100 * s.ours_bits / (32 * s.numel):.2f} % | "
              f"{s.enc_s:.2f} | {s.dec_s:.2f} | {er * s.numel:.1f} | {dr * s.numel:.1f} |")
    print(f"\nAuthors' loop times: measured on the first {args.sample:,} elements of one mlp.c_fc.weight per α "
          f"and scaled linearly to {total:,} elements; ours: whole model, single process.")


if __name__ == "__main__":
    main()
