"""The one URI resolver (tswitch_ray/io/fs.py) and the three spellings its callers rely on.

The expected strings are what the product produced before the three resolvers
(io, zoo manifest, eval config) became one: eval-config strings end up in
cache keys and results, manifest strings in artifact manifests, so a changed
spelling would be a changed output even where it names the same file.
"""

from __future__ import annotations

import os

import pytest
import yaml

from tswitch_ray.eval.config import load_eval_config
from tswitch_ray.eval.config import resolve_uri as config_resolve_uri
from tswitch_ray.io.fs import resolve_against_file, resolve_uri
from tswitch_ray.zoo.manifest import resolve_uri as manifest_resolve_uri

# (base_dir, uri, joined as strings, tidy_local=True)
FOLDER_CASES = [
    ("/a/b", "x", "/a/b/x", "/a/b/x"),
    ("/a/b/", "x", "/a/b/x", "/a/b/x"),
    ("/a/b", "x/y.safetensors", "/a/b/x/y.safetensors", "/a/b/x/y.safetensors"),
    ("/a/b", "./x", "/a/b/./x", "/a/b/x"),
    ("/a/b", "./a/./b", "/a/b/./a/./b", "/a/b/a/b"),
    ("/a/b", "../x", "/a/b/../x", "/a/b/../x"),  # pathlib keeps "..": a symlinked folder may be in between
    ("/a/b", "a/../x", "/a/b/a/../x", "/a/b/a/../x"),
    ("/a/b", "x/", "/a/b/x/", "/a/b/x"),
    ("/a/b", "a//b", "/a/b/a//b", "/a/b/a/b"),
    ("/a/b", "", "/a/b/", "/a/b"),
    ("/a/b", "/abs/x", "/abs/x", "/abs/x"),
    ("/a/b", "s3://o/k", "s3://o/k", "s3://o/k"),
    ("/a/b", "file:///f", "file:///f", "file:///f"),
    ("", "x", "x", "x"),
    ("", "./x", "./x", "x"),
    ("", "../x", "../x", "../x"),
    ("", "", "", "."),
    ("rel/dir", "./x", "rel/dir/./x", "rel/dir/x"),
    # object stores: joined as strings in both spellings
    ("s3://bk/z", "x", "s3://bk/z/x", "s3://bk/z/x"),
    ("s3://bk/z/", "x", "s3://bk/z/x", "s3://bk/z/x"),
    ("s3://bk/z", "./x", "s3://bk/z/./x", "s3://bk/z/./x"),
    ("s3://bk/z", "../x", "s3://bk/z/../x", "s3://bk/z/../x"),
    ("s3://bk/z", "x/", "s3://bk/z/x/", "s3://bk/z/x/"),
    ("s3://bk/z", "/abs/x", "/abs/x", "/abs/x"),
    ("s3://bk/z", "memory://m/k", "memory://m/k", "memory://m/k"),
    ("memory://m/x", "./a/./b", "memory://m/x/./a/./b", "memory://m/x/./a/./b"),
]


@pytest.mark.parametrize("base, uri, joined, tidy", FOLDER_CASES)
def test_resolve_against_a_folder(base, uri, joined, tidy):
    assert resolve_uri(base, uri) == joined
    assert resolve_uri(base, uri, tidy_local=True) == tidy


@pytest.mark.parametrize("base, uri, joined, tidy", FOLDER_CASES)
def test_eval_config_paths_are_spelled_as_pathlib_does(base, uri, joined, tidy):
    assert config_resolve_uri(base, uri) == tidy


# (file_uri, uri, resolved); relative local files resolve from the working directory (see the fixture)
FILE_CASES = [
    ("/a/b/zoo.yaml", "x", "/a/b/x"),
    ("/a/b/zoo.yaml", "./x", "/a/b/x"),
    ("/a/b/zoo.yaml", "./a/./b", "/a/b/a/b"),
    ("/a/b/zoo.yaml", "../x", "/a/x"),
    ("/a/b/zoo.yaml", "a/../x", "/a/b/x"),
    ("/a/b/zoo.yaml", "x/", "/a/b/x"),
    ("/a/b/zoo.yaml", "a//b", "/a/b/a/b"),
    ("/a/b/zoo.yaml", "", "/a/b"),
    ("/a/b/zoo.yaml", "/abs/x", "/abs/x"),
    ("/a/b/zoo.yaml", "s3://o/k", "s3://o/k"),
    ("zoo.yaml", "x", "{cwd}/x"),
    ("zoo.yaml", "../x", "{parent}/x"),
    ("rel/zoo.yaml", "./x", "{cwd}/rel/x"),
    ("rel/zoo.yaml", "../x", "{cwd}/x"),
    ("s3://bk/z/zoo.yaml", "x", "s3://bk/z/x"),
    ("s3://bk/z/zoo.yaml", "./x", "s3://bk/z/x"),
    ("s3://bk/z/zoo.yaml", "../x", "s3://bk/x"),
    ("s3://bk/z/zoo.yaml", "x/", "s3://bk/z/x"),
    ("s3://bk/zoo.yaml", "x", "s3://bk/x"),
    ("s3://bk/z/zoo.yaml", "/abs/x", "/abs/x"),
    ("s3://bk/z/zoo.yaml", "memory://m/k", "memory://m/k"),
    ("file:///a/zoo.yaml", "../x", "file:///x"),
    ("file://a/zoo.yaml", "x", "file:///a/x"),
    ("memory://m/zoo.yaml", "./x", "memory://m/x"),
]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A known working directory (without symlinks) for the relative local manifests."""
    cwd = tmp_path / "work" / "here"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    return os.getcwd()


@pytest.mark.parametrize("file_uri, uri, expected", FILE_CASES)
def test_resolve_against_a_file(file_uri, uri, expected, workdir):
    want = expected.format(cwd=workdir, parent=os.path.dirname(workdir))
    assert resolve_against_file(file_uri, uri) == want
    assert manifest_resolve_uri(file_uri, uri) == want


def test_eval_config_resolves_from_its_folder(tmp_path):
    """Through the real loader: the strings that reach EvalConfig, and with them the cache keys."""
    folder = tmp_path / "cfgs"
    folder.mkdir()
    cfg_file = folder / "eval.yaml"
    cfg_file.write_text(yaml.safe_dump({
        "zoo": "./zoo/zoo.yaml",
        "artifacts": "../switches/",
        "work_dir": "s3://bk/work",
        "methods": [{"method": "tswitch", "alpha": 0.6, "artifacts": "a//b"}],
        "data": {"t": {"eval": "data/t/eval.parquet", "unlabeled": "/abs/t/train.parquet"}},
    }))
    cfg = load_eval_config(str(cfg_file))
    base = str(folder.resolve())
    assert cfg.zoo == f"{base}/zoo/zoo.yaml"
    assert cfg.artifacts == f"{base}/../switches"
    assert cfg.work_dir == "s3://bk/work"
    assert cfg.methods[0].artifacts == f"{base}/a/b"
    assert cfg.data["t"].eval == f"{base}/data/t/eval.parquet"
    assert cfg.data["t"].unlabeled == "/abs/t/train.parquet"
