"""Parquet artifact store: parts written by workers, one manifest committed last.

Layout of an artifact set at ``OUT`` (docs/ARTIFACTS.md has every field)::

    OUT/manifest.json                                  written last, atomically
    OUT/parts/<run_key>/part-<shard:05d>.parquet       one per shard, zstd
    OUT/parts/<run_key>/part-<shard:05d>.parquet.sha256  sidecar: PartInfo JSON

Atomicity: on a local disk every file is written to a hidden temporary name
in its final folder and ``os.replace``-d into place; on object stores
(s3://, memory://) a single PUT is atomic, so files are written directly.
The sidecar is written after its part, so a sidecar that verifies proves the
part is complete. A reader only trusts what ``manifest.json`` lists, hence
staged-but-uncommitted parts are invisible.

All I/O goes through fsspec (``fsspec.core.url_to_fs``).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import logging
import math
import os
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from pydantic import ValidationError

from tswitch_ray import __version__
from tswitch_ray.artifacts.encoding import CODEC_NAME, EncodedSwitch, decode_switch, payload_sha256
from tswitch_ray.artifacts.schema import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_NAME,
    METADATA_COLUMNS,
    PART_SCHEMA,
    PARTS_DIR,
    PAYLOAD_COLUMNS,
    Manifest,
)
from tswitch_ray.errors import ArtifactError

log = logging.getLogger(__name__)

# Row groups are cut so that one holds at most this much payload: a reader
# fetching one switch then reads little more than that switch.
ROW_GROUP_PAYLOAD_BYTES = 4 << 20

_REQUIRED_ROW_KEYS = ("task", "tensor", "alpha", "scope", "knob_mode", "shape", "dtype", "kept")
_ALPHA_TOL = 1e-9


# --- small fsspec helpers ------------------------------------------------------

def open_fs(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path without protocol and trailing slash) for a URI or local path."""
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    if isinstance(fs, LocalFileSystem):
        path = os.path.normpath(path)
    return fs, path.rstrip("/") or "/"


def normalize_uri(uri: str, storage_options: dict[str, Any] | None = None) -> str:
    """Canonical spelling of a URI, so that the same location compares equal.

    Local paths become absolute normalised paths (no ``file://``); other
    filesystems keep their protocol (``s3://bucket/key``, ``memory:///a``).
    """
    fs, path = open_fs(uri, storage_options)
    return _unstrip(fs, path)


def _unstrip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def _atomic_write(fs: fsspec.AbstractFileSystem, path: str, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` so that readers see either nothing or all of it."""
    if isinstance(fs, LocalFileSystem):
        folder, name = os.path.split(path)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{name}.tmp-{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    else:
        # One PUT (or one completed multipart upload) is atomic on object stores.
        fs.pipe_file(path, data if isinstance(data, bytes) else bytes(data))


def _cat(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    return fs.cat_file(path)


def _exists(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    # Listing caches (s3fs) may predate another process' write.
    fs.invalidate_cache(path)
    return fs.exists(path)


def _sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def write_table_atomic(uri: str, table: pa.Table, storage_options: dict[str, Any] | None = None) -> None:
    """Write a Parquet file (zstd) atomically; for result tables and the like."""
    fs, path = open_fs(uri, storage_options)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    _atomic_write(fs, path, buf.getvalue())


def read_table(uri: str, storage_options: dict[str, Any] | None = None, columns: Sequence[str] | None = None) -> pa.Table:
    """Read one Parquet file; ``ArtifactError`` naming the URI when missing or unreadable."""
    fs, path = open_fs(uri, storage_options)
    try:
        return pq.read_table(io.BytesIO(_cat(fs, path)), columns=list(columns) if columns else None)
    except FileNotFoundError as exc:
        raise ArtifactError(f"{uri}: no such Parquet file.") from exc
    except (OSError, pa.ArrowException) as exc:
        raise ArtifactError(f"{uri}: cannot be read as Parquet ({exc}).") from exc


# --- parts ----------------------------------------------------------------------

@dataclass
class PartInfo:
    """What the writer records about one part (also its sidecar's content)."""

    shard_id: int
    path: str  # relative to the artifact set's root
    sha256: str
    rows: int
    bytes: int
    payload_bytes: int
    run_key: str
    tensors: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    alphas: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _part_name(shard_id: int) -> str:
    return f"part-{shard_id:05d}.parquet"


def _normalize_row(row: dict[str, Any], shard_id: int) -> dict[str, Any]:
    """Fill codec columns from ``row["encoded"]`` and check the row's internal consistency."""
    missing = [k for k in _REQUIRED_ROW_KEYS if k not in row]
    if missing:
        raise ValueError(f"part {shard_id}: row for {row.get('task')!r}/{row.get('tensor')!r} lacks {missing}")
    out = {name: row.get(name) for name in PART_SCHEMA.names}
    enc = row.get("encoded")
    if enc is not None:
        if not isinstance(enc, EncodedSwitch):
            raise TypeError(f"part {shard_id}: 'encoded' must be an EncodedSwitch, got {type(enc).__name__}")
        out.update(codec=enc.codec, k=enc.k, inverted=enc.inverted, mask_bits=enc.mask_bits,
                   rem_bits=enc.rem_bits, sign_bits=enc.sign_bits)
        if out.get("numel") is None:
            out["numel"] = enc.numel
        if int(out["numel"]) != enc.numel or int(out["kept"]) != enc.kept:
            raise ValueError(f"part {shard_id}: {row['task']}/{row['tensor']}: row numel/kept "
                             f"({out['numel']}/{out['kept']}) disagree with the encoding ({enc.numel}/{enc.kept})")
    for name in ("codec", "k", "inverted", "mask_bits", "rem_bits", "sign_bits", "numel"):
        if out.get(name) is None:
            raise ValueError(f"part {shard_id}: row for {row['task']}/{row['tensor']} lacks {name!r} (pass 'encoded')")
    shape = [int(s) for s in out["shape"]]
    if math.prod(shape) != int(out["numel"]):
        raise ValueError(f"part {shard_id}: {row['task']}/{row['tensor']}: shape {shape} does not have numel {out['numel']}")
    out["shape"] = shape
    out["alpha"] = float(out["alpha"])
    out["payload_bytes"] = len(out["mask_bits"]) + len(out["rem_bits"]) + len(out["sign_bits"])
    out["payload_sha256"] = payload_sha256(out["mask_bits"], out["rem_bits"], out["sign_bits"])
    return out


# The codec streams are already within a few percent of their entropy: zstd
# saved 0.4 % of their bytes and cost a third of a part's serialisation time
# (0.50 s against 0.30-0.38 s for an 80 MB part of the 30-task ViT-B/16 zoo).
# Everything else (names, shapes, statistics) compresses well and stays zstd.
_PART_COMPRESSION = {f.name: ("none" if f.name in PAYLOAD_COLUMNS else "zstd") for f in PART_SCHEMA}
# Nor do the streams get a dictionary (Parquet's default tries one per column:
# it hashes every megabyte-long stream, finds no repeats and falls back to
# plain) or min/max statistics (meaningless for bit streams).
_PART_SMALL_COLUMNS = [f.name for f in PART_SCHEMA if f.name not in PAYLOAD_COLUMNS]


def _part_bytes(rows: list[dict[str, Any]], metadata: dict[str, str]) -> memoryview:
    """Serialise rows to Parquet: zstd, page checksums, bounded row groups.

    Memory: beyond the rows themselves, only one row group (<= 4 MiB of
    payload plus one row) is converted to Arrow at a time, and the file is
    returned as a view of the output buffer instead of a copy. Arrow
    allocates from the system allocator here. Its default mimalloc pool
    keeps freed pages resident, and the output buffer's repeated doublings
    made the peak RSS of one write about 4.5x the part's size, against
    about 2.8x now (measured on a 16 MiB part). A part's payload grows with
    tasks x α x shard size, so this part of the build's peak memory grows
    with the zoo (bench/results/build_memory.md).
    """
    pool = pa.system_memory_pool()
    schema = PART_SCHEMA.with_metadata(metadata)
    sink = pa.BufferOutputStream(memory_pool=pool)
    with pq.ParquetWriter(sink, schema, compression=_PART_COMPRESSION, write_page_checksum=True,
                          use_dictionary=_PART_SMALL_COLUMNS, write_statistics=_PART_SMALL_COLUMNS,
                          memory_pool=pool) as w:
        start, acc = 0, 0
        for i, r in enumerate(rows):
            acc += r["payload_bytes"]
            if acc >= ROW_GROUP_PAYLOAD_BYTES or i == len(rows) - 1:
                chunk = rows[start : i + 1]
                group = pa.Table.from_arrays(
                    [pa.array([row[f.name] for row in chunk], type=f.type, memory_pool=pool) for f in schema],
                    schema=schema)
                w.write_table(group, row_group_size=len(chunk))
                del group, chunk
                start, acc = i + 1, 0
    return memoryview(sink.getvalue())


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


class ArtifactWriter:
    """Stages parts of one build (``run_key``) under ``uri`` and commits them.

    Workers call :meth:`write_part`; the driver calls :meth:`commit` once all
    parts are in. Parts of an interrupted run are reused when the run is
    restarted with the same ``run_key`` (see :meth:`has_part`).
    """

    def __init__(self, uri: str, run_key: str, storage_options: dict[str, Any] | None = None) -> None:
        if not run_key or "/" in run_key or run_key.startswith("."):
            raise ValueError(f"run_key must be a plain, non-empty name, got {run_key!r}")
        self.uri = uri.rstrip("/") or uri
        self.run_key = run_key
        self.storage_options = storage_options or {}
        self.fs, self.root = open_fs(uri, self.storage_options)
        self.run_dir = f"{self.root}/{PARTS_DIR}/{run_key}"

    def check_writable(self) -> None:
        """Write and delete a probe object, so a missing bucket or a denied write fails before any work is done."""
        probe = f"{self.root}/.tswitch-probe-{uuid.uuid4().hex}"
        try:
            if _is_local(self.fs):  # object stores have no directories, and mkdirs there would create a bucket
                self.fs.mkdirs(self.root, exist_ok=True)
            self.fs.pipe_file(probe, b"")
            self.fs.rm_file(probe)
        except Exception as exc:  # noqa: BLE001 - every backend raises its own types; all mean "cannot write here"
            raise ArtifactError(
                f"{self.uri}: cannot write artifacts there ({type(exc).__name__}: {exc}). Check that the bucket or "
                "directory exists and that the credentials allow writing (for s3: --s3-endpoint, -S key=..., "
                "AWS_* variables)."
            ) from exc

    # paths
    def _part_path(self, shard_id: int) -> str:
        return f"{self.run_dir}/{_part_name(shard_id)}"

    def _rel(self, path: str) -> str:
        return path[len(self.root) + 1:]

    def write_part(self, shard_id: int, rows: list[dict[str, Any]]) -> PartInfo:
        """Write one shard's rows as a Parquet part, then its sha256 sidecar.

        Each row is a dict with the columns of docs/ARTIFACTS.md; the codec
        columns may be given at once as ``"encoded": EncodedSwitch``. Rewriting
        a shard replaces it (shards are idempotent).
        """
        if not rows:
            raise ValueError(f"part {shard_id}: no rows to write")
        norm = sorted((_normalize_row(r, shard_id) for r in rows), key=lambda r: (r["task"], r["alpha"], r["tensor"]))
        keys = [(r["task"], r["alpha"], r["tensor"]) for r in norm]
        if len(set(keys)) != len(keys):
            dup = next(k for i, k in enumerate(keys) if i and keys[i - 1] == k)
            raise ValueError(f"part {shard_id}: duplicate row for task/alpha/tensor {dup}")
        data = _part_bytes(norm, {"format": FORMAT, "run_key": self.run_key, "shard_id": str(shard_id)})
        path = self._part_path(shard_id)
        info = PartInfo(
            shard_id=shard_id,
            path=self._rel(path),
            sha256=_sha256(data),
            rows=len(norm),
            bytes=len(data),
            payload_bytes=sum(r["payload_bytes"] for r in norm),
            run_key=self.run_key,
            tensors=sorted({r["tensor"] for r in norm}),
            tasks=sorted({r["task"] for r in norm}),
            alphas=sorted({r["alpha"] for r in norm}),
        )
        _atomic_write(self.fs, path, data)
        _atomic_write(self.fs, path + ".sha256", json.dumps(info.to_dict(), indent=1).encode())
        return info

    def _sidecar(self, shard_id: int) -> PartInfo | None:
        try:
            d = json.loads(_cat(self.fs, self._part_path(shard_id) + ".sha256"))
            return PartInfo(**d)
        except (FileNotFoundError, ValueError, TypeError):
            return None

    def _verified(self, shard_id: int) -> tuple[PartInfo, bytes] | None:
        """(sidecar, part bytes) when the part exists and matches its sidecar, else None."""
        info = self._sidecar(shard_id)
        if info is None or info.run_key != self.run_key:
            return None
        try:
            data = _cat(self.fs, self._part_path(shard_id))
        except FileNotFoundError:
            return None
        if len(data) != info.bytes or _sha256(data) != info.sha256:
            log.warning("part %s does not match its sha256 sidecar; it will be rewritten", self._part_path(shard_id))
            return None
        return info, data

    def has_part(self, shard_id: int) -> bool:
        """True only if the part exists and its bytes verify against the sidecar's sha256."""
        self.fs.invalidate_cache(self.run_dir)
        return self._verified(shard_id) is not None

    def _staged_ids(self) -> list[int]:
        self.fs.invalidate_cache(self.run_dir)
        try:
            names = [p.rsplit("/", 1)[-1] for p in self.fs.ls(self.run_dir, detail=False)]
        except FileNotFoundError:
            return []
        ids = []
        for n in names:
            if n.startswith("part-") and n.endswith(".parquet.sha256"):
                try:
                    ids.append(int(n[len("part-"):-len(".parquet.sha256")]))
                except ValueError:
                    pass
        return sorted(ids)

    def existing_parts(self, verify: bool = True) -> dict[int, PartInfo]:
        """Staged parts of this run_key, by shard id; only those that verify unless ``verify=False``."""
        out: dict[int, PartInfo] = {}
        for sid in self._staged_ids():
            if verify:
                v = self._verified(sid)
                if v is not None:
                    out[sid] = v[0]
            else:
                info = self._sidecar(sid)
                if info is not None:
                    out[sid] = info
        return out

    def _current_manifest(self) -> dict[str, Any] | None:
        path = f"{self.root}/{MANIFEST_NAME}"
        if not _exists(self.fs, path):
            return None
        try:
            return json.loads(_cat(self.fs, path))
        except (FileNotFoundError, ValueError):
            return None

    def commit(self, manifest: dict[str, Any], overwrite: bool = False,
               shard_ids: Sequence[int] | None = None) -> dict[str, Any]:
        """Verify the staged parts and write ``manifest.json`` last, atomically.

        ``manifest`` gives what only the driver knows: ``zoo`` (``{"name",
        "fingerprint"}``), ``tasks``, ``alphas``, ``scope``, ``knob_mode``,
        ``knobs`` (scope "model": ``[{"task", "alpha", "knob"}]``), optional
        ``name``, ``tensors`` (expected tensor names) and ``extra``. The writer
        adds ``parts``, ``switches``, ``totals``, ``run_key``, ``created_at``,
        ``tool_version``, ``format``. ``shard_ids`` restricts (and requires)
        the parts to commit; by default every verified staged part is used.
        Refuses to replace a committed set of another run_key unless
        ``overwrite``; re-committing the same run_key is allowed (retries).
        Returns the manifest written.
        """
        where = f"{self.uri}"
        previous = self._current_manifest()
        if previous is not None and previous.get("run_key") != self.run_key and not overwrite:
            raise ArtifactError(
                f"{where}: a committed artifact set already exists there (run_key {previous.get('run_key')!r}, "
                f"created {previous.get('created_at')}); refusing to replace it with run {self.run_key!r}. "
                "Choose another output URI or pass overwrite=True (--overwrite)."
            )

        # Verify every part and read its small metadata columns from the same bytes.
        ids = sorted(shard_ids) if shard_ids is not None else self._staged_ids()
        if not ids:
            raise ArtifactError(f"{where}: run {self.run_key!r} has no staged parts to commit.")
        def verified_meta(sid: int) -> tuple[PartInfo, pa.Table]:
            v = self._verified(sid)
            if v is None:
                raise ArtifactError(
                    f"{where}: part {self._part_path(sid)} of run {self.run_key!r} is missing or does not match "
                    "its sha256 sidecar; rerun the build to rewrite it before committing."
                )
            info, data = v
            return info, pq.read_table(io.BytesIO(data), columns=["task", "tensor", "alpha", "scope", "knob_mode",
                                                                  "numel", "kept", "knob", "payload_bytes"])

        # Reading and hashing release the GIL: parts verify side by side (the
        # whole artifact set is read back once; serially that was ~2 s of the
        # 30-task ViT-B/16 build's commit).
        with ThreadPoolExecutor(max_workers=min(8, len(ids))) as pool:
            verified = list(pool.map(verified_meta, ids))
        infos = [info for info, _ in verified]
        rows = pa.concat_tables([meta for _, meta in verified])
        body = self._manifest_body(manifest, infos, rows)

        _atomic_write(self.fs, f"{self.root}/{MANIFEST_NAME}", json.dumps(body, indent=1).encode())
        if previous is not None and previous.get("run_key") not in (None, self.run_key):
            # The old set is unreachable now; its parts are garbage.
            old = f"{self.root}/{PARTS_DIR}/{previous['run_key']}"
            try:
                self.fs.rm(old, recursive=True)
            except FileNotFoundError:
                pass
        return body

    def _manifest_body(self, given: dict[str, Any], infos: list[PartInfo], rows: pa.Table) -> dict[str, Any]:
        where = self.uri

        def bad(cause: str) -> ArtifactError:
            return ArtifactError(f"{where}: cannot commit run {self.run_key!r}: {cause}.")

        for key in ("zoo", "tasks", "alphas", "scope", "knob_mode"):
            if key not in given:
                raise bad(f"the manifest lacks {key!r}")
        tasks = list(given["tasks"])
        alphas = [float(a) for a in given["alphas"]]
        scope, knob_mode = given["scope"], given["knob_mode"]
        zoo = given["zoo"]
        if isinstance(zoo, str):
            zoo = {"name": zoo, "fingerprint": given.get("fingerprint", "")}

        cols = rows.to_pydict()
        n = rows.num_rows
        keys = list(zip(cols["task"], cols["alpha"], cols["tensor"]))
        if len(set(keys)) != n:
            raise bad("two parts hold the same (task, alpha, tensor)")
        if set(cols["task"]) - set(tasks):
            raise bad(f"parts hold tasks {sorted(set(cols['task']) - set(tasks))} that the manifest does not list")
        if set(cols["scope"]) - {scope} or set(cols["knob_mode"]) - {knob_mode}:
            raise bad(f"parts were built with scope/knob {sorted(set(cols['scope']))}/{sorted(set(cols['knob_mode']))}, "
                      f"the manifest says {scope}/{knob_mode}")
        alpha_of = {}
        for a in set(cols["alpha"]):
            match = [b for b in alphas if abs(a - b) <= _ALPHA_TOL]
            if not match:
                raise bad(f"parts hold alpha {a} that the manifest does not list")
            alpha_of[a] = match[0]
        tensors = given.get("tensors")
        expected = set(tensors) if tensors else set(cols["tensor"])
        grid: dict[tuple[str, float], set[str]] = {(t, a): set() for t in tasks for a in alphas}
        for t, a, name in keys:
            grid[(t, alpha_of[a])].add(name)
        for (t, a), names in grid.items():
            if names != expected:
                lacking = sorted(expected - names)
                extra_names = sorted(names - expected)
                raise bad(f"task {t!r} at alpha {a} has {len(names)} of {len(expected)} tensors "
                          f"(missing {lacking[:5]}{'...' if len(lacking) > 5 else ''}"
                          f"{', unexpected ' + str(extra_names[:5]) if extra_names else ''}); a shard is missing")

        knobs = given.get("knobs")
        knob_table: dict[tuple[str, float], float] = {}
        knob_entries: list[dict[str, Any]] = []
        if scope == "model":
            if not knobs:
                raise bad("scope 'model' needs the per-(task, alpha) knob table 'knobs'")
            for e in knobs:
                a = [b for b in alphas if abs(float(e["alpha"]) - b) <= _ALPHA_TOL]
                if a and e.get("knob") is not None:
                    knob_table[(e["task"], a[0])] = float(e["knob"])
                    # Extra keys the driver records per knob (e.g. kept) are kept.
                    knob_entries.append({**e, "alpha": a[0], "knob": float(e["knob"])})
            lacking_k = [k for k in grid if k not in knob_table]
            if lacking_k:
                raise bad(f"the knob table lacks {lacking_k[:5]}")

        summary: dict[tuple[str, float], dict[str, Any]] = {
            k: {"task": k[0], "alpha": k[1], "tensors": 0, "numel": 0, "kept": 0, "encoded_bytes": 0,
                "knob": knob_table.get(k)} for k in grid
        }
        for i in range(n):
            s = summary[(cols["task"][i], alpha_of[cols["alpha"][i]])]
            s["tensors"] += 1
            s["numel"] += cols["numel"][i]
            s["kept"] += cols["kept"][i]
            s["encoded_bytes"] += cols["payload_bytes"][i]
        numel_of = {name: numel for name, numel in zip(cols["tensor"], cols["numel"])}
        fp32 = 4 * sum(cols["numel"])
        encoded = sum(cols["payload_bytes"])
        totals = dict(given.get("totals") or {})
        totals.update(
            fp32_bytes=fp32,  # one fp32 task vector per (task, alpha) switch it replaces
            task_vectors_fp32_bytes=4 * sum(numel_of.values()) * len(tasks),
            encoded_bytes=encoded,
            file_bytes=sum(p.bytes for p in infos),
            ratio=encoded / fp32 if fp32 else 0.0,
            bits_per_element=8 * encoded / sum(cols["numel"]) if n else 0.0,
        )
        body = {k: v for k, v in given.items() if k not in ("parts", "switches")}
        body.update(
            format=FORMAT,
            format_version=FORMAT_VERSION,
            name=given.get("name") or self.root.rsplit("/", 1)[-1],
            run_key=self.run_key,
            created_at=given.get("created_at") or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            tool_version=given.get("tool_version") or __version__,
            zoo=zoo,
            tasks=tasks,
            alphas=alphas,
            codec=given.get("codec") or CODEC_NAME,
            knobs=knob_entries if scope == "model" else None,
            tensors=sorted(expected) if not tensors else list(tensors),
            parts=[{k: v for k, v in p.to_dict().items() if k not in ("tasks", "alphas", "run_key")} for p in infos],
            switches=list(summary.values()),
            totals=totals,
            extra=dict(given.get("extra") or {}),
        )
        try:
            Manifest.model_validate(body)
        except ValidationError as exc:
            raise bad(f"the manifest is invalid: {exc}") from exc
        return body

    def abort(self) -> None:
        """Remove this run's staged parts (refused if this run is the committed one)."""
        current = self._current_manifest()
        if current is not None and current.get("run_key") == self.run_key:
            raise ArtifactError(f"{self.uri}: run {self.run_key!r} is committed; abort would corrupt it.")
        if _exists(self.fs, self.run_dir):
            self.fs.rm(self.run_dir, recursive=True)


# --- reader ---------------------------------------------------------------------

class ArtifactReader:
    """Read a committed artifact set; anything without a manifest does not exist.

    ``verify="rows"`` (default) checks at open that every listed part exists
    with its recorded size, and on every read Parquet page CRCs and each
    switch's payload sha256 — reading only the row groups needed.
    ``verify="full"`` also hashes every part file against the manifest at open
    (reads the whole set once); :meth:`verify` does that on demand.
    """

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None,
                 verify: Literal["rows", "full"] = "rows") -> None:
        self.uri = uri.rstrip("/") or uri
        self.storage_options = storage_options or {}
        self.fs, self.root = open_fs(uri, self.storage_options)
        mpath = f"{self.root}/{MANIFEST_NAME}"
        try:
            self.fs.invalidate_cache(mpath)
            raw = _cat(self.fs, mpath)
        except FileNotFoundError as exc:
            raise ArtifactError(
                f"{self.uri}: no committed artifact set ({MANIFEST_NAME} missing). The build was never committed, "
                "is still running, or the URI is wrong; staged parts without a manifest are ignored."
            ) from exc
        try:
            self.manifest: dict[str, Any] = json.loads(raw)
            self._m = Manifest.model_validate(self.manifest)
        except (ValueError, ValidationError) as exc:
            raise ArtifactError(f"{self.uri}/{MANIFEST_NAME}: not a valid artifact manifest ({exc}).") from exc
        if self._m.format != FORMAT or self._m.format_version > FORMAT_VERSION:
            raise ArtifactError(f"{self.uri}/{MANIFEST_NAME}: format {self._m.format!r} v{self._m.format_version} "
                                f"is not readable by this version (reads {FORMAT!r} up to v{FORMAT_VERSION}).")
        self._check_parts_present()
        self._knobs = {(k.task, k.alpha): k.knob for k in (self._m.knobs or [])}
        self._tensor_parts: dict[str, list[Any]] = {}
        for p in self._m.parts:
            for name in p.tensors:
                self._tensor_parts.setdefault(name, []).append(p)
        if verify == "full":
            self.verify()

    # manifest views
    @property
    def tasks(self) -> list[str]:
        return list(self._m.tasks)

    @property
    def alphas(self) -> list[float]:
        return list(self._m.alphas)

    @property
    def scope(self) -> str:
        return self._m.scope

    @property
    def knob_mode(self) -> str:
        return self._m.knob_mode

    @property
    def tensors(self) -> list[str]:
        return list(self.manifest.get("tensors") or sorted(self._tensor_parts))

    def _abs(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def _check_parts_present(self) -> None:
        run_dir = f"{self.root}/{PARTS_DIR}/{self._m.run_key}"
        self.fs.invalidate_cache(run_dir)
        try:
            sizes = {p.rstrip("/"): d.get("size") for p, d in self.fs.find(run_dir, detail=True).items()}
        except FileNotFoundError:
            sizes = {}
        for part in self._m.parts:
            path = self._abs(part.path)
            if path not in sizes:
                raise ArtifactError(f"{self.uri}: part {part.path} listed in the manifest is missing; "
                                    "the artifact set is incomplete (deleted or partially copied).")
            if sizes[path] is not None and int(sizes[path]) != part.bytes:
                raise ArtifactError(f"{self.uri}: part {part.path} has {sizes[path]} bytes, the manifest says "
                                    f"{part.bytes}; the part is corrupt or was replaced.")

    def verify(self) -> None:
        """Hash every part file against the manifest; ``ArtifactError`` names the first bad one."""
        for part in self._m.parts:
            try:
                data = _cat(self.fs, self._abs(part.path))
            except FileNotFoundError as exc:
                raise ArtifactError(f"{self.uri}: part {part.path} is missing.") from exc
            if _sha256(data) != part.sha256:
                raise ArtifactError(f"{self.uri}: part {part.path} fails its sha256 checksum "
                                    f"(manifest {part.sha256[:12]}…, file {_sha256(data)[:12]}…); the part is corrupt.")

    def _alpha(self, alpha: float) -> float:
        for a in self._m.alphas:
            if abs(a - float(alpha)) <= _ALPHA_TOL:
                return a
        raise ArtifactError(f"{self.uri}: alpha {alpha} was not built (available: {self.alphas}).")

    def _task(self, task: str) -> str:
        if task not in self._m.tasks:
            raise ArtifactError(f"{self.uri}: task {task!r} is not in this artifact set (tasks: {self.tasks}).")
        return task

    def _read(self, rel: str, columns: Sequence[str] | None, filters: Any) -> pa.Table:
        try:
            return pq.read_table(self._abs(rel), filesystem=self.fs, columns=list(columns) if columns else None,
                                 filters=filters, page_checksum_verification=True)
        except FileNotFoundError as exc:
            raise ArtifactError(f"{self.uri}: part {rel} is missing.") from exc
        except (OSError, pa.ArrowException) as exc:
            raise ArtifactError(f"{self.uri}: part {rel} cannot be read ({exc}); the part is corrupt.") from exc

    def table(self, columns: Sequence[str] | None = None, filters: Any = None) -> pa.Table:
        """Rows of every part; metadata columns only unless ``columns`` names payload ones.

        ``filters`` is anything ``pyarrow.parquet.read_table`` accepts, e.g.
        ``[("task", "==", "cars"), ("alpha", "==", 0.6)]``.
        """
        cols = list(columns) if columns else list(METADATA_COLUMNS)
        tables = [self._read(p.path, cols, filters) for p in self._m.parts]
        if not tables:
            return PART_SCHEMA.empty_table().select(cols)
        return pa.concat_tables(tables)

    def rows(self, task: str, alpha: float) -> pa.Table:
        """Metadata rows of one (task, alpha)."""
        return self.table(filters=[("task", "==", self._task(task)), ("alpha", "==", self._alpha(alpha))])

    def knob(self, task: str, alpha: float, tensor: str | None = None) -> float:
        """The knob of a switch: the manifest's table for scope "model", the row's for scope "tensor"."""
        a = self._alpha(alpha)
        if self._m.scope == "model":
            return self._knobs[(self._task(task), a)]
        if tensor is None:
            raise ArtifactError(f"{self.uri}: scope 'tensor' has one knob per tensor; name the tensor.")
        t = self.table(columns=["knob"], filters=[("task", "==", self._task(task)), ("alpha", "==", a),
                                                  ("tensor", "==", tensor)])
        if t.num_rows != 1:
            raise ArtifactError(f"{self.uri}: no switch for task {task!r}, alpha {a}, tensor {tensor!r}.")
        return float(t.column("knob")[0].as_py())

    def _decode_row(self, row: dict[str, Any], part: str) -> tuple[np.ndarray, np.ndarray, float]:
        where = f"{self.uri}: part {part}, task {row['task']!r}, alpha {row['alpha']}, tensor {row['tensor']!r}"
        digest = payload_sha256(row["mask_bits"], row["rem_bits"], row["sign_bits"])
        if digest != row["payload_sha256"]:
            raise ArtifactError(f"{where}: payload fails its sha256 checksum; the part is corrupt.")
        enc = EncodedSwitch(numel=row["numel"], kept=row["kept"], k=row["k"], inverted=row["inverted"],
                            mask_bits=row["mask_bits"], rem_bits=row["rem_bits"], sign_bits=row["sign_bits"],
                            codec=row["codec"])
        try:
            mask, positive = decode_switch(enc)
        except ArtifactError as exc:
            raise ArtifactError(f"{where}: {exc}") from exc
        shape = tuple(row["shape"])
        if self._m.scope == "model":
            knob = self._knobs[(row["task"], self._alpha(row["alpha"]))]
        else:
            knob = row["knob"]
        return mask.reshape(shape), positive.reshape(shape), float(knob)

    def switch(self, task: str, alpha: float, tensor: str) -> tuple[np.ndarray, np.ndarray, float]:
        """(mask, positive, knob) of one tensor, shaped like the tensor; reads only that row's row group."""
        task, a = self._task(task), self._alpha(alpha)
        parts = self._tensor_parts.get(tensor) if self._tensor_parts else self._m.parts
        if not parts:
            raise ArtifactError(f"{self.uri}: tensor {tensor!r} is not in this artifact set.")
        flt = [("task", "==", task), ("alpha", "==", a), ("tensor", "==", tensor)]
        for p in parts:
            t = self._read(p.path, None, flt)
            if t.num_rows:
                return self._decode_row(t.to_pylist()[0], p.path)
        raise ArtifactError(f"{self.uri}: no switch for task {task!r}, alpha {a}, tensor {tensor!r}.")

    def iter_switches(self, task: str, alpha: float) -> Iterator[tuple[str, np.ndarray, np.ndarray, float]]:
        """Yield ``(tensor, mask, positive, knob)`` for every tensor, one part in memory at a time."""
        task, a = self._task(task), self._alpha(alpha)
        flt = [("task", "==", task), ("alpha", "==", a)]
        for p in self._m.parts:
            t = self._read(p.path, None, flt)
            for batch in t.to_batches(max_chunksize=1):
                for row in batch.to_pylist():
                    mask, positive, knob = self._decode_row(row, p.path)
                    yield row["tensor"], mask, positive, knob
