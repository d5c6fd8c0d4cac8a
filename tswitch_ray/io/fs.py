"""Filesystems from URIs: the one place that turns a URI and storage options into an fsspec filesystem.

Every storage access of the product starts here: :func:`open_fs` is the only
caller of ``fsspec.core.url_to_fs`` (tests/test_io.py checks it). URIs are
local paths, ``file://``, ``memory://`` or object-store URLs (``s3://``).
"""

from __future__ import annotations

import contextlib
import os
import posixpath
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from tswitch_ray.errors import ZooError
from tswitch_ray.io.faults import check_endpoint, storage_errors, translate

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

    One options dict is given for a whole run; it is meant for the remote store
    (credentials, endpoint). Local paths never get it, so a local manifest can
    point at s3:// tasks and an s3 manifest at local files without the s3
    options being passed to the local filesystem.
    """
    if is_local(uri) or not storage_options:
        return {}
    return dict(storage_options)


def open_fs(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for ``uri``: the path has no protocol and no trailing slash.

    Local paths are absolute and normalised (``os.path.normpath``), so the
    same location always gives the same path and prefixes can be cut off it.
    """
    options = options_for(uri, storage_options)
    with storage_errors("storage location", uri, options):
        fs, path = fsspec.core.url_to_fs(uri, **options)
    _check_endpoint_once(fs, options)
    if isinstance(fs, LocalFileSystem):
        path = os.path.normpath(path)
    return fs, path.rstrip("/") or "/"


def _check_endpoint_once(fs: fsspec.AbstractFileSystem, options: dict[str, Any]) -> None:
    """Probe a configured object-store endpoint the first time its filesystem is made (see check_endpoint).

    fsspec caches one filesystem per set of options, so the mark on the
    instance means one probe per endpoint and process, not one per call.
    """
    endpoint = options.get("endpoint_url") or (options.get("client_kwargs") or {}).get("endpoint_url")
    if not endpoint or getattr(fs, "_tswitch_endpoint_answered", False):
        return
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")):
        return  # behind a proxy a direct connect proves nothing; botocore's own retries bound the wait
    check_endpoint(str(endpoint))
    fs._tswitch_endpoint_answered = True


def fs_is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def uri_of(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The URI of ``path`` inside ``fs``: local paths stay plain, others get their protocol back."""
    return path if fs_is_local(fs) else fs.unstrip_protocol(path)


def normalize_uri(uri: str, storage_options: dict[str, Any] | None = None) -> str:
    """Canonical spelling of a URI, so that the same location compares equal.

    Local paths become absolute normalised paths (no ``file://``); other
    filesystems keep their protocol (``s3://bucket/key``, ``memory:///a``).
    """
    fs, path = open_fs(uri, storage_options)
    return uri_of(fs, path)


def join_uri(base_dir_uri: str, name: str) -> str:
    """``base_dir_uri/name`` for local paths and URLs alike."""
    if "://" in base_dir_uri:
        scheme, rest = base_dir_uri.split("://", 1)
        return f"{scheme}://{posixpath.join(rest.rstrip('/'), name)}"
    return posixpath.join(base_dir_uri, name)


def resolve_uri(base_dir: str, uri: str, *, tidy_local: bool = False) -> str:
    """``uri`` resolved against the folder ``base_dir`` unless it is absolute or has a scheme.

    Unlike :func:`join_uri`, an absolute ``uri`` (or one with a scheme) is
    kept as it is, and an empty ``base_dir`` leaves ``uri`` relative. The two
    are joined as strings (``"/z" + "./heads"`` gives ``"/z/./heads"``).

    With ``tidy_local`` and a local ``base_dir``, the result is spelled as
    :mod:`pathlib` spells it: ``.`` segments and doubled or trailing slashes
    dropped, ``..`` kept (``"/z/heads"``, ``"/z/../x"``). Eval configs resolve
    this way, and their resolved strings are part of cache keys, so each
    caller keeps the spelling it always had.
    """
    if "://" in uri or uri.startswith("/"):
        return uri
    if tidy_local and "://" not in base_dir:
        return str(Path(base_dir) / uri)
    if not base_dir:
        return uri
    return base_dir.rstrip("/") + "/" + uri


def resolve_against_file(file_uri: str, uri: str) -> str:
    """``uri`` as written in the file at ``file_uri`` (a zoo manifest), made absolute.

    URLs (``scheme://...``) and absolute local paths are kept; relative paths
    are joined to the file's folder and normalised (``./`` and ``..``
    collapsed), keeping the file's scheme. A local ``file_uri`` is made
    absolute first (``~`` expanded, relative to the working directory).
    """
    if "://" in uri or uri.startswith("/"):
        return uri
    uri = uri[2:] if uri.startswith("./") else uri
    if "://" in file_uri:
        scheme, rest = file_uri.split("://", 1)
        folder = posixpath.dirname(rest)
        joined = posixpath.normpath(posixpath.join(folder, uri)) if folder else posixpath.normpath(uri)
        if scheme.lower() == "file" and not joined.startswith("/"):
            joined = "/" + joined
        return f"{scheme}://{joined}"
    folder = os.path.dirname(os.path.abspath(os.path.expanduser(file_uri)))
    return os.path.normpath(os.path.join(folder, uri))


def access_denied(what: str, uri: str, exc: PermissionError) -> ZooError:
    """The user error for a read of ``uri`` that its store (or the local file system) refused.

    ``what`` names the thing read ("zoo manifest", "checkpoint file"); object
    stores answer a denied read with 403, which s3fs turns into a bare
    ``PermissionError('Forbidden')`` that names no object.
    """
    user = translate(exc, uri, what, error=ZooError)
    assert isinstance(user, ZooError)
    return user


def access_checked(what: str, uri: str) -> contextlib.AbstractContextManager[None]:
    """Storage reads of ``uri`` inside the block, with faults translated by io/faults.py's :func:`storage_errors`:
    a refused read is a ``ZooError`` (the input cannot be used); a missing file passes through to the caller's
    own message."""
    return storage_errors(what, uri, error=ZooError)
