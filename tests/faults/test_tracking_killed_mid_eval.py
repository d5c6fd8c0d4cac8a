"""The MLflow server dies while `run_eval` scores its cells: the results are written, the tracking step fails fast
with a `ServiceError` naming them, and the rerun against a live server reuses every cell and logs the run.
(Down at start: tests/test_eval_runner.py::test_unreachable_tracking_server_fails_before_any_work; a log call
to a dead server, timed: tests/test_faults_translation.py::test_tracking_server_dying_mid_eval_fails_fast_naming_the_results.)"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import _server
from events import ShardGate, arg_key, wait_until

import tswitch_ray.distributed.eval_runner as eval_mod
from faults.kit import EVENT_S
from tswitch_ray.distributed.build import BuildConfig, run_build
from tswitch_ray.distributed.eval_runner import run_eval
from tswitch_ray.errors import ServiceError
from tswitch_ray.eval.config import EvalConfig, MethodSpec
from tswitch_ray.tracking import HTTP_DEADLINE_S, TrackingConfig


def _mlflow(root: Path):
    def args_of(ports: list[int], folder: Path) -> list[str]:
        return [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(ports[0]),
                "--backend-store-uri", f"sqlite:///{folder}/mlflow.db", "--default-artifact-root",
                str(folder / "artifacts"), "--workers", "1"]

    return _server("mlflow server", 1, args_of, lambda ports: f"http://127.0.0.1:{ports[0]}/health",
                   lambda r: r.ok, root)


def _scores(result) -> list[tuple]:
    return sorted((r["label"], r["task"], r["accuracy"]) for r in result.rows)


@pytest.mark.slow
def test_tracking_server_killed_mid_eval(tiny_demo_zoo, mlflow_server, tmp_path, monkeypatch):
    switches = tmp_path / "switches"
    run_build(BuildConfig(zoo=str(tiny_demo_zoo), out=str(switches), alphas=[0.6], executor="local",
                          show_progress=False))
    work = tmp_path / "w"

    def config(uri: str) -> EvalConfig:
        return EvalConfig(name="faults", zoo=str(tiny_demo_zoo), artifacts=str(switches), work_dir=str(work),
                          limit=24, batch_size=16, executor="local", methods=[MethodSpec(method="tswitch", alpha=0.6)],
                          tracking=TrackingConfig(uri=uri, experiment="faults", connect_timeout_s=5))

    gate = ShardGate(tmp_path / "gate")  # the cells wait until the server is dead
    monkeypatch.setattr(eval_mod, "score_cell", gate.wrap(eval_mod.score_cell, key=arg_key(1)))
    server = _mlflow(tmp_path / "mlflow")
    uri = f"http://127.0.0.1:{server.__enter__()[0]}"
    result: dict = {}

    def go() -> None:
        try:
            run_eval(config(uri), show_progress=False)
        except BaseException as exc:  # surfaced below
            result["error"] = exc
        result["ended"] = time.monotonic()

    t = threading.Thread(target=go)
    t.start()
    try:
        wait_until(lambda: gate.started() or not t.is_alive(), EVENT_S, "the first cell to start")
        server.__exit__(None, None, None)  # killed mid-eval, its process group with it
        server = None
        gate.open()
        killed = time.monotonic()
        t.join(timeout=EVENT_S)
    finally:
        gate.open()
        if server is not None:
            server.__exit__(None, None, None)
    assert not t.is_alive()
    error = result.get("error")
    assert isinstance(error, ServiceError), error
    message = " ".join(str(error).split())
    assert uri in message and str(work) in message, message
    assert (work / "results.parquet").exists()  # the results were written before tracking failed
    # Scoring three tiny cells and the bounded tracking retries, not MLflow's ~260 s of defaults.
    assert result["ended"] - killed < 3 * HTTP_DEADLINE_S
    monkeypatch.undo()
    messages: list[str] = []
    again = run_eval(config(mlflow_server), show_progress=False, say=messages.append)
    assert any("scoring 0 of 3" in m for m in messages)
    assert again.run_id
    clean = run_eval(config(mlflow_server).model_copy(update={"work_dir": str(tmp_path / "clean")}),
                     show_progress=False)
    assert _scores(again) == _scores(clean)
