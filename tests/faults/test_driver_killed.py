"""The driver of a build on a local Ray it started is SIGKILLed mid-build: no Ray process of its session outlives it
(ray_reaper.py), and the same command, rerun, completes with the clean run's bytes."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import psutil
import pytest
from events import ShardGate, pid_alive, wait_until

from faults.kit import CLI, EVENT_S, GATED_CLI, build_args, parts_of, wait_for

# Ray's own fate-sharing leaves the raylet's agents running ~61 s after such a kill; the reaper's bound is seconds.
GONE_S = 20
AGENTS = ("DashboardAgent", "RuntimeEnvAgent")


def _ray_processes(root: psutil.Process) -> dict[int, str]:
    found = {}
    for p in root.children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
            if p.name().startswith("ray::") or "/ray/" in cmd:
                found[p.pid] = cmd
        except psutil.Error:
            continue
    return found


def _with_agents(found: dict[int, str]) -> dict[int, str] | None:
    """``found`` once both of the raylet's agents are among them, else None."""
    return found if all(any(a in cmd for cmd in found.values()) for a in AGENTS) else None


@pytest.mark.slow
def test_driver_sigkilled_leaves_no_ray_process_and_rerun_completes(zoo, clean, tmp_path):
    out = tmp_path / "switches"
    # The child's Ray keeps its sessions in a folder of its own: nothing of another Ray is counted or joined.
    ray_tmp = tempfile.mkdtemp(prefix="tsr-kill-", dir="/tmp")
    env = dict(os.environ, RAY_TMPDIR=ray_tmp)
    env.pop("RAY_ADDRESS", None)
    gate = ShardGate(tmp_path / "gate", free=1)
    cmd = build_args(zoo, out, "--executor", "ray", "--workers", "2")
    proc = subprocess.Popen([*GATED_CLI, gate.root, "1", *cmd], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        wait_for(proc, lambda: list(out.rglob("part-*.parquet.sha256")), "the first staged part")
        wait_for(proc, lambda: len(gate.started()) > 1, "a held shard to start")
        driver = psutil.Process(proc.pid)
        # The agents start a moment after ray.init returns; the kill must find them running.
        ray_procs = wait_for(proc, lambda: _with_agents(_ray_processes(driver)), "the raylet's agents")
        sessions = list(Path(ray_tmp).glob("ray/session_2*"))
        assert len(sessions) == 1, sessions
        proc.kill()
        proc.communicate(timeout=60)
        left = lambda: {pid: c for pid, c in ray_procs.items() if pid_alive(pid)}
        try:
            wait_until(lambda: not left(), GONE_S, "every Ray process of the killed driver to exit")
        except TimeoutError:
            pytest.fail(f"Ray processes outlived their driver by {GONE_S} s: {left()}")
        # Nothing else runs out of that session's folder either.
        session = str(sessions[0])
        stray = [p.pid for p in psutil.process_iter(["cmdline"]) if session in " ".join(p.info["cmdline"] or [])
                 and pid_alive(p.pid)]
        assert stray == []
    finally:
        gate.abort()
        proc.kill()
    assert proc.returncode == -9
    assert not (out / "manifest.json").exists()
    rerun = subprocess.run([*CLI, *cmd], env=env, capture_output=True, text=True, timeout=EVENT_S)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert parts_of(out) == parts_of(clean)
    # The rerun's own Ray is gone once it exited (ray.shutdown, then the reaper).
    assert wait_until(lambda: not [p for p in psutil.process_iter(["cmdline"])
                                   if ray_tmp in " ".join(p.info["cmdline"] or []) and pid_alive(p.pid)],
                      GONE_S, "the rerun's Ray to exit")


@pytest.mark.slow
def test_a_closed_executor_stops_no_other_ray_of_its_process(ray_cluster):
    """The watcher stops Ray processes only when its driver died: an executor closed normally leaves another Ray
    of the same process (here a Cluster started before it) running."""
    import ray

    from tswitch_ray.distributed.executor import RayExecutor, WorkItem

    cluster = ray_cluster(head_cpus=1)
    theirs = _ray_processes(psutil.Process())
    executor = RayExecutor(num_cpus=1)  # a local Ray of its own, with a watcher
    watcher = executor._reaper.process
    assert [v for _, v in executor.map(abs, [WorkItem(0, (-3,))])] == [3]
    wait_until(lambda: _with_agents(_ray_processes(psutil.Process())), EVENT_S, "the executor's Ray agents")
    executor.close()
    assert watcher.wait(timeout=EVENT_S) == 0
    assert all(pid_alive(pid) for pid in theirs), {pid: c for pid, c in theirs.items() if not pid_alive(pid)}
    ray.init(address=cluster.address, log_to_driver=False)
    assert ray.get(ray.remote(lambda: 7).remote()) == 7
