"""Peak RSS of `tswitch build --executor local` stays under the streaming bound (issue 3).

Bound: fixed overhead + 3 x largest_tensor_bytes x (N + 1). The fixed
overhead is the peak RSS of a process that imports torch and tswitch_ray,
loads the build's compiled (numba) loops and opens the zoo. Both numbers are measured by bench/bench_build_memory.py's
``measure``, the same code that writes bench/results/build_memory.md. The
zoo is the benchmark's, 8 tasks of ViT-B/32 shapes in fp32, cut to one
block so the test runs in seconds. Its largest tensor (conv1, 9 MiB) is the
one of the full model. The whole zoo, 9 x 38 MiB, is larger than the
streaming term, so a build that held the checkpoints instead of streaming
them would fail here.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from tswitch_ray.zoo.synth import synth_zoo

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_build_memory.py"
MiB = 2**20


def _bench():
    spec = importlib.util.spec_from_file_location("bench_build_memory", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_build_memory", module)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc (Linux)")
def test_local_build_peak_rss_within_streaming_bound(tmp_path):
    bench = _bench()
    zoo = synth_zoo("vit-b-32", 8, "fp32", str(tmp_path / "zoo"), seed=0, layers=1)
    largest, name, n_tasks = bench.largest_tensor_bytes(zoo)
    ckpt = (tmp_path / "zoo" / "base.safetensors").stat().st_size
    streaming = 3 * largest * (n_tasks + 1)
    assert (n_tasks + 1) * ckpt > streaming  # holding the whole zoo would break the bound

    overhead = bench.measure("overhead", [zoo])
    assert overhead.code == 0, overhead.stderr[-2000:]
    peak = bench.measure("cli", bench.build_args(zoo, str(tmp_path / "out"), "local", [0.6], []))
    assert peak.code == 0, peak.stderr[-2000:]
    assert (tmp_path / "out" / "manifest.json").exists()
    bound = overhead.vmhwm + streaming
    assert peak.vmhwm <= bound, (
        f"build peak RSS {peak.vmhwm / MiB:.0f} MiB > bound {bound / MiB:.0f} MiB = overhead "
        f"{overhead.vmhwm / MiB:.0f} MiB + 3 x {largest / MiB:.1f} MiB ({name}) x {n_tasks + 1}"
    )
