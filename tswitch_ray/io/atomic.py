"""Whole-file writes that readers see completely or not at all, and the small whole-file reads.

:func:`atomic_write` is the one atomic writer of the product. On a local disk
the data goes to a hidden temporary file in the destination's folder, is
fsync-ed and renamed into place (a rename inside one folder is atomic). On an
object store (s3://, memory://) one PUT of the finished object is atomic by
itself: nothing is ever written elsewhere and copied, since copy-then-delete
leaves a window where both or neither exist.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec

from tswitch_ray.errors import ZooError
from tswitch_ray.io.faults import storage_errors, translate
from tswitch_ray.io.fs import fs_is_local, open_fs, uri_of


@dataclass(frozen=True)
class FileDigest:
    """A written file: its URI, the sha256 of its bytes and its size."""

    uri: str
    sha256: str
    bytes: int


def sha256_hex(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def atomic_write_fs(fs: fsspec.AbstractFileSystem, path: str, data: bytes | bytearray | memoryview) -> None:
    """Write ``data`` to ``path`` of ``fs`` so that readers see either nothing or all of it.

    A full disk, a denied or read-only destination is a ``StorageError`` naming the file (io/faults.py).
    """
    path = fs._strip_protocol(path)
    with storage_errors("cannot write", uri_of(fs, path), fs.storage_options, missing=True):
        _write_whole(fs, path, data)


def _write_whole(fs: fsspec.AbstractFileSystem, path: str, data: bytes | bytearray | memoryview) -> None:
    if fs_is_local(fs):
        folder, name = os.path.split(path)
        os.makedirs(folder or ".", exist_ok=True)
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


def atomic_write(uri: str, data: bytes | bytearray | memoryview, storage_options: dict[str, Any] | None = None) -> None:
    """:func:`atomic_write_fs` for a URI."""
    fs, path = open_fs(uri, storage_options)
    atomic_write_fs(fs, path, data)


def read_bytes(uri: str, storage_options: dict[str, Any] | None = None) -> bytes:
    """Whole file; ``ZooError`` naming the file when it cannot be read."""
    try:
        fs, path = open_fs(uri, storage_options)
        return fs.cat_file(path)
    except FileNotFoundError as e:
        raise ZooError(f"{uri}: file not found ({e}).") from e
    except (OSError, ValueError) as e:
        user = translate(e, uri, "cannot read", storage_options, error=ZooError)
        if user is not None:
            raise user from None
        if isinstance(e, ValueError):
            raise
        raise ZooError(f"{uri}: cannot be read ({type(e).__name__}: {e}).") from e


def exists_fs(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    # Listing caches (s3fs) may predate another process' write.
    fs.invalidate_cache(path)
    return fs.exists(path)


def exists(uri: str, storage_options: dict[str, Any] | None = None) -> bool:
    fs, path = open_fs(uri, storage_options)
    return exists_fs(fs, path)


def remove_tree_fs(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Remove ``path`` and everything under it; nothing there is fine."""
    fs.invalidate_cache(path)
    try:
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass


def remove_tree(uri: str, storage_options: dict[str, Any] | None = None) -> None:
    fs, path = open_fs(uri, storage_options)
    remove_tree_fs(fs, path)
