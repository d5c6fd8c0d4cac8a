"""A Ray node dies while it scores an eval cell: the cell in flight there is scored again on the head, the retry is
counted, and the results equal an undisturbed local evaluation's. (Mid-build: tests/test_distributed_build.py::
test_worker_node_killed_mid_build; a killed worker: tests/test_executor.py.)"""

from __future__ import annotations

import threading

import pytest
import ray
from events import ShardGate, arg_key, pid_alive, wait_until

import tswitch_ray.distributed.eval_runner as eval_mod
from faults.kit import EVENT_S
from tswitch_ray.distributed.build import BuildConfig, run_build
from tswitch_ray.distributed.eval_runner import run_eval
from tswitch_ray.eval.config import EvalConfig, MethodSpec
from tswitch_ray.tracking import TrackingConfig


def _config(zoo, switches, work, executor: str) -> EvalConfig:
    return EvalConfig(name="faults", zoo=str(zoo), artifacts=str(switches), work_dir=str(work), limit=24,
                      batch_size=16, executor=executor, tracking=TrackingConfig(enabled=False),
                      methods=[MethodSpec(method="tswitch", alpha=0.6)])


def _scores(result) -> list[tuple]:
    return sorted((r["label"], r["task"], r["accuracy"]) for r in result.rows)


@pytest.mark.slow
def test_node_killed_mid_eval(tiny_demo_zoo, tmp_path, ray_cluster, monkeypatch):
    switches = tmp_path / "switches"
    run_build(BuildConfig(zoo=str(tiny_demo_zoo), out=str(switches), alphas=[0.6], executor="local",
                          show_progress=False))
    reference = run_eval(_config(tiny_demo_zoo, switches, tmp_path / "local", "local"), show_progress=False)
    cluster = ray_cluster(head_cpus=1)
    victim = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    gate = ShardGate(tmp_path / "gate")  # every cell is held until the victim is gone
    monkeypatch.setattr(eval_mod, "score_cell", gate.wrap(eval_mod.score_cell, key=arg_key(1)))  # named by task
    executors: list = []
    real = eval_mod.make_executor

    def recording(*args, **kwargs):
        executors.append(real(*args, **kwargs))
        return executors[-1]

    monkeypatch.setattr(eval_mod, "make_executor", recording)
    result: dict = {}

    def go() -> None:
        try:
            result["eval"] = run_eval(_config(tiny_demo_zoo, switches, tmp_path / "cluster", "ray"),
                                      show_progress=False)
        except BaseException as exc:  # surfaced below
            result["error"] = exc

    t = threading.Thread(target=go)
    t.start()
    try:
        on_victim = wait_until(lambda: [r for r in gate.started() if r["node"] == victim.node_id], EVENT_S,
                               "a cell to start on the worker node")
        cluster.remove_node(victim, allow_graceful=False)
        for record in on_victim:
            pid = record["pid"]
            wait_until(lambda pid=pid: not pid_alive(pid), EVENT_S, f"the victim's worker {pid} to exit")
    finally:
        gate.open()
        t.join(timeout=EVENT_S)
    assert not t.is_alive()
    assert "error" not in result, result.get("error")
    killed = {r["shard"] for r in on_victim}
    reran = {r["shard"] for r in gate.started() if r["node"] == cluster.head_node.node_id}
    assert killed and killed <= reran
    assert executors[0].stats.retries >= len(killed)
    assert _scores(result["eval"]) == _scores(reference)
