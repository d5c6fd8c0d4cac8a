"""Tensors above the chunk size are built in row blocks, and the artifacts are the same bytes (issue 16, point 1).

The block-wise math (switch/chunked.py, artifacts/stream_encoding.py) is
checked against the whole-tensor functions on tensors with zeros, −0.0, ties
at the cut and α that keep more than half (the codec then codes the dropped
positions); the build is checked end to end by the golden digests of two
artifact sets of one zoo, built with and without a tiny chunk size.
"""

from __future__ import annotations

import pytest
import torch
from golden import digest
from safetensors.torch import save_file

from tswitch_ray.artifacts.encoding import encode_kept
from tswitch_ray.artifacts.stream_encoding import encode_packed
from tswitch_ray.distributed.build import BuildConfig, run_build
from tswitch_ray.distributed.chunked_build import is_chunked, row_spans
from tswitch_ray.switch import tensor_thresholds
from tswitch_ray.switch.binarize import kept_switches
from tswitch_ray.switch.chunked import BlockSwitches, BlockThresholds
from tswitch_ray.zoo import load_zoo

ALPHA_SETS = [[0.6], [0.0, 0.3, 0.6, 0.9], [0.2]]


def _tau(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tau = torch.randn(1003, 37, generator=g)
    tau[tau.abs() < 0.01] = 0.0
    tau[7, :5] = -0.0
    tau[5, :] = 0.5  # a run of ties, at the cut for some α
    return tau


@pytest.mark.parametrize("cut", ["authors", "exact"])
@pytest.mark.parametrize("alphas", ALPHA_SETS)
def test_block_switches_equal_whole_tensor_switches(cut, alphas):
    tau = _tau(len(alphas))
    flat = tau.reshape(-1)
    spans = row_spans(tuple(tau.shape), 37 * 50 + 3)  # 50 rows per block, the last one shorter
    assert len(spans) == 21 and spans[-1] == (20 * 1850, flat.numel())
    ths = tensor_thresholds(tau, alphas, cut=cut)
    blocks = BlockThresholds(alphas, cut)
    for a, b in spans:
        blocks.add(flat[a:b])
    assert blocks.request
    for a, b in spans:
        blocks.add_fine(flat[a:b])
    assert blocks.result() == ths

    whole = [(sw.stats, encode_kept(flat.numel(), sw.positions.copy(), sw.positive.copy(),
                                    dropped_pos=None if sw.dropped is None else sw.dropped.copy()))
             for sw in kept_switches(tau, ths)]
    switches = BlockSwitches(flat.numel(), ths)
    for a, b in spans:
        switches.add(flat[a:b])
    chunked = [(sw.stats, encode_packed(sw.numel, sw.kept, sw.mask_bits, sw.sign_bits)) for sw in switches.result()]
    assert [s for s, _ in chunked] == [s for s, _ in whole]  # float64 sums: the same bits, not approximately
    assert [e for _, e in chunked] == [e for _, e in whole]
    if 0.0 in alphas:
        assert whole[0][1].inverted  # the dropped-positions branch of the codec is exercised


def test_encode_packed_of_an_empty_and_a_full_mask():
    import numpy as np

    for mask in (np.zeros(77, dtype=bool), np.ones(77, dtype=bool)):
        pos = np.flatnonzero(mask)
        signs = (pos % 3 == 0).astype(np.uint8)
        want = encode_kept(77, pos, signs)
        assert encode_packed(77, pos.size, np.packbits(mask).tobytes(), np.packbits(signs).tobytes()) == want


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> str:
    """fp16 and bf16 tensors, one larger than a row block of 64 elements, one whose rows are larger."""
    root = tmp_path_factory.mktemp("chunkzoo")
    g = torch.Generator().manual_seed(3)
    base = {"emb.weight": torch.randn(300, 40, generator=g).half(),
            "wide.weight": torch.randn(3, 500, generator=g).to(torch.bfloat16),
            "small.bias": torch.randn(40, generator=g).half()}
    save_file(base, str(root / "base.safetensors"))
    lines = []
    for t in range(3):
        task = {k: (v.float() + 0.02 * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in base.items()}
        save_file(task, str(root / f"t{t}.safetensors"))
        lines.append(f"  - {{name: t{t}, uri: t{t}.safetensors}}\n")
    (root / "zoo.yaml").write_text("name: chunk\nbase: base.safetensors\ntasks:\n" + "".join(lines))
    return str(root / "zoo.yaml")


@pytest.mark.parametrize("scope,cut", [("tensor", "authors"), ("tensor", "exact"), ("model", "exact")])
def test_chunked_build_is_byte_identical(zoo, tmp_path, scope, cut):
    def build(out: str, chunk: int | None) -> dict:
        run_build(BuildConfig(zoo=zoo, out=out, alphas=[0.0, 0.5, 0.9], scope=scope, cut=cut, chunk_bytes=chunk,
                              executor="local", show_progress=False))
        return digest.artifact_digest(out)

    loaded = load_zoo(zoo)
    assert is_chunked(loaded, "t0", "emb.weight", 64) and is_chunked(loaded, "t0", "wide.weight", 64)
    assert not is_chunked(loaded, "t0", "small.bias", 64) and not is_chunked(loaded, "t0", "emb.weight", None)
    whole = build(str(tmp_path / "whole"), None)
    assert build(str(tmp_path / "chunked"), 4 * 64) == whole  # blocks of 64 elements: 1 row of wide, 1 of emb


def _bench():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "bench_chunked_memory.py"
    spec = importlib.util.spec_from_file_location("bench_chunked_memory", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_chunked_memory", module)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_chunked_build_peak_rss_is_bounded_by_the_chunk(tmp_path):
    """One 32000 × 2048 fp16 tensor, 4 tasks, 8 MiB blocks: the build's peak above the fixed overhead stays
    within 1.75 × the planner's chunked estimate (3.5 fp32 copies of a block, the encoder's block
    temporaries and 1.2 bytes per element for the packed and encoded switch), below one fp32 copy of the
    whole tensor. (1.75: the estimate is fitted to a few measurements, and glibc's heap keeps blocks
    below its mmap threshold, so the measured peak is not linear in the block size.)"""
    from tswitch_ray.distributed.planner import TASK_OVERHEAD_BYTES

    bench = _bench()
    zoo = bench.write_zoo(tmp_path / "zoo", 32000, 2048, 4)
    r = bench.run(zoo, tmp_path / "out", 8, [0.6])
    bound = int(1.75 * r["estimate"])
    assert bound < 4 * 32000 * 2048  # a build that held one fp32 copy of the tensor would break it
    assert r["estimate"] + TASK_OVERHEAD_BYTES < 0.25 * (TASK_OVERHEAD_BYTES + 8 * 4 * 32000 * 2048)
    assert (tmp_path / "out" / "manifest.json").exists()
    above = r["peak"] - r["overhead"]
    assert above <= bound, f"peak {above / 2**20:.0f} MiB above the overhead > bound {bound / 2**20:.0f} MiB"


@pytest.mark.parametrize("method", ["ta", "avg"])
def test_chunked_merge_is_byte_identical(zoo, tmp_path, method):
    from tswitch_ray.distributed.chunked_merge import merges_in_blocks
    from tswitch_ray.distributed.merge import MergeConfig, run_merge
    from tswitch_ray.methods import get_method

    assert merges_in_blocks(get_method(method), load_zoo(zoo), "emb.weight", 64)
    assert not merges_in_blocks(get_method("emr"), load_zoo(zoo), "emb.weight", 64)  # per-tensor statistics

    def merge(out: str, chunk: int | None) -> bytes:
        run_merge(MergeConfig(zoo=zoo, method=method, out=out, chunk_bytes=chunk, executor="local",
                              show_progress=False))
        return (tmp_path / out / "merged.safetensors").read_bytes()

    assert merge(str(tmp_path / "chunked"), 4 * 64) == merge(str(tmp_path / "whole"), None)


def test_cli_chunk_mb_gives_the_same_artifacts(zoo, tmp_path):
    from typer.testing import CliRunner

    from tswitch_ray.cli import app

    def build(out: str, *extra: str) -> dict:
        res = CliRunner().invoke(app, ["build", "--zoo", zoo, "--out", out, "--alpha", "0.6", "--executor", "local",
                                       "--quiet", *extra])
        assert res.exit_code == 0, res.output
        return digest.artifact_digest(out)

    # 0.0002 MiB = 52 elements: every tensor but small.bias in blocks; 0: none.
    assert build(str(tmp_path / "c"), "--chunk-mb", "0.0002") == build(str(tmp_path / "w"), "--chunk-mb", "0")


@pytest.mark.parametrize("cut", ["authors", "exact"])
def test_chunked_thresholds_with_a_sample_that_misses(tmp_path, cut):
    """The rows the sample reads are 1000 × smaller than the others: the window misses every rank and the
    fine-histogram pass over the blocks gives the exact thresholds all the same (both paths of the function)."""
    from tswitch_ray.distributed.chunked_build import _sample, chunked_thresholds
    from tswitch_ray.switch import signed_histograms, task_vector
    from tswitch_ray.switch.thresholds import (
        WindowPass,
        covers,
        refine_request,
        window_request,
    )

    g = torch.Generator().manual_seed(5)
    base = torch.randn(512, 32, generator=g)
    tau = torch.randn(512, 32, generator=g)
    tau[torch.arange(512) % 128 >= 4] *= 1000.0  # the sample reads rows 0-3 of each quarter only
    save_file({"w": base}, str(tmp_path / "base.safetensors"))
    save_file({"w": base + tau}, str(tmp_path / "t.safetensors"))
    (tmp_path / "zoo.yaml").write_text("name: s\nbase: base.safetensors\ntasks:\n  - {name: t, uri: t.safetensors}\n")
    zoo = load_zoo(str(tmp_path / "zoo.yaml"))
    exact_tau = task_vector(zoo.tasks["t"].read("w"), zoo.base.read("w"))
    alphas = [0.5, 0.9]
    window = window_request(signed_histograms(_sample(zoo, "t", "w", "cpu")), alphas)
    scan = WindowPass(window)
    scan.add(exact_tau)
    assert not covers(window, refine_request(scan.result()[0], alphas, cut))
    assert chunked_thresholds(zoo, "t", "w", alphas, cut, 32 * 16, "cpu", "w") == tensor_thresholds(
        exact_tau, alphas, cut=cut)
    # And the window path: an unskewed tensor's sample covers its ranks.
    save_file({"w": base + torch.randn(512, 32, generator=g)}, str(tmp_path / "t.safetensors"))
    zoo = load_zoo(str(tmp_path / "zoo.yaml"))
    exact_tau = task_vector(zoo.tasks["t"].read("w"), zoo.base.read("w"))
    window = window_request(signed_histograms(_sample(zoo, "t", "w", "cpu")), alphas)
    scan = WindowPass(window)
    scan.add(exact_tau)
    assert covers(window, refine_request(scan.result()[0], alphas, cut))
    assert chunked_thresholds(zoo, "t", "w", alphas, cut, 32 * 16, "cpu", "w") == tensor_thresholds(
        exact_tau, alphas, cut=cut)
