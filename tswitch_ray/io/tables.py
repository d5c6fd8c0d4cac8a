"""Whole Parquet files: written atomically (zstd), read back with errors that name the URI."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from tswitch_ray.errors import ArtifactError
from tswitch_ray.io.atomic import atomic_write
from tswitch_ray.io.fs import open_fs


def table_bytes(table: pa.Table, row_group_size: int | None = None) -> bytes:
    """``table`` as one zstd Parquet file, in memory."""
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_size, compression="zstd")
    return buf.getvalue()


def write_table(uri: str, table: pa.Table, storage_options: dict[str, Any] | None = None,
                row_group_size: int | None = None) -> None:
    """Write a Parquet file (zstd) atomically; for result tables, eval splits and the like."""
    atomic_write(uri, table_bytes(table, row_group_size), storage_options)


def read_table(uri: str, storage_options: dict[str, Any] | None = None, columns: Sequence[str] | None = None) -> pa.Table:
    """Read one Parquet file; ``ArtifactError`` naming the URI when missing or unreadable."""
    fs, path = open_fs(uri, storage_options)
    try:
        return pq.read_table(io.BytesIO(fs.cat_file(path)), columns=list(columns) if columns else None)
    except FileNotFoundError as exc:
        raise ArtifactError(f"{uri}: no such Parquet file.") from exc
    except (OSError, pa.ArrowException) as exc:
        raise ArtifactError(f"{uri}: cannot be read as Parquet ({exc}).") from exc
