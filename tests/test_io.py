"""The I/O layer: one atomic writer (local and a real S3 server), URI helpers, and the rule that only io/ opens filesystems."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import pytest

import tswitch_ray
from tswitch_ray.errors import ZooError
from tswitch_ray.io.atomic import atomic_write, exists, read_bytes, remove_tree
from tswitch_ray.io.fs import join_uri, normalize_uri, open_fs, resolve_uri

PACKAGE = Path(tswitch_ray.__file__).parent


def test_no_url_to_fs_outside_io():
    """Every filesystem is opened by tswitch_ray.io.fs.open_fs; no other module calls fsspec.core.url_to_fs."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith("io/"):
            continue
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            if re.search(r"\burl_to_fs\b", line):
                offenders.append(f"{rel}:{n}: {line.strip()}")
    assert not offenders, "url_to_fs outside tswitch_ray/io:\n" + "\n".join(offenders)
    calls = [p.relative_to(PACKAGE).as_posix() for p in (PACKAGE / "io").rglob("*.py")
             if re.search(r"url_to_fs\(", p.read_text())]
    assert calls == ["io/fs.py"], calls  # and inside io/, exactly one module does it


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


def test_atomic_write_local_complete_and_no_temp_left(tmp_path):
    target = tmp_path / "new" / "deeper" / "data.bin"  # missing folders are made
    payload = os.urandom(3 << 20)
    atomic_write(str(target), payload)
    assert target.read_bytes() == payload
    assert _leftovers(target.parent) == []
    atomic_write(str(target), b"second")  # replaces in place
    assert target.read_bytes() == b"second"
    assert _leftovers(target.parent) == []
    assert read_bytes(str(target)) == b"second" and exists(str(target))
    atomic_write(f"file://{tmp_path}/url.bin", memoryview(b"by url"))  # file:// URLs and buffers too
    assert (tmp_path / "url.bin").read_bytes() == b"by url"


def test_atomic_write_local_failure_keeps_old_content(tmp_path, monkeypatch):
    target = tmp_path / "data.bin"
    target.write_bytes(b"old")

    def no_rename(src, dst):
        raise OSError("disk went away")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(OSError, match="disk went away"):
        atomic_write(str(target), b"new content")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"  # readers never saw a partial file
    assert _leftovers(tmp_path) == []  # and the temporary file is gone


def test_atomic_write_s3_is_one_put_of_the_finished_object(s3_bucket, caplog):
    """On an object store the data goes up in one PUT to its final key: no temporary object, copy or delete."""
    bucket, opts = s3_bucket
    uri = f"{bucket}/results/run/table.bin"
    payload = os.urandom(1 << 20)
    with caplog.at_level(logging.INFO, logger="werkzeug"):  # the S3 server logs every request it answers
        atomic_write(uri, payload, opts)
    requests = [m.split('"')[1] for m in caplog.messages if '"' in m]
    key = uri.removeprefix("s3://")
    assert [r.split()[:2] for r in requests] == [["PUT", f"/{key}"]], requests
    assert read_bytes(uri, opts) == payload
    fs, path = open_fs(bucket, opts)
    fs.invalidate_cache()
    assert [p.rsplit("/", 1)[-1] for p in fs.find(path)] == ["table.bin"]  # nothing staged beside it
    remove_tree(f"{bucket}/results", opts)
    assert not exists(uri, opts)
    remove_tree(f"{bucket}/results", opts)  # removing nothing is fine


def test_read_bytes_missing_names_the_file(tmp_path):
    with pytest.raises(ZooError, match=r"missing\.bin: file not found"):
        read_bytes(str(tmp_path / "missing.bin"))


def test_uri_helpers():
    assert join_uri("s3://b/x/", "y.json") == "s3://b/x/y.json"
    assert join_uri("/a/b", "c") == "/a/b/c"
    assert resolve_uri("s3://b/zoo", "heads") == "s3://b/zoo/heads"
    assert resolve_uri("s3://b/zoo", "/abs/heads") == "/abs/heads"
    assert resolve_uri("s3://b/zoo", "memory://m/heads") == "memory://m/heads"
    assert resolve_uri("", "rel") == "rel"
    assert normalize_uri("/tmp/a/../b/") == "/tmp/b"
    assert normalize_uri("memory://x/y/") == "memory:///x/y"
    fs, path = open_fs("/tmp//a/./b/", {"key": "only for remote stores"})
    assert path == "/tmp/a/b" and not fs.storage_options  # local filesystems never get the remote options


def test_ranged_reads_agree_across_reader_types(tmp_path):
    """read_range / read_ranges (the public ranged reads) give a tensor's stored bytes for every format and store."""
    import fsspec
    import torch

    from tswitch_ray.io.checkpoints import CheckpointReader
    from tswitch_ray.io.readers import open_checkpoint
    from tswitch_ray.io.safetensors import save_safetensors, save_sharded

    g = torch.Generator().manual_seed(0)
    sd = {"a": torch.randn(40, 30, generator=g), "b": torch.randn(7, generator=g).half(), "e": torch.zeros(0, 3)}
    save_safetensors(sd, str(tmp_path / "m.safetensors"))
    save_sharded(sd, str(tmp_path / "sharded"), max_shard_bytes=1000)
    torch.save(sd, tmp_path / "m.pt")
    mem = f"memory://io-ranges-{tmp_path.name}/m.safetensors"
    with fsspec.open(mem, "wb") as f:  # a non-local store: read_ranges goes through cat_ranges
        f.write((tmp_path / "m.safetensors").read_bytes())
    requests = [("a", 0, 16), ("a", 4000, 4800), ("b", 2, 14), ("e", 0, 0), ("b", 0, 100)]
    want = [sd[n].contiguous().view(-1).view(torch.uint8)[s:e].numpy().tobytes() for n, s, e in requests]
    for uri in (str(tmp_path / "m.safetensors"), str(tmp_path / "sharded"), str(tmp_path / "m.pt"), mem):
        reader = open_checkpoint(uri)
        assert isinstance(reader, CheckpointReader)
        assert [bytes(reader.read_range(n, s, e)) for n, s, e in requests] == want, uri
        assert [bytes(b) for b in reader.read_ranges(requests)] == want, uri
