"""fsspec helpers shared by the zoo readers and writers (private)."""

from __future__ import annotations

import contextlib
import posixpath
from collections.abc import Iterator
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from tswitch_ray.errors import ZooError

_LOCAL_PROTOCOLS = {"", "file", "local"}


def protocol_of(uri: str) -> str:
    """The URL scheme of ``uri`` ("" for a plain local path)."""
    if "://" in uri:
        return uri.split("://", 1)[0].lower()
    return ""


def is_local(uri: str) -> bool:
    return protocol_of(uri) in _LOCAL_PROTOCOLS


def options_for(uri: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """Storage options to use for ``uri``.

    One options dict is given for a whole zoo; it is meant for the remote store
    (credentials, endpoint). Local paths never get it, so a local manifest can
    point at s3:// tasks and an s3 manifest at local files without the s3
    options being passed to the local filesystem.
    """
    if is_local(uri) or not storage_options:
        return {}
    return dict(storage_options)


def get_fs(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for ``uri``."""
    fs, path = fsspec.core.url_to_fs(uri, **options_for(uri, storage_options))
    return fs, path


def fs_is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def join_uri(base_dir_uri: str, name: str) -> str:
    """``base_dir_uri/name`` for local paths and URLs alike."""
    if "://" in base_dir_uri:
        scheme, rest = base_dir_uri.split("://", 1)
        return f"{scheme}://{posixpath.join(rest.rstrip('/'), name)}"
    return posixpath.join(base_dir_uri, name)


def access_denied(what: str, uri: str, exc: PermissionError) -> ZooError:
    """The user error for a read of ``uri`` that its store (or the local file system) refused.

    ``what`` names the thing read ("zoo manifest", "checkpoint file"); object
    stores answer a denied read with 403, which s3fs turns into a bare
    ``PermissionError('Forbidden')`` that names no object.
    """
    return ZooError(
        f"{what} {uri}: access denied ({exc}). Check that the credentials (for s3: -S key=... -S secret=..., "
        "AWS_* variables or the instance role) may read it, and the bucket policy."
    )


@contextlib.contextmanager
def access_checked(what: str, uri: str) -> Iterator[None]:
    """Storage reads of ``uri`` inside the block: one that is refused raises :func:`access_denied`'s error."""
    try:
        yield
    except PermissionError as exc:
        raise access_denied(what, uri, exc) from None
