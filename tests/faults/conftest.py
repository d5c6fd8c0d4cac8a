"""Fixtures of the fault suite (the session's own in tests/conftest.py: ray_cluster, s3_server, mlflow_server...)."""

from __future__ import annotations

from pathlib import Path

import pytest

from faults.kit import Weed


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> Path:
    """A small synthetic ViT zoo: 3 tasks, 2 layers (several 1 MiB shards, seconds to build)."""
    from tswitch_ray.zoo.synth import synth_zoo

    return Path(synth_zoo("vit-b-32", 3, "fp16", str(tmp_path_factory.mktemp("zoo")), seed=1, layers=2))


@pytest.fixture(scope="session")
def clean(zoo, tmp_path_factory) -> Path:
    """The artifact set of an undisturbed local build of :func:`zoo` (α 0.5 and 0.9, 1 MiB shards)."""
    from tswitch_ray.distributed.build import BuildConfig, run_build

    out = tmp_path_factory.mktemp("clean") / "switches"
    run_build(BuildConfig(zoo=str(zoo), out=str(out), alphas=[0.5, 0.9], executor="local", show_progress=False,
                          shard_bytes=2**20))
    return out


@pytest.fixture
def weed(tmp_path):
    """A SeaweedFS server of the test's own, killable and restartable (:class:`faults.kit.Weed`)."""
    server = Weed(tmp_path / "weed")
    server.start()
    try:
        yield server
    finally:
        server.kill()
