"""The Ray build equals the single-process build byte for byte, survives node loss and resumes."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from events import ShardGate, pid_alive, wait_until

import tswitch_ray.distributed.build as build_mod
from tswitch_ray.artifacts import ArtifactReader
from tswitch_ray.distributed.build import BuildConfig, run_build
from tswitch_ray.distributed.planner import layer_of, plan_shards
from tswitch_ray.distributed.progress import PhaseTimer
from tswitch_ray.errors import ServiceError, TSwitchError
from tswitch_ray.zoo import load_zoo
from tswitch_ray.zoo.synth import synth_zoo

SMALL_SHARD = 256 * 1024  # many shards even on a 2-layer zoo
GATED_CLI = [sys.executable, str(Path(__file__).with_name("gated_cli.py"))]
# Bounds of waits for events (a part committed, a task started): generous, since a loaded machine
# takes long to start a CLI or a Ray worker; a wait ends as soon as its event happens.
EVENT_S = 300


def _wait_for(proc: subprocess.Popen, condition, what: str) -> None:
    """Wait until ``condition()`` or until ``proc`` exits; past the bound, fail with its output."""
    try:
        wait_until(lambda: condition() or proc.poll() is not None, EVENT_S, what)
    except TimeoutError:
        proc.kill()
        outs, err = proc.communicate(timeout=60)
        raise AssertionError(f"waited {EVENT_S} s for {what}:\n{outs.decode()[-2000:]}\n{err.decode()[-2000:]}") from None


@pytest.fixture(scope="module")
def small_zoo(tmp_path_factory) -> str:
    return synth_zoo("vit-b-32", 3, "fp16", str(tmp_path_factory.mktemp("zoo")), seed=1, layers=2)


def _parts(uri: str) -> dict[str, bytes]:
    root = Path(uri)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.parquet"))}


def _manifest(uri: str) -> dict:
    m = json.loads((Path(uri) / "manifest.json").read_text())
    m.pop("created_at", None)
    m.pop("manifest_sha256", None)  # covers created_at, so it differs between any two commits
    return m


def _build(zoo: str, out: str, **kw) -> object:
    kw.setdefault("show_progress", False)
    kw.setdefault("shard_bytes", SMALL_SHARD)
    return run_build(BuildConfig(zoo=zoo, out=out, alphas=[0.5, 0.9], **kw))


def test_plan_keeps_layers_together_and_balances(small_zoo):
    infos = load_zoo(small_zoo).tensor_infos()
    shards = plan_shards(infos, target_bytes=4 * 2**20)
    names = [n for s in shards for n in s.tensors]
    assert len(names) == len(set(names))
    assert set(names) == {n for n, i in infos.items() if i.dtype in ("F16", "F32", "BF16")}
    # a layer smaller than the target is never split across shards
    for layer in {layer_of(n) for n in names}:
        members = {n for n in names if layer_of(n) == layer}
        owners = {s.shard_id for s in shards if members & set(s.tensors)}
        if sum(infos[n].nbytes for n in members) <= 4 * 2**20:
            assert len(owners) == 1, layer
    assert max(s.nbytes for s in shards) <= max(4 * 2**20, max(i.nbytes for i in infos.values()))
    assert layer_of("visual.transformer.resblocks.11.mlp.c_fc.weight") == "visual.transformer.resblocks.11"


@pytest.mark.parametrize("max_in_flight", [1, None], ids=["one-at-a-time", "parallel"])
# Scope "model" on Ray stays in the fast lane; scope "tensor" (same executor path, costlier shards) is slow.
@pytest.mark.parametrize("scope", [pytest.param("tensor", marks=pytest.mark.slow), "model"])
def test_ray_build_equals_local_byte_for_byte(small_zoo, tmp_path, ray_local, scope, max_in_flight):
    local = str(tmp_path / "local" / "switches")
    _build(small_zoo, local, scope=scope, executor="local")
    distributed = str(tmp_path / "ray" / "switches")
    summary = _build(small_zoo, distributed, scope=scope, executor="ray", max_in_flight=max_in_flight)
    assert summary.shards > 4
    assert _parts(local) == _parts(distributed)
    assert _manifest(local) == _manifest(distributed)
    passes = ["sample", "histograms", "refine"] if scope == "model" else []
    expected = ["plan", "start-up", *passes, "encode", "commit", "shutdown"]
    phases = list(summary.phase_seconds)
    assert phases == [p for p in expected if p in phases]  # in run order
    assert set(expected) - set(phases) <= {"refine"}  # only when a sampled window missed (it may on this tiny zoo)
    assert min(summary.phase_seconds.values()) >= 0
    assert sum(summary.phase_seconds.values()) <= summary.seconds


def test_phase_timer_orders_phases_and_adds_repeats():
    ticks = iter([0.0, 1.0, 3.0, 3.5, 7.5])
    timer = PhaseTimer(clock=lambda: next(ticks))
    timer.start("a")  # 0.0
    timer.start("b")  # 1.0: a ran 1 s
    timer.start("a")  # 3.0: b ran 2 s
    timer.start("c")  # 3.5: a ran 0.5 s more
    timer.stop()      # 7.5: c ran 4 s
    assert timer.seconds == {"a": 1.5, "b": 2.0, "c": 4.0}
    assert list(timer.seconds) == ["a", "b", "c"]


def test_resume_recomputes_only_missing_shards(small_zoo, tmp_path):
    out = str(tmp_path / "a")
    first = _build(small_zoo, out, executor="local")
    reference = _parts(out)
    # simulate a crash after most shards: no manifest, two parts lost
    (Path(out) / "manifest.json").unlink()
    staged = sorted(p for p in Path(out).rglob("part-*.parquet"))
    for p in staged[:2]:
        p.unlink()
    with pytest.raises(TSwitchError):
        ArtifactReader(out)  # nothing visible without a manifest
    second = _build(small_zoo, out, executor="local")
    assert second.shards_reused == first.shards - 2
    assert _parts(out) == reference


@pytest.mark.slow
def test_interrupted_process_resumes(small_zoo, tmp_path):
    out = str(tmp_path / "b")
    gate = ShardGate(tmp_path / "gate", free=1)
    # The first shard runs; the next one is held at the gate (never opened), so SIGINT lands mid-build.
    cmd = [*GATED_CLI, gate.root, "1", "build", "--zoo", small_zoo, "--out", out, "--alpha", "0.5",
           "--alpha", "0.9", "--executor", "local", "--shard-mb", "1", "--quiet"]
    # A child inherits an ignored or blocked SIGINT (then Python never raises KeyboardInterrupt
    # and the build runs to its commit, as seen in CI): whatever earlier tests left in this
    # process's handlers or signal mask, the build gets the defaults a terminal gives it.
    def default_sigint() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=default_sigint)
    try:
        # A part counts once its sha256 sidecar is written; the held shard has started after it.
        _wait_for(proc, lambda: list(Path(out).rglob("part-*.parquet.sha256")), "the first committed part")
        _wait_for(proc, lambda: len(gate.started()) > 1, "the next shard to start")
        proc.send_signal(signal.SIGINT)
        outs, err = proc.communicate(timeout=60)
    finally:
        gate.abort()
        proc.kill()
    assert proc.returncode != 0, (outs.decode()[-2000:], err.decode()[-2000:])
    assert not (Path(out) / "manifest.json").exists()
    # One part per (task, shard): the first shard's three tasks are staged, nothing of the next one.
    sidecars = list(Path(out).rglob("part-*.parquet.sha256"))
    done_before = len({p.name for p in sidecars})
    assert done_before == 1 and len(sidecars) == 3
    summary = run_build(BuildConfig(zoo=small_zoo, out=out, alphas=[0.5, 0.9], executor="local", show_progress=False,
                                    shard_bytes=2**20))
    assert summary.shards_reused == done_before and summary.parts_reused == len(sidecars)
    clean = str(tmp_path / "clean" / "switches")
    run_build(BuildConfig(zoo=small_zoo, out=clean, alphas=[0.5, 0.9], executor="local", show_progress=False,
                          shard_bytes=2**20))
    assert _parts(out) == _parts(clean)


@pytest.mark.slow
def test_worker_node_killed_mid_build(small_zoo, tmp_path, ray_cluster, monkeypatch):
    """A node dies while it runs a shard: the executor re-runs that shard elsewhere, counts the retry, and the
    artifact is byte-identical to the local build's."""
    local = str(tmp_path / "local" / "switches")
    _build(small_zoo, local, executor="local")
    cluster = ray_cluster(head_cpus=1)
    victim = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    gate = ShardGate(tmp_path / "gate")  # every shard is held until the victim is gone
    monkeypatch.setattr(build_mod, "shard_encode", gate.wrap(build_mod.shard_encode))
    executors: list = []
    real_make_executor = build_mod.make_executor

    def recording_make_executor(*args, **kwargs):
        executors.append(real_make_executor(*args, **kwargs))
        return executors[-1]

    monkeypatch.setattr(build_mod, "make_executor", recording_make_executor)
    out = str(tmp_path / "cluster" / "switches")
    result: dict = {}

    def go() -> None:
        try:
            result["summary"] = _build(small_zoo, out, executor="ray")
        except BaseException as exc:  # surfaced below
            result["error"] = exc

    t = threading.Thread(target=go)
    t.start()
    try:
        on_victim = wait_until(lambda: [r for r in gate.started() if r["node"] == victim.node_id], EVENT_S,
                               "a shard to start on the worker node")
        cluster.remove_node(victim, allow_graceful=False)
        # Its worker processes must be gone too before the gate opens, or one could still finish its shard.
        for record in on_victim:
            wait_until(lambda: not pid_alive(record["pid"]), EVENT_S, f"the victim's worker {record['pid']} to exit")
    finally:
        gate.open()  # the rest of the build runs (after a failed wait too: the thread must end)
        t.join(timeout=300)
    assert not t.is_alive()
    assert "error" not in result, result.get("error")
    assert result["summary"].shards > 4
    assert _parts(local) == _parts(out)
    # The shards in flight on the victim were never finished there, so each was re-run (on the head) and counted.
    killed = {r["shard"] for r in on_victim}
    reran = {r["shard"] for r in gate.started() if r["node"] == cluster.head_node.node_id}
    assert killed and killed <= reran
    assert executors[0].stats.retries >= len(killed)


@pytest.mark.slow
def test_driver_killed_on_an_attached_cluster_resumes(small_zoo, tmp_path, ray_cluster):
    """`tswitch build --ray-address` on a running cluster; the driver is SIGKILLed mid-build (a driver crash:
    no cleanup runs) and the same command, rerun, reuses the parts committed before and recomputes the rest."""
    out = str(tmp_path / "attached" / "switches")
    cmd = ["build", "--zoo", small_zoo, "--out", out, "--alpha", "0.5", "--alpha", "0.9", "--shard-mb", "1", "--quiet"]
    cluster = ray_cluster(head_cpus=2)
    cluster.wait_for_nodes()
    attach = ["--ray-address", cluster.address]
    # The first shard to start runs; every other is held at the gate, so the kill lands with shards in flight.
    gate = ShardGate(tmp_path / "gate", free=1)
    proc = subprocess.Popen([*GATED_CLI, gate.root, "1", *cmd, *attach], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        _wait_for(proc, lambda: list(Path(out).rglob("part-*.parquet.sha256")), "the first committed part")
        _wait_for(proc, lambda: len(gate.started()) > 1, "a held shard to start")
        proc.kill()
        outs, err = proc.communicate(timeout=60)
    finally:
        # Held tasks of the dead driver end without writing anything, even if Ray has not ended them yet.
        gate.abort()
        proc.kill()
    assert proc.returncode == -signal.SIGKILL, (outs.decode()[-2000:], err.decode()[-2000:])
    assert not (Path(out) / "manifest.json").exists()
    done_before = len({p.name for p in Path(out).rglob("part-*.parquet.sha256")})  # shards: one part per task each
    assert done_before == 1
    # The same command again, ungated, with its run summary (no --quiet): "shards (reused)  N (M)".
    rerun = subprocess.run([sys.executable, "-m", "tswitch_ray.cli", *[c for c in cmd if c != "--quiet"], *attach],
                           capture_output=True, text=True, timeout=300, env=dict(os.environ, COLUMNS="200"))
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    found = re.search(r"shards \(reused\)\D+(\d+) \((\d+)\)", rerun.stdout + rerun.stderr)
    assert found, rerun.stdout[-2000:]
    shards, reused = int(found.group(1)), int(found.group(2))
    assert reused == done_before < shards  # the kill landed mid-build, and only the rest was recomputed
    assert (Path(out) / "manifest.json").exists()
    # The attached cluster was not shut down by either driver.
    ray.init(address=cluster.address, log_to_driver=False)
    assert ray.cluster_resources().get("CPU") == 2
    clean = str(tmp_path / "clean" / "switches")
    run_build(BuildConfig(zoo=small_zoo, out=clean, alphas=[0.5, 0.9], executor="local", show_progress=False,
                          shard_bytes=2**20))
    assert _parts(out) == _parts(clean)


@pytest.mark.slow
def test_s3_in_and_out(small_zoo, s3_bucket, tmp_path, ray_local):
    bucket, opts = s3_bucket
    fs = fsspec.filesystem("s3", **opts)
    zoo_dir = Path(small_zoo).parent
    fs.put(str(zoo_dir) + "/", f"{bucket}/zoo/", recursive=True)
    local = str(tmp_path / "local" / "switches")
    _build(small_zoo, local, executor="local")
    _build(f"{bucket}/zoo/zoo.yaml", f"{bucket}/switches", executor="ray", storage_options=opts)
    reader = ArtifactReader(f"{bucket}/switches", storage_options=opts)
    assert reader.tasks == load_zoo(small_zoo).task_names
    # The run key hashes the zoo's URIs (which differ between local and s3) and is stamped into each part's
    # folder and schema metadata; the switch rows themselves must be identical.
    def rows(data: bytes) -> pa.Table:
        return pq.read_table(io.BytesIO(data)).replace_schema_metadata(None)

    def by_task_and_shard(tables: list[tuple[str, pa.Table]]) -> dict[tuple[str, str], pa.Table]:
        # A part holds one task's rows of one shard, in a folder named by the task's key (which hashes the
        # checkpoint's location, so it differs between local and s3).
        return {(t.column("task")[0].as_py(), name.rsplit("/", 1)[1]): t for name, t in tables}

    remote = by_task_and_shard([(p, rows(fs.cat_file(p))) for p in fs.find(f"{bucket}/switches")
                                if p.endswith(".parquet")])
    here = by_task_and_shard([(k, rows(v)) for k, v in _parts(local).items()])
    assert remote.keys() == here.keys()
    assert all(remote[k].equals(here[k]) for k in here)


def test_unreachable_ray_address_is_a_clear_error(small_zoo, tmp_path):
    ray.shutdown()
    with pytest.raises(ServiceError, match="127.0.0.1:1"):
        _build(small_zoo, str(tmp_path / "x"), executor="ray", ray_address="127.0.0.1:1")
    assert not (tmp_path / "x" / "manifest.json").exists()


def test_missing_bucket_is_a_clear_error(small_zoo, s3_server):
    opts = {"client_kwargs": {"endpoint_url": s3_server}, "key": "testing", "secret": "testing"}
    with pytest.raises(TSwitchError, match="no-such-bucket"):
        _build(small_zoo, "s3://no-such-bucket/switches", executor="local", storage_options=opts)


def test_checkpoint_disappearing_mid_run_commits_nothing(small_zoo, tmp_path, monkeypatch):
    import shutil

    zoo_dir = tmp_path / "zoo"
    shutil.copytree(Path(small_zoo).parent, zoo_dir)
    victim = sorted(zoo_dir.glob("task_*.safetensors"))[-1]
    out = tmp_path / "out"
    real = build_mod.shard_encode
    encoded: list[int] = []

    def vanishing_after_first_shard(ctx, shard, *rest):
        if encoded:  # the first shard is committed: the checkpoint goes now, mid-run
            victim.unlink(missing_ok=True)
        encoded.append(shard.shard_id)
        return real(ctx, shard, *rest)

    monkeypatch.setattr(build_mod, "shard_encode", vanishing_after_first_shard)
    with pytest.raises(TSwitchError, match=victim.name):
        _build(str(zoo_dir / "zoo.yaml"), str(out), executor="local")
    assert len(encoded) >= 2 and not victim.exists()
    assert not (out / "manifest.json").exists()


@pytest.mark.slow
def test_model_scope_window_miss_falls_back_to_the_exact_pass(small_zoo, tmp_path, monkeypatch):
    """A sampled window that misses its rank costs a pass, never exactness: same bytes as a hit."""
    import tswitch_ray.distributed.build as build_mod
    from tswitch_ray.switch.thresholds import RefineRequest

    hit = str(tmp_path / "hit" / "switches")
    _build(small_zoo, hit, scope="model", executor="local")
    calls = []
    real = build_mod.shard_fine_histograms

    def counting(*args):
        calls.append(args[1].shard_id)
        return real(*args)

    monkeypatch.setattr(build_mod, "window_request", lambda sample, alphas: RefineRequest())
    monkeypatch.setattr(build_mod, "shard_fine_histograms", counting)
    miss = str(tmp_path / "miss" / "switches")
    _build(small_zoo, miss, scope="model", executor="local")
    assert calls  # the fallback pass ran
    assert _parts(hit) == _parts(miss)
    assert _manifest(hit) == _manifest(miss)


@pytest.mark.slow
def test_model_scope_resume_reuses_parts_and_gets_the_same_knobs(small_zoo, tmp_path):
    """Scope "model" knobs sum every shard's kept statistics, the reused (staged) parts' too."""
    clean = str(tmp_path / "clean" / "switches")
    _build(small_zoo, clean, scope="model", executor="local")
    out = str(tmp_path / "resumed" / "switches")
    first = _build(small_zoo, out, scope="model", executor="local")
    (Path(out) / "manifest.json").unlink()
    staged = sorted(p for p in Path(out).rglob("part-*.parquet"))
    for p in staged[:2]:
        p.unlink()
    second = _build(small_zoo, out, scope="model", executor="local")
    assert second.shards_reused == first.shards - 2
    assert _parts(out) == _parts(clean)
    assert _manifest(out) == _manifest(clean)
