"""Storage and Ray faults become one `error:` paragraph naming the URI and the cause, exit 2, no traceback.

Every case drives a real component (the `tswitch` CLI in-process, a real
tmpfs, a real Ray task, a real socket) and was a traceback or a wrong
message before io/faults.py.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from tswitch_ray.cli import app
from tswitch_ray.errors import ServiceError, StorageError, TSwitchError, ZooError
from tswitch_ray.io.safetensors import SafetensorsReader

from test_build_reconstruct import TASKS, make_state, write_zoo


def run(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def assert_user_error(result, *needles: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    assert result.stderr.startswith("error:"), result.stderr
    flat = " ".join(result.stderr.split())
    assert flat.count("error:") == 1, flat  # one paragraph
    for needle in needles:
        assert needle in flat, f"{needle!r} not in: {flat}"
    return flat


@pytest.fixture
def zoo(tmp_path) -> Path:
    return write_zoo(tmp_path / "zoo", make_state(seed=3), "safetensors")


def build(zoo: object, out: object, *extra: object):
    return run("build", "--zoo", zoo, "--out", out, "--executor", "local", "--quiet", "--alpha", "0.5", *extra)


# --- the I/O boundary ---------------------------------------------------------

def test_zoo_uri_with_an_unknown_scheme(tmp_path):
    out = tmp_path / "out"
    result = build("nosuch://x/zoo.yaml", out)
    assert_user_error(result, "nosuch://x/zoo.yaml", "unknown URI scheme 'nosuch'")
    assert not out.exists()


def test_task_file_that_is_a_symlink_loop(zoo, tmp_path):
    task_file = zoo.parent / f"{TASKS[0]}.safetensors"
    task_file.unlink()
    other = zoo.parent / "loop.safetensors"
    os.symlink(other, task_file)
    os.symlink(task_file, other)
    out = tmp_path / "out"
    assert_user_error(build(zoo, out), str(task_file), "symbolic link loop")
    assert not list(out.rglob("manifest.json")) if out.exists() else True


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 1 MiB tmpfs (root only): a real full disk."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "full"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mount -t tmpfs is not permitted here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_reconstruct_into_a_full_disk(zoo, tmp_path, tiny_tmpfs):
    big = {f"w{i}": torch.randn(256, 256) for i in range(6)}  # 1.5 MiB: more than the tmpfs holds
    states = {who: {k: v + 0.01 * j for k, v in big.items()} for j, who in enumerate(["base", *TASKS])}
    zoo = write_zoo(tmp_path / "bigzoo", states, "safetensors")
    arts = tmp_path / "arts"
    assert build(zoo, arts).exit_code == 0
    target = tiny_tmpfs / "model.safetensors"
    result = run("reconstruct", "--artifacts", arts, "--task", TASKS[0], "--alpha", "0.5", "--out", target)
    assert_user_error(result, str(target), "no space left")
    assert os.listdir(tiny_tmpfs) == []  # no partial file, no temporary file


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed on exit: nothing listens, a connect is refused


def test_reconstruct_against_an_unreachable_endpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    endpoint = f"http://127.0.0.1:{_dead_port()}"
    t0 = time.monotonic()
    result = run("reconstruct", "--artifacts", "s3://bucket/switches", "--task", "t", "--alpha", "0.5",
                 "--out", tmp_path / "m.safetensors", "--s3-endpoint", endpoint)
    took = time.monotonic() - t0
    flat = assert_user_error(result, endpoint, "does not answer", "within")
    assert took < 15, f"took {took:.1f} s: {flat}"
    assert not (tmp_path / "m.safetensors").exists()


# --- safetensors headers ------------------------------------------------------

def _write_raw_header(path: Path, header_json: str, data: bytes) -> None:
    h = header_json.encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


def test_header_with_a_duplicate_tensor_name(tmp_path):
    path = tmp_path / "dup.safetensors"
    entry = '{"dtype": "F32", "shape": [2], "data_offsets": [%d, %d]}'
    _write_raw_header(path, '{"w": %s, "w": %s}' % (entry % (0, 8), entry % (8, 16)), bytes(16))
    with pytest.raises(ZooError, match="duplicate tensor name 'w'") as ei:
        SafetensorsReader(str(path)).infos()
    assert str(path) in str(ei.value)


def test_header_with_overlapping_offsets(tmp_path):
    path = tmp_path / "overlap.safetensors"
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}
    _write_raw_header(path, json.dumps(header), bytes(16))
    with pytest.raises(ZooError, match="overlapping data offsets") as ei:
        SafetensorsReader(str(path)).infos()
    assert str(path) in str(ei.value) and "'a'" in str(ei.value) and "'b'" in str(ei.value)


def test_header_with_adjacent_and_empty_tensors_is_accepted(tmp_path):
    path = tmp_path / "ok.safetensors"
    save_file({"a": torch.ones(4), "e": torch.ones(0), "b": torch.zeros(2)}, str(path))
    assert set(SafetensorsReader(str(path)).infos()) == {"a", "b", "e"}


# --- the Ray boundary ---------------------------------------------------------

@pytest.fixture
def ray_session(ray_local):
    """The session's shared local Ray (tests/conftest.py), which this driver is connected to."""
    import ray

    return ray


def _run_on_ray(ray_session, fn):
    from tswitch_ray.distributed.executor import RayExecutor, WorkItem

    executor = RayExecutor(max_retries=0)
    return list(executor.map(fn, [WorkItem(0, ())]))


def test_a_workers_user_error_surfaces_as_itself(ray_session):
    def fail():
        raise ZooError("zoo manifest s3://b/zoo.yaml: the sentinel cause.")

    with pytest.raises(ZooError, match="the sentinel cause") as ei:
        _run_on_ray(ray_session, fail)
    assert type(ei.value) is ZooError  # not RayTaskError(ZooError)


def test_a_workers_storage_fault_is_translated(ray_session):
    def disk_full():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/out/part-0.parquet")

    with pytest.raises(StorageError, match="no space left") as ei:
        _run_on_ray(ray_session, disk_full)
    assert "/data/out/part-0.parquet" in str(ei.value)


def test_a_workers_unreachable_endpoint_is_a_service_error(ray_session):
    def refused():
        raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")

    with pytest.raises(ServiceError, match="does not answer"):
        _run_on_ray(ray_session, refused)


def test_a_workers_bug_keeps_its_traceback(ray_session):
    def bug():
        raise KeyError("a bug, not a user error")

    with pytest.raises(Exception) as ei:
        _run_on_ray(ray_session, bug)
    assert not isinstance(ei.value, TSwitchError)


# --- tracking -----------------------------------------------------------------

def test_tracking_server_dying_mid_eval_fails_fast_naming_the_results(tmp_path):
    """A real `mlflow server`, killed after the parent run started: the next log is a ServiceError in seconds
    (MLflow's own defaults retried for ~260 s) that says where the results are."""
    import sys

    from conftest import _server

    from tswitch_ray.tracking import HTTP_DEADLINE_S, Tracker, TrackingConfig

    def args_of(ports: list[int], folder: Path) -> list[str]:
        return [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(ports[0]),
                "--backend-store-uri", f"sqlite:///{folder}/mlflow.db", "--default-artifact-root",
                str(folder / "artifacts"), "--workers", "1"]

    results = str(tmp_path / "work" / "results.csv")
    server = _server("mlflow server", 1, args_of, lambda ports: f"http://127.0.0.1:{ports[0]}/health",
                     lambda r: r.ok, tmp_path / "mlflow")
    uri = f"http://127.0.0.1:{server.__enter__()[0]}"
    try:
        tracker = Tracker(TrackingConfig(uri=uri, experiment="faults"), results_uri=results)
        with pytest.raises(ServiceError) as ei, tracker.evaluation("e", {"zoo": "z"}):
            server.__exit__(None, None, None)  # the server dies mid-eval
            server = None
            t0 = time.monotonic()
            try:
                tracker.log_method("ta", {"method": "ta"}, {"avg": 0.5})
            finally:
                took = time.monotonic() - t0
    finally:
        if server is not None:
            server.__exit__(None, None, None)
    message = " ".join(str(ei.value).split())
    assert took < 30, f"took {took:.1f} s"
    assert uri in message and results in message and f"{HTTP_DEADLINE_S} s" in message, message
