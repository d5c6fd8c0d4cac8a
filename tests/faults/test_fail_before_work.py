"""What can be found before any shard is encoded is: an existing committed set of other options, a destination
that cannot be written (read-only disk, a path under a file, a missing bucket, an object store that does not answer).
Each is refused with its user error and no shard function ever ran. (An unreachable tracking server before any
eval work: tests/test_eval_runner.py::test_unreachable_tracking_server_fails_before_any_work.)"""

from __future__ import annotations

import socket

import pytest

import tswitch_ray.distributed.build as build_mod
from faults.kit import tmpfs
from tswitch_ray.distributed.build import BuildConfig, run_build
from tswitch_ray.errors import TSwitchError


@pytest.fixture
def encoded(monkeypatch) -> list:
    """Shards the build encodes (the local executor runs them in this process)."""
    calls: list = []
    real = build_mod.shard_encode

    def counting(ctx, shard, *rest):
        calls.append(shard.shard_id)
        return real(ctx, shard, *rest)

    monkeypatch.setattr(build_mod, "shard_encode", counting)
    return calls


def _build(zoo, out, **kw) -> None:
    run_build(BuildConfig(zoo=str(zoo), out=str(out), alphas=[0.7], executor="local", show_progress=False,
                          shard_bytes=2**20, **kw))


def _dead_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_committed_set_of_other_options(zoo, clean, tmp_path, encoded):
    import shutil

    out = tmp_path / "switches"
    shutil.copytree(clean, out)
    with pytest.raises(TSwitchError, match="already exists there"):
        _build(zoo, out)
    assert encoded == []


def test_read_only_destination(zoo, tmp_path, encoded):
    with tmpfs(tmp_path / "ro", "1m") as disk:
        from faults.kit import remount

        remount(disk, "ro")
        with pytest.raises(TSwitchError, match="read-only|cannot write"):
            _build(zoo, disk / "switches")
    assert encoded == []


def test_destination_under_a_file(zoo, tmp_path, encoded):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(TSwitchError, match="cannot write artifacts there"):
        _build(zoo, tmp_path / "file" / "switches")
    assert encoded == []


def test_missing_bucket(zoo, s3_server, encoded):
    opts = {"client_kwargs": {"endpoint_url": s3_server}, "key": "testing", "secret": "testing"}
    with pytest.raises(TSwitchError, match="no-such-bucket"):
        _build(zoo, "s3://no-such-bucket/switches", storage_options=opts)
    assert encoded == []


def test_object_store_that_does_not_answer(zoo, encoded):
    endpoint = _dead_endpoint()
    opts = {"client_kwargs": {"endpoint_url": endpoint}, "key": "k", "secret": "s"}
    with pytest.raises(TSwitchError, match="does not answer"):
        _build(zoo, "s3://bucket/switches", storage_options=opts)
    assert encoded == []
