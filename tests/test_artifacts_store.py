"""Parquet artifact store: round trips on local disk, memory:// and a real S3 server; commit, resume, corruption."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tswitch_ray.artifacts import (
    ArtifactReader,
    ArtifactWriter,
    encode_switch,
    read_table,
    write_table_atomic,
)
from tswitch_ray.artifacts import writer as writer_mod
from tswitch_ray.errors import ArtifactError

TASKS = ["cars", "dtd"]
ALPHAS = [0.5, 0.9]
# Two shards, as the planner would group tensors by layer.
SHARDS = {0: {"l0.w": (24, 16), "l0.b": (24,)}, 1: {"l1.w": (8, 3, 4, 4)}}


def _switch(tau: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray, dict]:
    """P-Discard switch of one tensor, computed here with numpy sorts (independent of tswitch_ray.switch)."""
    flat = tau.reshape(-1)
    row: dict = {}
    mask = np.zeros(flat.size, bool)
    for sign, name in ((1, "pos"), (-1, "neg")):
        vals = np.sort(sign * flat[sign * flat > 0])
        d = int(np.floor(alpha * vals.size))
        t = float(vals[d - 1]) if d else 0.0
        mask |= sign * flat > t
        row.update({f"n_{name}": int(vals.size), f"d_{name}": d, f"t_{name}": t})
    kept = np.abs(flat[mask])
    row.update(kept=int(mask.sum()), sum_abs=float(kept.sum()), sum_sq=float((kept.astype(np.float64) ** 2).sum()),
               knob=float(np.sqrt((kept.astype(np.float64) ** 2).mean())) if kept.size else 0.0)
    return mask.reshape(tau.shape), (tau > 0) & mask.reshape(tau.shape), row


def _build_parts(writer: ArtifactWriter, seed: int = 0, shards=SHARDS, tasks=TASKS, alphas=ALPHAS, scope="tensor"):
    """Write every shard; return the expected switches {(task, alpha, tensor): (mask, positive, knob)}."""
    rng = np.random.default_rng(seed)
    truth = {}
    for sid, tensors in shards.items():
        rows = []
        for name, shape in tensors.items():
            for task in tasks:
                tau = rng.standard_t(3, size=shape).astype(np.float32)
                for alpha in alphas:
                    mask, positive, row = _switch(tau, alpha)
                    truth[(task, alpha, name)] = (mask, positive, row["knob"])
                    rows.append({"task": task, "tensor": name, "alpha": alpha, "scope": scope, "knob_mode": "rms",
                                 "shape": list(shape), "dtype": "F32", **row,
                                 "knob": row["knob"] if scope == "tensor" else None,
                                 "encoded": encode_switch(mask.reshape(-1), positive.reshape(-1))})
        writer.write(sid, rows)
    return truth


def _manifest(scope: str = "tensor", **kw) -> dict:
    return {"zoo": {"name": "toy", "fingerprint": "abc123"}, "tasks": TASKS, "alphas": ALPHAS, "scope": scope,
            "knob_mode": "rms", "extra": {"note": "test"}, **kw}


def _check_all(reader: ArtifactReader, truth: dict) -> None:
    for (task, alpha, name), (mask, positive, knob) in truth.items():
        m, p, k = reader.switch(task, alpha, name)
        assert m.shape == mask.shape and p.shape == mask.shape
        np.testing.assert_array_equal(m, mask)
        np.testing.assert_array_equal(p, positive)
        assert k == pytest.approx(knob, rel=1e-12)


def _roundtrip(uri: str, storage_options: dict | None = None) -> None:
    writer = ArtifactWriter(uri, "run-a", storage_options=storage_options)
    truth = _build_parts(writer)
    manifest = writer.complete(_manifest())
    reader = ArtifactReader(uri, storage_options=storage_options, verify="full")
    assert reader.tasks == TASKS and reader.alphas == ALPHAS
    assert reader.manifest["run_key"] == "run-a" and reader.manifest["extra"] == {"note": "test"}
    _check_all(reader, truth)
    # Streaming by tensor gives the same switches.
    for task in TASKS:
        for alpha in ALPHAS:
            seen = {name for name, *_ in reader.iter_switches(task, alpha)}
            assert seen == {n for s in SHARDS.values() for n in s}
            for name, m, p, k in reader.iter_switches(task, alpha):
                np.testing.assert_array_equal(m, truth[(task, alpha, name)][0])
    meta = reader.table()
    assert meta.num_rows == len(truth)
    assert "mask_bits" not in meta.column_names and "kept" in meta.column_names
    sub = reader.rows("dtd", 0.9)
    assert set(sub.column("tensor").to_pylist()) == {"l0.w", "l0.b", "l1.w"}
    # Totals: fp32 bytes of the task vectors each switch replaces, against the payload bytes.
    numel = sum(int(np.prod(s)) for sh in SHARDS.values() for s in sh.values())
    assert manifest["totals"]["fp32_bytes"] == 4 * numel * len(TASKS) * len(ALPHAS)
    assert manifest["totals"]["encoded_bytes"] == sum(meta.column("payload_bytes").to_pylist())
    assert manifest["totals"]["encoded_bytes"] < manifest["totals"]["fp32_bytes"] / 10


def test_roundtrip_local(tmp_path: Path) -> None:
    _roundtrip(str(tmp_path / "set"))
    files = sorted(p.relative_to(tmp_path / "set").as_posix() for p in (tmp_path / "set").rglob("*"))
    assert "manifest.json" in files and "parts/run-a/part-00000.parquet" in files
    assert not [f for f in files if ".tmp-" in f]  # no staging leftovers
    # A part is plain Parquet any tool can read: zstd, except the (incompressible) codec streams.
    pf = pq.ParquetFile(tmp_path / "set/parts/run-a/part-00000.parquet")
    group = pf.metadata.row_group(0)
    compression = {group.column(i).path_in_schema: group.column(i).compression for i in range(group.num_columns)}
    assert compression["task"] == "ZSTD"
    assert {compression[c] for c in ("mask_bits", "rem_bits", "sign_bits")} == {"UNCOMPRESSED"}
    # ... stored plain, without a dictionary or min/max statistics (both useless for bit streams).
    columns = {group.column(i).path_in_schema: group.column(i) for i in range(group.num_columns)}
    for c in ("mask_bits", "rem_bits", "sign_bits"):
        assert not columns[c].has_dictionary_page and not columns[c].is_stats_set, c
    assert columns["task"].is_stats_set


def test_roundtrip_memory() -> None:
    _roundtrip(f"memory://artifacts-{uuid.uuid4().hex}/set")


@pytest.mark.s3
def test_roundtrip_s3(s3_bucket) -> None:
    bucket, opts = s3_bucket
    _roundtrip(f"{bucket}/zoo/set", storage_options=opts)


def test_uncommitted_parts_are_invisible(tmp_path: Path) -> None:
    uri = str(tmp_path / "set")
    _build_parts(ArtifactWriter(uri, "run-a"))
    with pytest.raises(ArtifactError, match="manifest.json missing") as exc:
        ArtifactReader(uri)
    assert uri in str(exc.value)


def test_scope_model_knob_comes_from_manifest(tmp_path: Path) -> None:
    uri = str(tmp_path / "set")
    writer = ArtifactWriter(uri, "run-m")
    truth = _build_parts(writer, scope="model")
    with pytest.raises(ArtifactError, match="knob"):
        writer.complete(_manifest(scope="model"))
    knobs = [{"task": t, "alpha": a, "knob": 0.01 * (i + 1)} for i, (t, a) in enumerate((t, a) for t in TASKS for a in ALPHAS)]
    writer.complete(_manifest(scope="model", knobs=knobs))
    reader = ArtifactReader(uri)
    table = {(e["task"], e["alpha"]): e["knob"] for e in knobs}
    for (task, alpha, name), (mask, _, _) in truth.items():
        m, _, k = reader.switch(task, alpha, name)
        np.testing.assert_array_equal(m, mask)
        assert k == table[(task, alpha)]
    assert reader.table(columns=["knob"]).column("knob").null_count == len(truth)


def test_commit_refuses_incomplete_grid(tmp_path: Path) -> None:
    uri = str(tmp_path / "set")
    writer = ArtifactWriter(uri, "run-a")
    _build_parts(writer)
    with pytest.raises(ArtifactError, match="tasks"):
        writer.complete(_manifest(tasks=["cars"]))  # parts hold dtd too
    # Declared tensors that no shard wrote: a shard is missing.
    with pytest.raises(ArtifactError, match="missing"):
        writer.complete(_manifest(tensors=["l0.w", "l0.b", "l1.w", "l2.w"]))
    with pytest.raises(ArtifactError, match="missing"):
        writer.complete(_manifest(alphas=[0.5, 0.9, 0.99]))
    assert not (tmp_path / "set/manifest.json").exists()


def test_resume_with_has_part(tmp_path: Path) -> None:
    uri = str(tmp_path / "set")
    first = ArtifactWriter(uri, "run-a")
    truth = _build_parts(first)  # ... and the driver dies before committing
    part1 = tmp_path / "set/parts/run-a/part-00001.parquet"
    data = bytearray(part1.read_bytes())
    data[len(data) // 2] ^= 0xFF  # torn/corrupt write of shard 1
    part1.write_bytes(bytes(data))

    resumed = ArtifactWriter(uri, "run-a")
    assert resumed.has_part(0)
    assert not resumed.has_part(1)
    assert not resumed.has_part(2)
    assert set(resumed.existing_parts()) == {0}
    # A part whose sidecar never landed is not trusted either.
    os.unlink(tmp_path / "set/parts/run-a/part-00000.parquet.sha256")
    assert not resumed.has_part(0)
    # Another run_key never sees these parts.
    assert ArtifactWriter(uri, "run-b").existing_parts() == {}
    with pytest.raises(ArtifactError, match="part-00000"):
        resumed.complete(_manifest(), shard_ids=[0, 1])
    # Redo exactly the shards that are not there, with the same data.
    redo = _build_parts(resumed, shards={sid: SHARDS[sid] for sid in SHARDS if not resumed.has_part(sid)})
    assert set(redo) == set(truth)  # both shards were redone (same seed -> same data)
    resumed.complete(_manifest())
    _check_all(ArtifactReader(uri, verify="full"), truth)


def test_commit_overwrite_and_abort(tmp_path: Path) -> None:
    uri = str(tmp_path / "set")
    w1 = ArtifactWriter(uri, "run-a")
    _build_parts(w1, seed=1)
    w1.complete(_manifest())
    w1.complete(_manifest())  # retrying the same commit is fine
    w2 = ArtifactWriter(uri, "run-b")
    truth2 = _build_parts(w2, seed=2)
    with pytest.raises(ArtifactError, match="run-a"):
        w2.complete(_manifest())
    assert ArtifactReader(uri).manifest["run_key"] == "run-a"  # untouched
    with pytest.raises(ArtifactError, match="committed"):
        w1.failed()
    ArtifactWriter(uri, "run-b", overwrite=True).complete(_manifest())
    reader = ArtifactReader(uri, verify="full")
    assert reader.manifest["run_key"] == "run-b"
    _check_all(reader, truth2)
    assert not (tmp_path / "set/parts/run-a").exists()  # garbage of the replaced set removed
    w3 = ArtifactWriter(uri, "run-c")
    _build_parts(w3, seed=3)
    w3.failed()
    assert not (tmp_path / "set/parts/run-c").exists()
    assert ArtifactReader(uri).manifest["run_key"] == "run-b"


def test_corrupt_part_detected_and_named(tmp_path: Path) -> None:
    uri = str(tmp_path / "set")
    w = ArtifactWriter(uri, "run-a")
    _build_parts(w)
    w.complete(_manifest())
    part = tmp_path / "set/parts/run-a/part-00001.parquet"
    data = bytearray(part.read_bytes())
    data[len(data) // 3] ^= 0x01
    part.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="part-00001.parquet") as exc:
        ArtifactReader(uri, verify="full")
    assert "sha256" in str(exc.value) and uri in str(exc.value)
    # The other part is still fine to read without a full verification.
    ArtifactReader(uri).switch("cars", 0.5, "l0.w")


def test_corrupt_payload_page_detected_on_row_read(tmp_path: Path, monkeypatch) -> None:
    """Row reads touch only their row group, and page CRCs catch a flipped byte in it."""
    monkeypatch.setattr(writer_mod, "ROW_GROUP_PAYLOAD_BYTES", 1)  # one row per row group
    uri = str(tmp_path / "set")
    w = ArtifactWriter(uri, "run-a")
    truth = _build_parts(w)
    w.complete(_manifest())
    path = tmp_path / "set/parts/run-a/part-00000.parquet"
    md = pq.ParquetFile(path).metadata
    assert md.num_row_groups == md.num_rows
    rg = md.row_group(md.num_row_groups - 1)  # sorted by (task, alpha, tensor): dtd, 0.9, l0.w
    col = [rg.column(i) for i in range(rg.num_columns) if rg.column(i).path_in_schema == "mask_bits"][0]
    data = bytearray(path.read_bytes())
    data[col.data_page_offset + col.total_compressed_size - 2] ^= 0x10
    path.write_bytes(bytes(data))
    reader = ArtifactReader(uri)  # sizes unchanged: opens fine
    with pytest.raises(ArtifactError, match="part-00000") as exc:
        reader.switch("dtd", 0.9, "l0.w")
    assert "corrupt" in str(exc.value)
    # Rows in other row groups of the same part still read (and verify) fine.
    m, _, _ = reader.switch("cars", 0.5, "l0.w")
    np.testing.assert_array_equal(m, truth[("cars", 0.5, "l0.w")][0])


def test_missing_or_truncated_part_after_commit(tmp_path: Path) -> None:
    uri = str(tmp_path / "set")
    w = ArtifactWriter(uri, "run-a")
    _build_parts(w)
    w.complete(_manifest())
    part = tmp_path / "set/parts/run-a/part-00000.parquet"
    part.write_bytes(part.read_bytes()[:-10])
    with pytest.raises(ArtifactError, match="part-00000.parquet has"):
        ArtifactReader(uri)
    part.unlink()
    with pytest.raises(ArtifactError, match="part-00000.parquet listed in the manifest is missing"):
        ArtifactReader(uri)


def test_reader_errors_name_the_unknown(tmp_path: Path) -> None:
    uri = str(tmp_path / "set")
    w = ArtifactWriter(uri, "run-a")
    _build_parts(w)
    w.complete(_manifest())
    r = ArtifactReader(uri)
    with pytest.raises(ArtifactError, match="svhn"):
        r.switch("svhn", 0.5, "l0.w")
    with pytest.raises(ArtifactError, match="0.7"):
        r.switch("cars", 0.7, "l0.w")
    with pytest.raises(ArtifactError, match="nope"):
        r.switch("cars", 0.5, "nope")
    (tmp_path / "set/manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not a valid artifact manifest"):
        ArtifactReader(uri)


def test_write_table_atomic_roundtrip(tmp_path: Path, s3_bucket) -> None:
    table = pa.table({"method": ["tswitch", "ta"], "accuracy": [0.9, 0.7]})
    for uri, opts in ((str(tmp_path / "r/results.parquet"), None),
                      (f"memory://{uuid.uuid4().hex}/results.parquet", None),
                      (f"{s3_bucket[0]}/x/results.parquet", s3_bucket[1])):
        write_table_atomic(uri, table, storage_options=opts)
        assert read_table(uri, storage_options=opts).equals(table)
    with pytest.raises(ArtifactError, match="no such"):
        read_table(str(tmp_path / "missing.parquet"))


def test_manifest_is_json_listing_parts(tmp_path: Path) -> None:
    uri = str(tmp_path / "set")
    w = ArtifactWriter(uri, "run-a")
    _build_parts(w)
    w.complete(_manifest())
    m = json.loads((tmp_path / "set/manifest.json").read_text())
    fs = fsspec.filesystem("file")
    for p in m["parts"]:
        import hashlib

        data = fs.cat_file(str(tmp_path / "set" / p["path"]))
        assert hashlib.sha256(data).hexdigest() == p["sha256"] and len(data) == p["bytes"]
    assert {(s["task"], s["alpha"]) for s in m["switches"]} == {(t, a) for t in TASKS for a in ALPHAS}
    assert m["zoo"] == {"name": "toy", "fingerprint": "abc123"}
    for key in ("created_at", "tool_version", "codec", "totals", "scope", "knob_mode", "run_key"):
        assert key in m
