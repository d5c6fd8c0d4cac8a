"""The commit lifecycle (start / write / complete / failed) of the folder sink, the artifact writer, build and merge."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import tswitch_ray.distributed.build as build_mod
import tswitch_ray.distributed.merge as merge_mod
from tswitch_ray.artifacts import ArtifactReader, ArtifactWriter, encode_switch
from tswitch_ray.distributed.build import BuildConfig, run_build
from tswitch_ray.distributed.merge import MERGE_MARKER, MergeConfig, run_merge
from tswitch_ray.errors import ArtifactError, ZooError
from tswitch_ray.io.atomic import sha256_hex
from tswitch_ray.io.sink import FolderSink
from tswitch_ray.zoo.synth import synth_zoo


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory) -> str:
    return synth_zoo("vit-b-32", 2, "fp16", str(tmp_path_factory.mktemp("zoo")), seed=5, layers=0)


def _sink(root: Path, **kw) -> FolderSink:
    args = dict(marker="out.json", fmt="test/out", identity={"method": "m", "options": {"k": 1}},
                staging_key="run-1", what="test outputs")
    args.update(kw)
    return FolderSink(str(root), **args)


def _no_work(*_a, **_k):
    raise AssertionError("work started although the output should have been refused first")


def _assert_one_paragraph(exc: BaseException, *needles: str) -> None:
    msg = str(exc)
    assert "\n" not in msg.strip(), msg
    for needle in needles:
        assert needle in msg, (needle, msg)


# --- FolderSink -------------------------------------------------------------------

def test_folder_sink_commits_outputs_with_marker_last(tmp_path):
    sink = _sink(tmp_path / "out")
    sink.start()
    parts = [sink.write("a/part-0.bin", b"hello "), sink.write("a/part-1.bin", b"world")]
    assert (tmp_path / "out" / ".staging" / "run-1" / "a" / "part-0.bin").read_bytes() == b"hello "

    def publish():
        assert not (tmp_path / "out" / "out.json").exists()  # the marker comes after the outputs
        data = b"".join(Path(p.uri).read_bytes() for p in parts)
        (tmp_path / "out" / "a.bin").write_bytes(data)
        from tswitch_ray.io.atomic import FileDigest
        return [FileDigest(f"{sink.uri}/a.bin", sha256_hex(data), len(data))]

    marker = sink.complete(parts, publish, details={"zoo": {"name": "z"}})
    on_disk = json.loads((tmp_path / "out" / "out.json").read_text())
    assert on_disk == marker
    assert marker["method"] == "m" and marker["options"] == {"k": 1} and marker["zoo"] == {"name": "z"}
    assert marker["outputs"] == [{"path": "a.bin", "sha256": sha256_hex(b"hello world"), "bytes": 11}]
    assert not (tmp_path / "out" / ".staging").exists()  # staging gone, .staging folder too
    assert sink.committed() == marker


def test_folder_sink_start_refuses_other_identity_and_allows_same(tmp_path):
    first = _sink(tmp_path / "out")
    first.start()
    first.complete([], lambda: [])
    _sink(tmp_path / "out", staging_key="run-2").start()  # same identity: may replace it
    other = _sink(tmp_path / "out", identity={"method": "m", "options": {"k": 2}})
    with pytest.raises(ArtifactError) as ei:
        other.start()
    _assert_one_paragraph(ei.value, str(tmp_path / "out"), "options {'k': 1}", "options {'k': 2}", "overwrite")
    _sink(tmp_path / "out", identity={"method": "m", "options": {"k": 2}}, overwrite=True).start()


def test_folder_sink_unwritable_destination_fails_at_start(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ArtifactError) as ei:
        _sink(blocker / "out").start()
    _assert_one_paragraph(ei.value, str(blocker / "out"), "cannot write test outputs there", "NotADirectoryError")


def test_folder_sink_failed_leaves_nothing(tmp_path):
    sink = _sink(tmp_path / "out")
    sink.start()
    sink.write("a/part-0.bin", b"x" * 100)
    sink.failed()
    assert [p.name for p in (tmp_path / "out").iterdir()] == []  # no staging, no marker, no output


def test_folder_sink_complete_refuses_a_changed_part(tmp_path):
    sink = _sink(tmp_path / "out")
    sink.start()
    part = sink.write("a/part-0.bin", b"x" * 100)
    Path(part.uri).write_bytes(b"y" * 100)  # changed after its writer recorded the checksum
    published = []
    with pytest.raises(ArtifactError, match="does not match the checksum"):
        sink.complete([part], lambda: published.append(1) or [])
    assert published == [] and sink.committed() is None


def test_folder_sink_on_s3(s3_bucket):
    bucket, opts = s3_bucket
    sink = FolderSink(f"{bucket}/merged", marker="out.json", fmt="test/out", identity={"method": "m"},
                      staging_key="run-1", what="test outputs", storage_options=opts)
    sink.start()
    part = sink.write("a/part-0.bin", b"abc")
    sink.complete([part], lambda: [])
    fs = sink.fs
    fs.invalidate_cache()
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.find(sink.root)) == ["out.json"]
    with pytest.raises(ArtifactError, match="cannot write test outputs there"):
        FolderSink(f"{bucket}-missing/merged", marker="out.json", fmt="f", identity={}, staging_key="k",
                   what="test outputs", storage_options=opts).start()


# --- ArtifactWriter ---------------------------------------------------------------

def _rows(seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    mask = rng.random(64) < 0.3
    enc = encode_switch(mask, rng.random(64) < 0.5)
    return [{"task": "cars", "tensor": "w", "alpha": 0.5, "scope": "tensor", "knob_mode": "rms", "shape": [64],
             "dtype": "F32", "kept": int(mask.sum()), "knob": 0.1, "encoded": enc}]


def _given() -> dict:
    return {"zoo": {"name": "toy", "fingerprint": "fp"}, "tasks": ["cars"], "alphas": [0.5], "scope": "tensor",
            "knob_mode": "rms"}


def test_artifact_writer_start_refuses_other_run_before_any_work(tmp_path):
    uri = str(tmp_path / "set")
    done = ArtifactWriter(uri, "run-a")
    done.start()
    done.write(0, _rows(0))
    done.complete(_given())
    ArtifactWriter(uri, "run-a").start()  # the same run may commit again
    with pytest.raises(ArtifactError) as ei:
        ArtifactWriter(uri, "run-b").start()
    _assert_one_paragraph(ei.value, uri, "run-a", "run-b")
    assert not (tmp_path / "set" / "parts" / "run-b").exists()
    ArtifactWriter(uri, "run-b", overwrite=True).start()


def test_artifact_writer_failed_removes_staged_parts(tmp_path):
    uri = str(tmp_path / "set")
    w = ArtifactWriter(uri, "run-a")
    w.start()
    w.write(0, _rows(1))
    assert (tmp_path / "set" / "parts" / "run-a").exists()
    w.failed()
    assert not (tmp_path / "set" / "parts" / "run-a").exists()
    with pytest.raises(ArtifactError, match="no committed artifact set"):
        ArtifactReader(uri)


def test_artifact_writer_unwritable_destination_fails_at_start(tmp_path):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ArtifactError) as ei:
        ArtifactWriter(str(tmp_path / "a-file" / "set"), "run-a").start()
    _assert_one_paragraph(ei.value, "cannot write artifacts there")


# --- build and merge --------------------------------------------------------------

def test_build_with_other_options_is_refused_before_any_work(tiny_zoo, tmp_path, monkeypatch):
    out = str(tmp_path / "switches")
    run_build(BuildConfig(zoo=tiny_zoo, out=out, alphas=[0.5], executor="local", show_progress=False))
    committed = (tmp_path / "switches" / "manifest.json").read_bytes()
    staged = sorted((tmp_path / "switches" / "parts").rglob("*"))
    monkeypatch.setattr(build_mod, "make_executor", _no_work)
    with pytest.raises(ArtifactError) as ei:
        run_build(BuildConfig(zoo=tiny_zoo, out=out, alphas=[0.9], executor="local", show_progress=False))
    _assert_one_paragraph(ei.value, out, "refusing to replace")
    assert sorted((tmp_path / "switches" / "parts").rglob("*")) == staged  # nothing staged for the refused run
    assert (tmp_path / "switches" / "manifest.json").read_bytes() == committed


def test_merge_with_other_method_is_refused_before_any_work(tiny_zoo, tmp_path, monkeypatch):
    out = tmp_path / "merged"
    run_merge(MergeConfig(zoo=tiny_zoo, method="ta", out=str(out), executor="local", show_progress=False))
    marker = json.loads((out / MERGE_MARKER).read_text())
    data = (out / "merged.safetensors").read_bytes()
    assert marker["method"] == "ta" and marker["options"] == {} and marker["format"] == "tswitch-ray/merge"
    assert marker["outputs"] == [{"path": "merged.safetensors", "sha256": sha256_hex(data), "bytes": len(data)}]
    assert sorted(p.name for p in out.iterdir()) == [MERGE_MARKER, "merged.safetensors"]  # no .staging left
    with monkeypatch.context() as m:
        m.setattr(merge_mod, "make_executor", _no_work)
        with pytest.raises(ArtifactError) as ei:
            run_merge(MergeConfig(zoo=tiny_zoo, method="ta", options={"scale": 0.5}, out=str(out),
                                  executor="local", show_progress=False))
    _assert_one_paragraph(ei.value, str(out), "merge.json", "refusing")
    assert (out / "merged.safetensors").read_bytes() == data
    summary = run_merge(MergeConfig(zoo=tiny_zoo, method="ta", options={"scale": 0.5}, out=str(out),
                                    executor="local", show_progress=False, overwrite=True))
    assert summary.outputs == [f"{out}/merged.safetensors"]
    assert json.loads((out / MERGE_MARKER).read_text())["options"] == {"scale": 0.5}


def test_merge_failing_midway_leaves_no_staging_and_no_marker(tmp_path, monkeypatch):
    """A NaN in the last tensor of one task fails the merge on its last shard, after the others were staged."""
    from safetensors.torch import load_file, save_file

    zoo = synth_zoo("vit-b-32", 2, "fp16", str(tmp_path / "zoo"), seed=6, layers=1)
    task = tmp_path / "zoo" / "task_02.safetensors"
    sd = load_file(str(task))
    sd["visual.ln_post.bias"][7] = float("nan")
    save_file(sd, str(task), metadata={"format": "pt"})
    staged_before_cleanup: list[str] = []
    real_failed = FolderSink.failed

    def spy_failed(self):
        staged_before_cleanup.extend(p.name for p in Path(self._staging).rglob("*.safetensors"))
        real_failed(self)

    monkeypatch.setattr(FolderSink, "failed", spy_failed)
    out = tmp_path / "merged"
    with pytest.raises(ZooError, match="visual.ln_post.bias"):
        run_merge(MergeConfig(zoo=zoo, method="ta", out=str(out), executor="local", show_progress=False,
                              shard_bytes=256 * 1024))
    assert len(staged_before_cleanup) >= 2  # shards before the bad one were staged ...
    assert list(out.iterdir()) == []  # ... and are gone: no staging, no marker, no output
