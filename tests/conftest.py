"""Shared fixtures: a real S3 server (moto's, on 127.0.0.1) and Ray sessions."""

from __future__ import annotations

import os
import socket
import uuid

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` (sqlite backend, local artifact root) on 127.0.0.1; yields its URI."""
    import subprocess
    import sys
    import time

    import requests

    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--default-artifact-root", str(root / "artifacts"),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=open(root / "server.log", "wb"),
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {(root / 'server.log').read_text()[-2000:]}")
        try:
            if requests.get(f"{uri}/health", timeout=1).ok:
                break
        except requests.RequestException:
            time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError("mlflow server did not start within 120 s")
    yield uri
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="session")
def tiny_demo_zoo(tmp_path_factory):
    """A 3-task demo zoo made by the real recipe at a tiny size (seconds, not minutes)."""
    from tswitch_ray.eval.demo_zoo import DemoZooConfig, build_demo_zoo

    cfg = DemoZooConfig(tasks=("digits", "glyphs", "signs"), width=32, layers=2, heads=2, embed_dim=16,
                        n_train=96, n_eval=48, n_unlabeled=32, pretrain_steps=4, pretrain_batch=32,
                        probe_steps=20, finetune_steps=4, finetune_batch=16)
    return build_demo_zoo(tmp_path_factory.mktemp("demo") / "zoo", seed=0, config=cfg)
