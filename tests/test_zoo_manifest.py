"""Zoo manifest: schema validation, YAML errors, URI resolution."""

from __future__ import annotations

import fsspec
import pytest

from tswitch_ray.errors import ZooError
from tswitch_ray.zoo import load_zoo, parse_manifest, read_manifest, resolve_uri
from tswitch_ray.io.checkpoints import TorchStateDictReader
from tswitch_ray.io.safetensors import SafetensorsReader, ShardedSafetensorsReader

GOOD = """\
name: my-zoo
base: base.safetensors
tasks:
  - {name: cars, uri: cars.safetensors}
  - {name: dtd,  uri: s3://zoo/dtd.safetensors}
"""


def test_valid_manifest_and_defaults():
    m = parse_manifest(GOOD, "zoo.yaml")
    assert m.name == "my-zoo"
    assert [t.name for t in m.tasks] == ["cars", "dtd"]
    assert m.include == ["*"] and m.exclude == []


@pytest.mark.parametrize(
    "text, needle",
    [
        (GOOD + "extra_key: 1\n", "unknown key 'extra_key'"),
        (GOOD.replace("{name: cars, uri: cars.safetensors}", "{name: cars, uri: c.safetensors, alpha: 1}"),
         "unknown key 'tasks.0.alpha'"),
        (GOOD + "  - {name: cars, uri: other.safetensors}\n", "duplicate task names: ['cars']"),
        ("name: z\nbase: b.safetensors\ntasks: []\n", "'tasks'"),
        ("name: z\ntasks:\n  - {name: a, uri: a.safetensors}\n", "missing required key 'base'"),
        ("name: z\nbase: b.safetensors\ntasks:\n  - {name: a/b, uri: a.safetensors}\n", "'tasks.0.name'"),
        (GOOD + "include: []\n", "'include'"),
    ],
)
def test_invalid_manifests_raise_zoo_error_naming_file(text, needle):
    with pytest.raises(ZooError) as ei:
        parse_manifest(text, "/some/where/zoo.yaml")
    msg = str(ei.value)
    assert "/some/where/zoo.yaml" in msg
    assert needle in msg


def test_yaml_syntax_error_names_file_and_line():
    text = "name: z\nbase: b.safetensors\ntasks:\n  - {name: a, uri: a.safetensors\n  - x: [\n"
    with pytest.raises(ZooError) as ei:
        parse_manifest(text, "bad.yaml")
    msg = str(ei.value)
    assert "bad.yaml" in msg and "not valid YAML" in msg
    assert "line 5" in msg


def test_non_mapping_yaml():
    with pytest.raises(ZooError, match="must be a YAML mapping"):
        parse_manifest("- a\n- b\n", "list.yaml")


def test_missing_manifest_file(tmp_path):
    with pytest.raises(ZooError, match="does not exist") as ei:
        read_manifest(str(tmp_path / "nope.yaml"))
    assert str(tmp_path / "nope.yaml") in str(ei.value)


@pytest.mark.parametrize(
    "manifest, uri, expected",
    [
        ("/data/zoo/zoo.yaml", "base.safetensors", "/data/zoo/base.safetensors"),
        ("/data/zoo/zoo.yaml", "./t/a.pt", "/data/zoo/t/a.pt"),
        ("/data/zoo/zoo.yaml", "../other/b.safetensors", "/data/other/b.safetensors"),
        ("/data/zoo/zoo.yaml", "/abs/x.safetensors", "/abs/x.safetensors"),
        ("/data/zoo/zoo.yaml", "s3://b/k.safetensors", "s3://b/k.safetensors"),
        ("s3://bucket/zoos/z1/zoo.yaml", "base.safetensors", "s3://bucket/zoos/z1/base.safetensors"),
        ("s3://bucket/zoos/z1/zoo.yaml", "../shared/base", "s3://bucket/zoos/shared/base"),
        ("s3://bucket/zoo.yaml", "t.safetensors", "s3://bucket/t.safetensors"),
        ("file:///data/zoo/zoo.yaml", "t.safetensors", "file:///data/zoo/t.safetensors"),
        ("memory://zoo/zoo.yaml", "t.safetensors", "memory://zoo/t.safetensors"),
    ],
)
def test_resolve_uri(manifest, uri, expected):
    assert resolve_uri(manifest, uri) == expected


def test_relative_local_manifest_path_resolves_from_yaml_folder(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "zoo.yaml").write_text(
        "name: z\nbase: base.safetensors\ntasks:\n"
        "  - {name: a, uri: a.pt}\n  - {name: b, uri: hf_folder}\n  - {name: c, uri: /abs/c.safetensors}\n"
    )
    (tmp_path / "sub" / "hf_folder").mkdir()
    (tmp_path / "sub" / "hf_folder" / "model.safetensors").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    zoo = load_zoo("sub/zoo.yaml")
    assert zoo.base.uri == str(tmp_path / "sub" / "base.safetensors")
    assert isinstance(zoo.base.inner, SafetensorsReader)
    assert isinstance(zoo.tasks["a"].inner, TorchStateDictReader)
    assert zoo.tasks["a"].uri == str(tmp_path / "sub" / "a.pt")
    assert isinstance(zoo.tasks["b"].inner, ShardedSafetensorsReader)
    assert zoo.tasks["c"].uri == "/abs/c.safetensors"
    assert zoo.task_names == ["a", "b", "c"]


def test_manifest_on_memory_filesystem():
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/mzoo/zoo.yaml", GOOD.encode())
    zoo = load_zoo("memory://mzoo/zoo.yaml")
    assert zoo.base.uri == "memory://mzoo/base.safetensors"
    assert zoo.tasks["dtd"].uri == "s3://zoo/dtd.safetensors"
