"""The object store faulted under a build: down at start, killed mid-write and started again (SeaweedFS keeps its
data on disk, so the restarted server holds what was written before the kill)."""

from __future__ import annotations

import socket
import subprocess
import time
import uuid

import fsspec
import pytest
from events import ShardGate

from faults.kit import CLI, EVENT_S, GATED_CLI, assert_clear_error, build_args, wait_for

# The translation layer's promise for an object store that does not answer (io/faults.py): seconds, not minutes.
DOWN_S = 60


def _dead_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # closed on exit: nothing listens there


def test_object_store_down_at_start_is_refused_before_any_work(zoo, tmp_path):
    endpoint = _dead_endpoint()
    t0 = time.monotonic()
    done = subprocess.run([*CLI, *build_args(zoo, "s3://bucket/switches", "--executor", "local"),
                           "--s3-endpoint", endpoint, "-S", "key=k", "-S", "secret=s"],
                          capture_output=True, text=True, timeout=EVENT_S)
    took = time.monotonic() - t0
    assert_clear_error(done, endpoint, "does not answer")
    assert took < DOWN_S, f"took {took:.0f} s"


def _parts(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, bytes]:
    fs.invalidate_cache()
    return {p[len(root) + 1:]: fs.cat_file(p) for p in sorted(fs.find(root)) if p.endswith(".parquet")}


@pytest.mark.slow
def test_object_store_killed_mid_write_then_restarted(zoo, clean, weed, tmp_path):
    fs = fsspec.filesystem("s3", **weed.storage_options)
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    out = f"s3://{bucket}/switches"
    cmd = [*build_args(zoo, out, "--executor", "local"), *weed.cli_args()]
    gate = ShardGate(tmp_path / "gate", free=1)
    proc = subprocess.Popen([*GATED_CLI, gate.root, "1", *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        sidecars = lambda: [p for p in fs.find(bucket) if p.endswith(".parquet.sha256")]
        wait_for(proc, lambda: (fs.invalidate_cache(), sidecars())[1], "the first part on the object store")
        wait_for(proc, lambda: len(gate.started()) > 1, "the next shard to start")
        staged = _parts(fs, f"{bucket}/switches")
        weed.kill()  # mid-build: the held shard writes its part to a dead server
        gate.open()
        stdout, stderr = proc.communicate(timeout=EVENT_S)
    finally:
        gate.abort()
        proc.kill()
    assert_clear_error(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), weed.endpoint,
                       "does not answer", "Nothing was committed")
    weed.start()
    fs = fsspec.filesystem("s3", **weed.storage_options, skip_instance_cache=True)
    assert not fs.exists(f"{bucket}/switches/manifest.json")
    assert _parts(fs, f"{bucket}/switches") == staged  # what was written before the kill survived whole
    rerun = subprocess.run([*CLI, *[c for c in cmd if c != "--quiet"]], capture_output=True, text=True,
                           timeout=EVENT_S)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    fs.invalidate_cache()
    assert fs.exists(f"{bucket}/switches/manifest.json")
    local = {str(p.relative_to(clean)): p.read_bytes() for p in sorted(clean.rglob("*.parquet"))}
    assert _parts(fs, f"{bucket}/switches") == local
