"""Growing zoos: a build of a zoo that gained, lost or changed tasks computes only those and commits a new version.

Checkpoints are real safetensors files (``safetensors.torch.save_file``), the
builds run the real build in-process, the CLI runs through typer's runner.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import tswitch_ray.distributed.build as build_mod
from tswitch_ray.artifacts import ArtifactReader, Registry
from tswitch_ray.cli import app
from tswitch_ray.distributed.build import BuildConfig, run_build
from tswitch_ray.errors import ArtifactError
from tswitch_ray.reconstruct import reconstruct_task

SHAPES = {"blocks.0.attn.weight": (48, 48), "blocks.0.attn.bias": (48,), "blocks.1.mlp.weight": (96, 48),
          "blocks.1.mlp.bias": (96,), "head.weight": (10, 48)}
SHARD_BYTES = 12_000  # several shards (each a layer or part of one) on this tiny zoo
ALPHAS = [0.5, 0.8]


def _checkpoint(path: Path, seed: int, base: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {n: torch.randn(s, generator=g) * (0.02 if base is not None else 1.0) + (base[n] if base else 0.0)
          for n, s in SHAPES.items()}
    save_file(sd, str(path))
    return sd


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    """θ0 and six fine-tunes t1..t6 (t6 is the 'retrained' checkpoint of a replaced task)."""
    root = tmp_path_factory.mktemp("ckpts")
    base = _checkpoint(root / "base.safetensors", 0)
    for i in range(1, 7):
        _checkpoint(root / f"t{i}.safetensors", i, base)
    return root


def _zoo(root: Path, name: str, tasks: dict[str, str]) -> str:
    """A zoo manifest over the shared checkpoints (task name -> file stem)."""
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": "growing", "base": "base.safetensors",
                                    "tasks": [{"name": t, "uri": f"{f}.safetensors"} for t, f in tasks.items()]}))
    return str(path)


def _build(zoo: str, out: str, scope: str = "tensor", **kw):
    return run_build(BuildConfig(zoo=zoo, out=out, alphas=ALPHAS, scope=scope, shard_bytes=SHARD_BYTES,
                                 executor="local", show_progress=False, **kw))


def _reconstructions(uri: str, tasks, tmp: Path, version: int | None = None) -> dict[tuple[str, float], dict]:
    got = {}
    for t in tasks:
        for a in ALPHAS:
            f = tmp / f"{abs(hash((uri, t, a, version)))}.safetensors"
            reconstruct_task(uri, t, a, str(f), version=version)
            got[(t, a)] = load_file(str(f))
    return got


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].keys() == b[k].keys()
        for n in a[k]:
            # byte equality of every reconstructed tensor
            assert a[k][n].dtype == b[k][n].dtype and a[k][n].numpy().tobytes() == b[k][n].numpy().tobytes(), (k, n)


def _row_digests(uri: str, version: int | None = None) -> set[str]:
    return set(ArtifactReader(uri, version=version).table(columns=["row_sha256"]).column("row_sha256").to_pylist())


def _part_files(uri: str) -> dict[str, float]:
    return {str(p.relative_to(uri)): p.stat().st_mtime_ns for p in Path(uri).rglob("*.parquet")}


FOUR = {f"t{i}": f"t{i}" for i in range(1, 5)}
FIVE = {f"t{i}": f"t{i}" for i in range(1, 6)}


@pytest.mark.parametrize("scope", ["tensor", "model"])
def test_a_fifth_task_computes_only_that_task_and_equals_a_clean_build(checkpoints, tmp_path, scope):
    out = str(tmp_path / "switches")
    first = _build(_zoo(checkpoints, "four", FOUR), out, scope)
    n = first.shards
    assert (first.version, first.tasks_computed, first.parts_computed, first.parts_reused) == (1, list(FOUR), 4 * n, 0)
    v1 = json.loads((Path(out) / "manifest.json").read_text())
    files_v1 = _part_files(out)

    second = _build(_zoo(checkpoints, "five", FIVE), out, scope)
    assert second.version == 2 and not second.up_to_date
    assert second.tasks_computed == ["t5"] and second.tasks_reused == list(FOUR)
    assert second.parts_computed == n and second.parts_reused == 4 * n  # one part per (task, shard)
    assert second.shards_reused == 0  # every shard ran, for t5 only

    v2 = json.loads((Path(out) / "manifest.json").read_text())
    # The kept tasks' parts are referenced where version 1 committed them, with the same digests: not copied.
    kept = [p for p in v2["parts"] if p["tasks"] != ["t5"]]
    assert sorted(map(json.dumps, kept)) == sorted(map(json.dumps, v1["parts"]))
    new_files = _part_files(out)
    assert {k: new_files[k] for k in files_v1} == files_v1  # untouched
    assert len(new_files) == len(files_v1) + n
    assert v2["changes"] == {"added": ["t5"], "removed": [], "replaced": [], "kept": list(FOUR)}
    assert v2["previous"] == {"version": 1, "run_key": v1["run_key"], "manifest_sha256": v1["manifest_sha256"]}

    clean = str(tmp_path / "clean")
    ref = _build(_zoo(checkpoints, "five", FIVE), clean, scope)
    assert ref.parts_computed == 5 * n
    assert _row_digests(out) == _row_digests(clean)
    for key in ("tasks", "alphas", "knobs", "switches", "tensors", "totals"):
        assert v2[key] == json.loads((Path(clean) / "manifest.json").read_text())[key], key
    _assert_same_tensors(_reconstructions(out, FIVE, tmp_path), _reconstructions(clean, FIVE, tmp_path))

    # Version 1 is still there, whole: readers name it explicitly.
    old = ArtifactReader(out, version=1)
    assert old.version == 1 and old.tasks == list(FOUR)
    old.verify()
    assert ArtifactReader(out).version == 2
    with pytest.raises(ArtifactError, match="version 3 was not committed"):
        ArtifactReader(out, version=3)


def test_removed_and_replaced_tasks_and_the_registry_lists_each_version(checkpoints, tmp_path):
    out = str(tmp_path / "switches")
    _build(_zoo(checkpoints, "five", FIVE), out)
    n = _build(_zoo(checkpoints, "five", FIVE), out).shards  # identical rerun: up to date

    removed = {t: f for t, f in FIVE.items() if t != "t2"}
    s = _build(_zoo(checkpoints, "no-t2", removed), out)
    assert (s.version, s.tasks_computed, s.tasks_removed, s.parts_computed, s.parts_reused) == (2, [], ["t2"], 0, 4 * n)
    assert ArtifactReader(out).tasks == list(removed)
    t3_v2 = _reconstructions(out, ["t3"], tmp_path)

    # t3 is retrained: its checkpoint is another file's content (a new size/stamp), the task name is the same.
    replaced = {**removed, "t3": "t6"}
    s = _build(_zoo(checkpoints, "t3-retrained", replaced), out)
    assert (s.version, s.tasks_computed, s.parts_computed) == (3, ["t3"], n)
    clean = str(tmp_path / "clean")
    _build(_zoo(checkpoints, "t3-retrained", replaced), clean)
    assert _row_digests(out) == _row_digests(clean)
    t3_v3 = _reconstructions(out, ["t3"], tmp_path)
    _assert_same_tensors(t3_v3, _reconstructions(clean, ["t3"], tmp_path))
    assert not torch.equal(t3_v3[("t3", 0.5)]["blocks.0.attn.weight"], t3_v2[("t3", 0.5)]["blocks.0.attn.weight"])
    # The CLI reads the earlier version on request: t3 as it was before it was retrained.
    dst = tmp_path / "t3-v2.safetensors"
    r = CliRunner().invoke(app, ["reconstruct", "--artifacts", out, "--task", "t3", "--alpha", "0.5", "--version", "2",
                                 "--out", str(dst)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    _assert_same_tensors({("t3", 0.5): load_file(str(dst))}, {("t3", 0.5): t3_v2[("t3", 0.5)]})

    reg = Registry(str(tmp_path))
    rows = reg.query(f"select version, current, n_tasks, added, removed, replaced, kept, valid from versions "
                     f"where uri = '{out}' order by version").to_pylist()
    assert rows == [
        {"version": 1, "current": False, "n_tasks": 5, "added": list(FIVE), "removed": [], "replaced": [],
         "kept": [], "valid": True},
        {"version": 2, "current": False, "n_tasks": 4, "added": [], "removed": ["t2"], "replaced": [],
         "kept": list(removed), "valid": True},
        {"version": 3, "current": True, "n_tasks": 4, "added": [], "removed": [], "replaced": ["t3"],
         "kept": ["t1", "t4", "t5"], "valid": True},
    ]
    assert reg.query(f"select version from artifacts where uri = '{out}'").to_pylist() == [{"version": 3}]
    result = CliRunner().invoke(app, ["registry", "versions", out], catch_exceptions=False, terminal_width=200)
    assert result.exit_code == 0 and "t2" in result.output and "t3" in result.output


def _summary_rows(output: str) -> dict[str, str]:
    """The CLI's build summary table as {row label: value} (cells wrapped over lines joined again)."""
    rows: dict[str, str] = {}
    label = ""
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if len(cells) == 2:
            label = cells[0] or label
            rows[label] = f"{rows.get(label, '')} {cells[1]}".strip() if cells[0] == "" else cells[1]
    return rows


def _cli_build(zoo: str, out: str):
    return CliRunner().invoke(app, ["build", "--zoo", zoo, "--out", out, "--alpha", "0.5", "--alpha", "0.8",
                                    "--shard-mb", "1", "--executor", "local", "--quiet"],
                              catch_exceptions=False, terminal_width=200)


def test_the_cli_says_what_a_version_computed_and_an_identical_rerun_does_nothing(checkpoints, tmp_path, monkeypatch):
    out = str(tmp_path / "switches")
    first = _cli_build(_zoo(checkpoints, "four", FOUR), out)
    assert first.exit_code == 0 and _summary_rows(first.output)["version"] == "1", first.output
    zoo = _zoo(checkpoints, "five", FIVE)
    second = _cli_build(zoo, out)
    rows = _summary_rows(second.output)
    assert second.exit_code == 0 and rows["version"] == "2", second.output
    n = int(rows["shards (reused)"].split()[0])
    assert rows["tasks computed / reused"] == f"1 / 4 (parts {n} / {4 * n}); computed t5", rows
    manifest = (Path(out) / "manifest.json").read_bytes()
    files = _part_files(out)

    monkeypatch.setattr(build_mod, "make_executor", _no_work)
    third = _cli_build(zoo, out)
    assert third.exit_code == 0, third.output
    flat = " ".join(third.output.split())  # rich wraps long lines where the paths make them long
    assert flat.startswith("up to date:") and "version 2 already holds these 5 tasks" in flat, flat
    s = run_build(BuildConfig(zoo=zoo, out=out, alphas=ALPHAS, shard_bytes=2**20, executor="local",
                              show_progress=False))
    assert s.up_to_date and s.version == 2 and s.parts_computed == 0 and s.parts_reused == 5 * s.shards
    assert (Path(out) / "manifest.json").read_bytes() == manifest and _part_files(out) == files
    assert sorted(p.name for p in (Path(out) / "versions").iterdir()) == ["v00001.json", "v00002.json"]


def _no_work(*args, **kwargs):
    raise AssertionError("the build started an executor: it did work it should have refused or skipped")


def test_an_existing_incompatible_output_is_refused_before_any_work(checkpoints, tmp_path, monkeypatch):
    out = str(tmp_path / "switches")
    _build(_zoo(checkpoints, "four", FOUR), out)
    manifest = (Path(out) / "manifest.json").read_bytes()
    files = _part_files(out)
    encoded = []
    monkeypatch.setattr(build_mod, "shard_encode", lambda *a: encoded.append(a))
    monkeypatch.setattr(build_mod, "make_executor", _no_work)
    for other in ({"scope": "model"}, {"knob": "mean"}):
        with pytest.raises(ArtifactError, match="cannot be a new version of it.*Nothing was computed") as e:
            _build(_zoo(checkpoints, "five", FIVE), out, **other)
        assert next(iter(other.values())) in str(e.value)
    with pytest.raises(ArtifactError, match="another shard plan"):
        run_build(BuildConfig(zoo=_zoo(checkpoints, "five", FIVE), out=out, alphas=ALPHAS, shard_bytes=2 * SHARD_BYTES,
                              executor="local", show_progress=False))
    assert encoded == []
    assert (Path(out) / "manifest.json").read_bytes() == manifest and _part_files(out) == files


def test_a_tampered_reused_part_is_detected_and_the_previous_version_stays(checkpoints, tmp_path):
    out = str(tmp_path / "switches")
    _build(_zoo(checkpoints, "four", FOUR), out)
    v1 = json.loads((Path(out) / "manifest.json").read_text())
    part = Path(out) / next(p["path"] for p in v1["parts"] if p["tasks"] == ["t2"])
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=f"{part.relative_to(out).as_posix()}.*does not match the sha256"):
        _build(_zoo(checkpoints, "five", FIVE), out)
    # Nothing committed: version 1 is still the head (and a reader still refuses the tampered part).
    head = json.loads((Path(out) / "manifest.json").read_text())
    assert head["version"] == 1 and head["manifest_sha256"] == v1["manifest_sha256"]
    with pytest.raises(ArtifactError, match="sha256"):
        ArtifactReader(out).verify()


def test_a_crashed_version_build_leaves_the_previous_version_visible(checkpoints, tmp_path, monkeypatch):
    out = str(tmp_path / "switches")
    _build(_zoo(checkpoints, "four", FOUR), out)
    before = _row_digests(out)
    real = build_mod.shard_encode
    calls = []

    def crash_after_one(*args):
        if calls:
            raise KeyboardInterrupt  # the process is stopped mid-build
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(build_mod, "shard_encode", crash_after_one)
    with pytest.raises(KeyboardInterrupt):
        _build(_zoo(checkpoints, "five", FIVE), out)
    r = ArtifactReader(out)
    assert r.version == 1 and r.tasks == list(FOUR) and _row_digests(out) == before
    monkeypatch.setattr(build_mod, "shard_encode", real)
    s = _build(_zoo(checkpoints, "five", FIVE), out)  # resumes: the part t5 staged before the crash is reused
    assert s.version == 2 and s.tasks_computed == ["t5"] and s.parts_computed == s.shards - 1


def test_a_checkpoint_rewritten_in_place_is_computed_again(checkpoints, tmp_path):
    root = tmp_path / "zoo"
    root.mkdir()
    for f in ("base", "t1", "t2"):
        (root / f"{f}.safetensors").write_bytes((checkpoints / f"{f}.safetensors").read_bytes())
    zoo = _zoo(root, "two", {"t1": "t1", "t2": "t2"})
    out = str(tmp_path / "switches")
    _build(zoo, out)
    target = root / "t2.safetensors"
    target.write_bytes((checkpoints / "t6.safetensors").read_bytes())
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a later stamp, as a real rewrite has
    s = _build(zoo, out)
    assert (s.version, s.tasks_computed, s.tasks_reused) == (2, ["t2"], ["t1"])
    assert ArtifactReader(out).manifest["changes"]["replaced"] == ["t2"]


@pytest.mark.s3
def test_versions_on_s3_reference_the_committed_parts(checkpoints, s3_bucket, tmp_path):
    """On an object store the kept parts are referenced by their relative keys too: nothing is copied."""
    import fsspec

    bucket, opts = s3_bucket
    fs = fsspec.filesystem("s3", **opts)
    for f in ("base", "t1", "t2", "t3"):
        fs.put(str(checkpoints / f"{f}.safetensors"), f"{bucket}/zoo/{f}.safetensors")
    for name, tasks in (("two", {"t1": "t1", "t2": "t2"}), ("three", {"t1": "t1", "t2": "t2", "t3": "t3"})):
        fs.pipe_file(f"{bucket}/zoo/{name}.yaml", Path(_zoo(tmp_path, name, tasks)).read_bytes())
    out = f"{bucket}/switches"
    _build(f"{bucket}/zoo/two.yaml", out, storage_options=opts)
    keys_v1 = {p for p in fs.find(f"{bucket}/switches/parts") if p.endswith(".parquet")}
    s = _build(f"{bucket}/zoo/three.yaml", out, storage_options=opts)
    assert (s.version, s.tasks_computed, s.tasks_reused) == (2, ["t3"], ["t1", "t2"])
    keys_v2 = {p for p in fs.find(f"{bucket}/switches/parts") if p.endswith(".parquet")}
    assert keys_v1 <= keys_v2 and len(keys_v2) == len(keys_v1) * 3 // 2
    assert ArtifactReader(out, storage_options=opts).tasks == ["t1", "t2", "t3"]
    old = ArtifactReader(out, storage_options=opts, version=1)
    assert old.tasks == ["t1", "t2"]
    old.verify()
    rows = Registry(bucket, storage_options=opts).query("select version, added from versions order by version")
    assert rows.to_pylist() == [{"version": 1, "added": ["t1", "t2"]}, {"version": 2, "added": ["t3"]}]


def test_overwrite_starts_a_new_history_and_drops_what_it_no_longer_lists(checkpoints, tmp_path):
    out = str(tmp_path / "switches")
    _build(_zoo(checkpoints, "four", FOUR), out)
    _build(_zoo(checkpoints, "five", FIVE), out)
    s = _build(_zoo(checkpoints, "five", FIVE), out, scope="model", overwrite=True)
    assert (s.version, s.tasks_computed) == (1, list(FIVE))
    r = ArtifactReader(out)
    assert r.version == 1 and r.scope == "model"
    listed = {p["path"].split("/")[1] for p in r.manifest["parts"]}
    assert {p.name for p in (Path(out) / "parts").iterdir()} == listed  # the tensor-scope parts are gone
    assert sorted(p.name for p in (Path(out) / "versions").iterdir()) == ["v00001.json"]
    assert Registry(out).query("select version, current from versions").to_pylist() == [
        {"version": 1, "current": True}]


def test_a_version_committed_meanwhile_is_not_overwritten(checkpoints, tmp_path):
    from tswitch_ray.artifacts.versions import VersionStore
    from tswitch_ray.distributed.build import build_options
    from tswitch_ray.distributed.incremental import build_keys, plan_version
    from tswitch_ray.distributed.planner import plan_shards
    from tswitch_ray.zoo import load_zoo

    out = str(tmp_path / "switches")
    _build(_zoo(checkpoints, "four", FOUR), out)
    zoo = load_zoo(_zoo(checkpoints, "five", FIVE))
    cfg = BuildConfig(zoo=zoo.manifest_uri, out=out, alphas=ALPHAS, shard_bytes=SHARD_BYTES)
    keys = build_keys(zoo, build_options(cfg), plan_shards(zoo.tensor_infos(), SHARD_BYTES))
    planned = plan_version(VersionStore(out), keys, overwrite=False)
    assert planned.version == 2 and planned.compute == ["t5"]
    other = _build(_zoo(checkpoints, "t3-retrained", {**FOUR, "t3": "t6"}), out)  # commits version 2 first
    assert other.version == 2
    head = (Path(out) / "manifest.json").read_bytes()
    with pytest.raises(ArtifactError, match="another build committed a new version here while this one ran"):
        VersionStore(out).commit(keys.run_key, {}, {}, planned.reused_parts, planned.seen_head, overwrite=False)
    assert (Path(out) / "manifest.json").read_bytes() == head


def test_an_earlier_version_file_replaced_by_another_valid_manifest_is_refused(checkpoints, tmp_path):
    """Each version is reached from the head through the digests of the versions after it."""
    out = tmp_path / "switches"
    other = tmp_path / "other"
    _build(_zoo(checkpoints, "four", FOUR), str(out))
    _build(_zoo(checkpoints, "five", FIVE), str(out))
    _build(_zoo(checkpoints, "five", FIVE), str(other))  # a valid version-1 manifest, of another set
    (out / "versions" / "v00001.json").write_bytes((other / "manifest.json").read_bytes())
    with pytest.raises(ArtifactError, match="v00001.json: this is not the manifest version 2 was built on"):
        ArtifactReader(str(out), version=1)
    assert ArtifactReader(str(out)).version == 2  # the head is unaffected
    rows = Registry(str(out)).query("select version, valid from versions order by version").to_pylist()
    assert rows == [{"version": 1, "valid": False}, {"version": 2, "valid": True}]


def test_an_all_task_merge_is_made_again_only_when_its_tasks_or_checkpoints_changed(checkpoints, tmp_path, monkeypatch):
    import tswitch_ray.distributed.merge as merge_mod
    from tswitch_ray.distributed.merge import MergeConfig, run_merge

    root = tmp_path / "zoo"
    root.mkdir()
    for f in ("base", "t1", "t2"):
        (root / f"{f}.safetensors").write_bytes((checkpoints / f"{f}.safetensors").read_bytes())
    zoo = _zoo(root, "two", {"t1": "t1", "t2": "t2"})
    out = tmp_path / "ties"
    cfg = MergeConfig(zoo=zoo, method="ties", out=str(out), executor="local", show_progress=False)
    first = run_merge(cfg)
    marker, merged = (out / "merge.json").read_bytes(), (out / "merged.safetensors").read_bytes()
    with monkeypatch.context() as m:
        m.setattr(merge_mod, "make_executor", _no_work)
        again = run_merge(cfg)
        assert again.up_to_date and again.outputs == first.outputs and again.bytes_read == 0
        r = CliRunner().invoke(app, ["merge", "--zoo", zoo, "--method", "ties", "--out", str(out), "--executor",
                                     "local", "-q"], catch_exceptions=False, terminal_width=200)
        assert r.exit_code == 0 and " ".join(r.output.split()).startswith("up to date:"), r.output
    assert (out / "merge.json").read_bytes() == marker and (out / "merged.safetensors").read_bytes() == merged

    # t2 retrained in place (same name, new content and stamp): the merge is made again.
    target = root / "t2.safetensors"
    target.write_bytes((checkpoints / "t6.safetensors").read_bytes())
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    third = run_merge(cfg)
    assert not third.up_to_date and (out / "merged.safetensors").read_bytes() != merged
    # A zoo that gained a task is another merge: refused in place unless overwrite, as any other identity.
    grown = _zoo(root, "three", {"t1": "t1", "t2": "t2", "t3": "t2"})
    with pytest.raises(ArtifactError, match="refusing to replace"):
        run_merge(cfg.model_copy(update={"zoo": grown}))
    assert not run_merge(cfg.model_copy(update={"zoo": grown, "overwrite": True})).up_to_date
