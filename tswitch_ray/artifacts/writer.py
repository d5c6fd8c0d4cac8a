"""Writing switch artifacts: parts staged by workers, one manifest committed last (a :class:`~tswitch_ray.io.sink.Sink`).

Layout of an artifact set at ``OUT`` (docs/ARTIFACTS.md has every field)::

    OUT/manifest.json                                  written last, atomically
    OUT/parts/<run_key>/part-<shard:05d>.parquet       one per shard, zstd
    OUT/parts/<run_key>/part-<shard:05d>.parquet.sha256  sidecar: PartInfo JSON

Every file is written with :func:`tswitch_ray.io.atomic.atomic_write_fs`.
The sidecar is written after its part, so a sidecar that verifies proves the
part is complete. A reader only trusts what ``manifest.json`` lists, hence
staged-but-uncommitted parts are invisible. Parts stage in their final
folder: committing is writing the manifest, nothing is moved.
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from tswitch_ray.artifacts.encoding import EncodedSwitch, payload_sha256
from tswitch_ray.artifacts.integrity import row_digest, rows_digest
from tswitch_ray.artifacts.manifest import MANIFEST_COLUMNS, PartInfo, build_manifest
from tswitch_ray.artifacts.schema import (
    FORMAT,
    MANIFEST_NAME,
    PART_SCHEMA,
    PARTS_DIR,
    PAYLOAD_COLUMNS,
    ROW_DIGEST_COLUMNS,
)
from tswitch_ray.errors import ArtifactError
from tswitch_ray.io.atomic import atomic_write_fs, exists_fs, sha256_hex
from tswitch_ray.io.fs import open_fs
from tswitch_ray.io.sink import Sink, create_exclusive_fs, probe_writable, read_marker

log = logging.getLogger(__name__)

# Row groups are cut so that one holds at most this much payload: a reader
# fetching one switch then reads little more than that switch.
ROW_GROUP_PAYLOAD_BYTES = 4 << 20

_REQUIRED_ROW_KEYS = ("task", "tensor", "alpha", "scope", "knob_mode", "shape", "dtype", "kept")


class CommitConflict(ArtifactError):
    """Another run committed a set at this URI: this run's parts can never be committed there."""


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


def _part_bytes(rows: list[dict[str, Any]], metadata: dict[str, str]) -> tuple[memoryview, list[str]]:
    """Serialise rows to Parquet: zstd, page checksums, bounded row groups; returns the bytes and the rows' row_sha256.

    Each ``row_sha256`` is computed from the row as converted to Arrow, i.e.
    from exactly the values a reader gets back. Memory: beyond the rows
    themselves, only one row group (<= 4 MiB of payload plus one row) is
    converted to Arrow at a time, and the file is returned as a view of the
    output buffer instead of a copy. Arrow allocates from the system
    allocator here. Its default mimalloc pool keeps freed pages resident,
    and the output buffer's repeated doublings made the peak RSS of one
    write about 4.5x the part's size, against about 2.8x now (measured on a
    16 MiB part). A part's payload grows with tasks x α x shard size, so
    this part of the build's peak memory grows with the zoo
    (bench/results/build_memory.md).
    """
    pool = pa.system_memory_pool()
    schema = PART_SCHEMA.with_metadata(metadata)
    sink = pa.BufferOutputStream(memory_pool=pool)
    digests: list[str] = []
    with pq.ParquetWriter(sink, schema, compression=_PART_COMPRESSION, write_page_checksum=True,
                          use_dictionary=_PART_SMALL_COLUMNS, write_statistics=_PART_SMALL_COLUMNS,
                          memory_pool=pool) as w:
        start, acc = 0, 0
        for i, r in enumerate(rows):
            acc += r["payload_bytes"]
            if acc >= ROW_GROUP_PAYLOAD_BYTES or i == len(rows) - 1:
                chunk = rows[start : i + 1]
                arrays = {f.name: pa.array([row[f.name] for row in chunk], type=f.type, memory_pool=pool)
                          for f in schema if f.name != "row_sha256"}
                keyed = pa.table({c: arrays[c] for c in ROW_DIGEST_COLUMNS}).to_pylist()
                group_digests = [row_digest(k) for k in keyed]
                arrays["row_sha256"] = pa.array(group_digests, pa.string(), memory_pool=pool)
                digests.extend(group_digests)
                group = pa.Table.from_arrays([arrays[f.name] for f in schema], schema=schema)
                w.write_table(group, row_group_size=len(chunk))
                del group, chunk, arrays
                start, acc = i + 1, 0
    return memoryview(sink.getvalue()), digests


class ArtifactWriter(Sink):
    """Stages parts of one build (``run_key``) under ``uri`` and commits them.

    The driver calls :meth:`start` before any work, workers call
    :meth:`write` (one part per shard), the driver calls :meth:`complete`
    once all parts are in, or :meth:`failed` to drop the staged parts. Parts
    of an interrupted run are reused when the run is restarted with the same
    ``run_key`` (see :meth:`has_part`). A committed set of another run_key is
    refused (at :meth:`start` and again at :meth:`complete`) unless
    ``overwrite``; the same run_key may commit again (retries).
    """

    def __init__(self, uri: str, run_key: str, storage_options: dict[str, Any] | None = None,
                 overwrite: bool = False) -> None:
        if not run_key or "/" in run_key or run_key.startswith("."):
            raise ValueError(f"run_key must be a plain, non-empty name, got {run_key!r}")
        self.uri = uri.rstrip("/") or uri
        self.run_key = run_key
        self.storage_options = storage_options or {}
        self.overwrite = overwrite
        self.fs, self.root = open_fs(uri, self.storage_options)
        self.run_dir = f"{self.root}/{PARTS_DIR}/{run_key}"

    # --- lifecycle -------------------------------------------------------------
    def start(self) -> None:
        """Probe that ``uri`` is writable and refuse another run's committed set (unless ``overwrite``)."""
        probe_writable(self.fs, self.root, self.uri, "artifacts")
        self._refuse_other_run(self._current_manifest(), started=False)

    def write(self, shard_id: int, rows: list[dict[str, Any]]) -> PartInfo:
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
        data, digests = _part_bytes(norm, {"format": FORMAT, "run_key": self.run_key, "shard_id": str(shard_id)})
        path = self._part_path(shard_id)
        info = PartInfo(
            shard_id=shard_id,
            path=self._rel(path),
            sha256=sha256_hex(data),
            rows=len(norm),
            bytes=len(data),
            payload_bytes=sum(r["payload_bytes"] for r in norm),
            run_key=self.run_key,
            tensors=sorted({r["tensor"] for r in norm}),
            tasks=sorted({r["task"] for r in norm}),
            alphas=sorted({r["alpha"] for r in norm}),
            rows_sha256=rows_digest(digests),
        )
        atomic_write_fs(self.fs, path, data)
        atomic_write_fs(self.fs, path + ".sha256", json.dumps(info.to_dict(), indent=1).encode())
        return info

    def complete(self, manifest: dict[str, Any], shard_ids: Sequence[int] | None = None) -> dict[str, Any]:
        """Verify the staged parts and write ``manifest.json`` last, atomically.

        ``manifest`` gives what only the driver knows: ``zoo`` (``{"name",
        "fingerprint"}``), ``tasks``, ``alphas``, ``scope``, ``knob_mode``,
        ``knobs`` (scope "model": ``[{"task", "alpha", "knob"}]``), optional
        ``name``, ``tensors`` (expected tensor names) and ``extra``. The writer
        adds ``parts``, ``switches``, ``totals``, ``run_key``, ``created_at``,
        ``tool_version``, ``format``, ``format_version`` and, last,
        ``manifest_sha256``. ``shard_ids`` restricts (and requires) the parts
        to commit; by default every verified staged part is used.
        Returns the manifest written.
        """
        previous = self._current_manifest()
        self._refuse_other_run(previous)  # again: another run may have committed since start()
        ids = sorted(shard_ids) if shard_ids is not None else self._staged_ids()
        if not ids:
            raise ArtifactError(f"{self.uri}: run {self.run_key!r} has no staged parts to commit.")
        infos, rows = self._verified_parts(ids)
        body = build_manifest(self.uri, self.run_key, self.root.rsplit("/", 1)[-1], manifest, infos, rows)

        self._publish(body, previous)
        if previous is not None and previous.get("run_key") not in (None, self.run_key):
            # The old set is unreachable now; its parts are garbage.
            old = f"{self.root}/{PARTS_DIR}/{previous['run_key']}"
            try:
                self.fs.rm(old, recursive=True)
            except FileNotFoundError:
                pass
        return body

    def check_open(self) -> None:
        """``CommitConflict`` if another run has committed here since :meth:`start` (the build calls this as each
        part lands, so a build that lost the race stops at its next part instead of encoding everything)."""
        self._refuse_other_run(self._current_manifest())

    def failed(self) -> None:
        """Remove this run's staged parts (refused if this run is the committed one)."""
        current = self._current_manifest()
        if current is not None and current.get("run_key") == self.run_key:
            raise ArtifactError(f"{self.uri}: run {self.run_key!r} is committed; removing its parts would corrupt it.")
        if exists_fs(self.fs, self.run_dir):
            self.fs.rm(self.run_dir, recursive=True)

    # --- staged parts ----------------------------------------------------------
    def _part_path(self, shard_id: int) -> str:
        return f"{self.run_dir}/{_part_name(shard_id)}"

    def _rel(self, path: str) -> str:
        return path[len(self.root) + 1:]

    def _sidecar(self, shard_id: int) -> PartInfo | None:
        try:
            d = json.loads(self.fs.cat_file(self._part_path(shard_id) + ".sha256"))
            return PartInfo(**d)
        except (FileNotFoundError, ValueError, TypeError):
            return None

    def _verified(self, shard_id: int) -> tuple[PartInfo, bytes] | None:
        """(sidecar, part bytes) when the part exists and matches its sidecar, else None."""
        info = self._sidecar(shard_id)
        if info is None or info.run_key != self.run_key or not info.rows_sha256:
            return None  # no sidecar, another run's, or one of format version 1 (its part has no row digests)
        try:
            data = self.fs.cat_file(self._part_path(shard_id))
        except FileNotFoundError:
            return None
        if len(data) != info.bytes or sha256_hex(data) != info.sha256:
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

    def _verified_parts(self, ids: list[int]) -> tuple[list[PartInfo], pa.Table]:
        """Every part of ``ids`` verified against its sidecar, and their metadata rows read from the same bytes."""

        def verified_meta(sid: int) -> tuple[PartInfo, pa.Table]:
            v = self._verified(sid)
            if v is None:
                raise ArtifactError(
                    f"{self.uri}: part {self._part_path(sid)} of run {self.run_key!r} is missing or does not match "
                    "its sha256 sidecar; rerun the build to rewrite it before committing."
                )
            info, data = v
            meta = pq.read_table(io.BytesIO(data), columns=MANIFEST_COLUMNS)
            if rows_digest(meta.column("row_sha256").to_pylist()) != info.rows_sha256:
                raise ArtifactError(f"{self.uri}: part {self._part_path(sid)} of run {self.run_key!r} holds other rows "
                                    "than its sidecar records; rerun the build to rewrite it before committing.")
            return info, meta

        # Reading and hashing release the GIL: parts verify side by side (the
        # whole artifact set is read back once; serially that was ~2 s of the
        # 30-task ViT-B/16 build's commit).
        with ThreadPoolExecutor(max_workers=min(8, len(ids))) as pool:
            verified = list(pool.map(verified_meta, ids))
        return [info for info, _ in verified], pa.concat_tables([meta for _, meta in verified])

    # --- the committed set -----------------------------------------------------
    def _current_manifest(self) -> dict[str, Any] | None:
        return read_marker(self.fs, f"{self.root}/{MANIFEST_NAME}")

    def _publish(self, body: dict[str, Any], previous: dict[str, Any] | None) -> None:
        """Write the manifest; where none was committed, only if none has been since (another build's).

        On a local disk the manifest is then created exclusively (a link, which
        fails if the name exists): of two builds committing at once, exactly
        one wins. An object store has no such create here: the manifest is
        read back after the PUT, which narrows the window to the two PUTs'
        own overlap (docs/ARCHITECTURE.md "Faults").
        """
        path = f"{self.root}/{MANIFEST_NAME}"
        data = json.dumps(body, indent=1).encode()
        if previous is not None or self.overwrite:
            atomic_write_fs(self.fs, path, data)
        elif not create_exclusive_fs(self.fs, path, data):
            self._refuse_other_run(self._current_manifest())  # another run's manifest won the race
            atomic_write_fs(self.fs, path, data)  # it was this run's (a retry of the same run_key): same set
        now = self._current_manifest()
        if now is not None and now.get("run_key") != self.run_key:
            self._refuse_other_run(now)

    def _refuse_other_run(self, previous: dict[str, Any] | None, started: bool = True) -> None:
        if previous is None or previous.get("run_key") == self.run_key or self.overwrite:
            return
        if started:
            raise CommitConflict(
                f"{self.uri}: another build committed an artifact set there while this one ran (run_key "
                f"{previous.get('run_key')!r}, created {previous.get('created_at')}); run {self.run_key!r} lost the "
                "race: its staged parts are removed and nothing of it is visible. Choose another output URI, or "
                "rerun with overwrite (--overwrite) to replace that set."
            )
        raise CommitConflict(
                f"{self.uri}: a committed artifact set already exists there (run_key {previous.get('run_key')!r}, "
                f"created {previous.get('created_at')}); refusing to replace it with run {self.run_key!r}. "
                "Choose another output URI or set overwrite (overwrite=True)."
            )
