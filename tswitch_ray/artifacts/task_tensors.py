"""Task-specific tensors and buffers: one lossless Parquet part per task, committed by the switch manifest.

What a task keeps as its own (heads matched by the zoo's ``task_specific``
globs, and non-float buffers that differ from the base's) is neither switched
nor merged: it is stored exactly, under the task's own tensor name, at::

    OUT/parts/<task_key>/task-<task>.parquet          zstd; one row per tensor
    OUT/parts/<task_key>/task-<task>.parquet.sha256   sidecar: the manifest entry, JSON

and listed in the manifest's ``task_tensors``. The links of docs/ARTIFACTS.md
"Integrity" hold here too: each row's ``row_sha256`` binds its key (task,
tensor), header (role, dtype, shape, byte count) and data (``data_sha256``);
the entry's ``rows_sha256`` commits the part's rows and ``sha256`` the file.
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from tswitch_ray.artifacts.integrity import rows_digest
from tswitch_ray.artifacts.schema import PARTS_DIR
from tswitch_ray.errors import ArtifactError
from tswitch_ray.io.atomic import atomic_write_fs, sha256_hex
from tswitch_ray.io.checkpoints import TensorInfo, bytes_to_tensor, dtype_name

TASK_TENSORS_FORMAT = "tswitch-ray/task-tensors"
ROW_TAG = "tswitch-ray/task-tensors/row/v1"
ROLES = ("task_specific", "buffer")

SCHEMA = pa.schema([
    pa.field("task", pa.string(), nullable=False),
    pa.field("tensor", pa.string(), nullable=False),  # the name in the task's own checkpoint
    pa.field("name", pa.string(), nullable=False),  # the zoo's (the base's) name for it
    pa.field("role", pa.string(), nullable=False),
    pa.field("dtype", pa.string(), nullable=False),
    pa.field("shape", pa.list_(pa.int64()), nullable=False),
    pa.field("nbytes", pa.int64(), nullable=False),
    pa.field("data", pa.large_binary(), nullable=False),  # little-endian, C order
    pa.field("data_sha256", pa.string(), nullable=False),
    pa.field("row_sha256", pa.string(), nullable=False),
])
ROW_DIGEST_COLUMNS = ("task", "tensor", "name", "role", "dtype", "shape", "nbytes", "data_sha256")
# A row group closes once its data reaches this size (a reader holds one at a time).
ROW_GROUP_BYTES = 64 * 2**20
ENTRY_KEYS = ("task", "path", "sha256", "bytes", "rows", "rows_sha256", "data_bytes", "tensors")


def part_path(task_key: str, task: str) -> str:
    """The part's path relative to the artifact set's root."""
    return f"{PARTS_DIR}/{task_key}/task-{task}.parquet"


def row_digest(row: dict[str, Any]) -> str:
    body = [ROW_TAG, *(row[c] for c in ROW_DIGEST_COLUMNS)]
    return hashlib.sha256(json.dumps(body, separators=(",", ":"), ensure_ascii=True).encode()).hexdigest()


def _tensor_bytes(t: torch.Tensor) -> bytes:
    # The project reads and writes little-endian (safetensors' order) only; see io/checkpoints.py.
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _rows(task: str, tensors: list[tuple[str, str, str, torch.Tensor]]) -> list[dict[str, Any]]:
    rows = []
    for name, stored, role, t in tensors:
        if role not in ROLES:
            raise ValueError(f"task {task!r}, tensor {stored!r}: role {role!r} is not one of {ROLES}")
        data = _tensor_bytes(t.cpu())
        row = {"task": task, "tensor": stored, "name": name, "role": role, "dtype": dtype_name(t.dtype),
               "shape": [int(s) for s in t.shape], "nbytes": len(data), "data": data, "data_sha256": sha256_hex(data)}
        row["row_sha256"] = row_digest(row)
        rows.append(row)
    return rows


def _parquet_bytes(rows: list[dict[str, Any]]) -> bytes:
    sink = pa.BufferOutputStream()
    # No dictionary or min/max statistics for the data column: each value is unique, and its statistics
    # would copy up to whole tensors into the footer.
    small = [f.name for f in SCHEMA if f.name != "data"]
    with pq.ParquetWriter(sink, SCHEMA.with_metadata({"format": TASK_TENSORS_FORMAT}), compression="zstd",
                          write_page_checksum=True, use_dictionary=small, write_statistics=small) as w:
        start, acc = 0, 0
        for i, r in enumerate(rows):
            acc += r["nbytes"]
            if acc >= ROW_GROUP_BYTES or i == len(rows) - 1:
                chunk = rows[start:i + 1]
                w.write_table(pa.Table.from_pylist(chunk, schema=SCHEMA), row_group_size=len(chunk))
                start, acc = i + 1, 0
    return sink.getvalue().to_pybytes()


def write_task_tensors(fs: Any, root: str, task_key: str, task: str,
                       tensors: list[tuple[str, str, str, torch.Tensor]]) -> dict[str, Any]:
    """Stage ``tensors`` (``(zoo name, stored name, role, tensor)``) of ``task``; returns the manifest entry.

    The part goes first, its sidecar (the entry) after it, both atomically:
    a sidecar that verifies proves the part is whole (resume reuses it).
    """
    rows = _rows(task, tensors)
    if not rows:
        raise ValueError(f"task {task!r}: no task-specific tensors to write")
    data = _parquet_bytes(rows)
    entry = {"task": task, "path": part_path(task_key, task), "sha256": sha256_hex(data), "bytes": len(data),
             "rows": len(rows), "rows_sha256": rows_digest(r["row_sha256"] for r in rows),
             "data_bytes": sum(r["nbytes"] for r in rows), "tensors": [r["name"] for r in rows]}
    path = f"{root}/{entry['path']}"
    atomic_write_fs(fs, path, data)
    atomic_write_fs(fs, path + ".sha256", json.dumps(entry, indent=1).encode())
    return entry


def staged_task_tensors(fs: Any, root: str, task_key: str, task: str) -> dict[str, Any] | None:
    """The entry of ``task``'s staged part under ``task_key`` when part and sidecar verify, else None."""
    path = f"{root}/{part_path(task_key, task)}"
    try:
        entry = json.loads(fs.cat_file(path + ".sha256"))
        data = fs.cat_file(path)
    except (FileNotFoundError, ValueError):
        return None
    if not isinstance(entry, dict) or sorted(entry) != sorted(ENTRY_KEYS) or entry.get("task") != task:
        return None
    if len(data) != entry["bytes"] or sha256_hex(data) != entry["sha256"]:
        return None
    return entry


def read_task_tensors(fs: Any, root: str, uri: str, entry: dict[str, Any]) -> list[tuple[str, str, str, torch.Tensor]]:
    """``(zoo name, stored name, role, tensor)`` of one committed entry, every link checked.

    ``ArtifactError`` naming the part (and the tensor) when the file is
    missing, fails the entry's sha256, holds other rows than it committed, or
    a row fails its digest or its data's.
    """
    where = f"{uri}: task tensors part {entry.get('path')}"
    try:
        data = fs.cat_file(f"{root}/{entry['path']}")
    except FileNotFoundError as exc:
        raise ArtifactError(f"{where} is missing; the artifact set is incomplete (deleted or partially copied).") from exc
    if sha256_hex(data) != entry["sha256"]:
        raise ArtifactError(f"{where} fails its sha256 checksum (manifest {entry['sha256'][:12]}…, file "
                            f"{sha256_hex(data)[:12]}…); the part is corrupt or was replaced. Rebuild the set.")
    try:
        table = pq.read_table(io.BytesIO(data), page_checksum_verification=True)
    except (OSError, pa.ArrowException) as exc:
        raise ArtifactError(f"{where} cannot be read ({exc}); the part is corrupt.") from exc
    rows = table.to_pylist()
    if rows_digest(r["row_sha256"] for r in rows) != entry["rows_sha256"]:
        raise ArtifactError(f"{where} does not hold the rows the manifest committed; rebuild the set.")
    out = []
    for r in rows:
        if r["task"] != entry["task"] or row_digest(r) != r["row_sha256"] or sha256_hex(r["data"]) != r["data_sha256"]:
            raise ArtifactError(f"{where}, tensor {r['tensor']!r}: the row fails its digest (edited or corrupt); "
                                "rebuild the set.")
        info = TensorInfo(r["tensor"], tuple(r["shape"]), r["dtype"], r["nbytes"])
        out.append((r["name"], r["tensor"], r["role"], bytes_to_tensor(bytearray(r["data"]), info)))
    return out
