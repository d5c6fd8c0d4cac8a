"""Storage faults as user errors: the one translation layer of the I/O and Ray boundaries.

Every storage call of the product that a user's environment can break (a
full disk, a denied read, a symlink loop, an unknown URI scheme, an object
store that does not answer) runs inside :func:`storage_errors`, which turns
the low-level exception into one ``TSwitchError`` paragraph naming the URI,
the cause and what to do. :func:`translate` is the same mapping for an
exception caught elsewhere: the Ray executor uses it on a worker's error (which
arrives wrapped in ``RayTaskError``) and the CLI on anything that escaped.

Anything not recognised is left alone: it is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Iterator
from typing import Any

from tswitch_ray.errors import ServiceError, StorageError, TSwitchError

# A probe of an object-store endpoint (see check_endpoint): this many connects, each this long.
ENDPOINT_CONNECT_TIMEOUT_S = 3.0
ENDPOINT_ATTEMPTS = 2
ENDPOINT_DEADLINE_S = ENDPOINT_CONNECT_TIMEOUT_S * ENDPOINT_ATTEMPTS + 0.5 * (ENDPOINT_ATTEMPTS - 1)

_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
_DENIED = {errno.EACCES, errno.EPERM}


def _unreachable_types() -> tuple[type[BaseException], ...]:
    """Exception types meaning "the endpoint does not answer" (imported lazily: botocore/aiohttp are optional)."""
    types: list[type[BaseException]] = [ConnectionError, socket.timeout]
    with contextlib.suppress(ImportError):
        from botocore.exceptions import ConnectionError as BotoConnectionError

        types.append(BotoConnectionError)
    with contextlib.suppress(ImportError):
        from aiohttp import ClientConnectorError

        types.append(ClientConnectorError)
    return tuple(types)


def endpoint_of(uri: str, storage_options: dict[str, Any] | None) -> str:
    """The object-store endpoint ``uri`` is read from: the configured endpoint URL, else the URI's scheme."""
    opts = storage_options or {}
    endpoint = opts.get("endpoint_url") or (opts.get("client_kwargs") or {}).get("endpoint_url")
    return str(endpoint) if endpoint else f"the default {uri.split('://', 1)[0]} endpoint"


def translate(exc: BaseException, uri: str, what: str = "file", storage_options: dict[str, Any] | None = None,
              *, error: type[TSwitchError] = StorageError) -> TSwitchError | None:
    """The user error for ``exc`` raised by storage access of ``uri`` (``what`` names it), or None for a bug.

    ``error`` is the class for faults of the data itself (denied, missing);
    environment faults (disk full, read-only, symlink loop, unknown scheme)
    are ``StorageError`` and an unreachable endpoint is ``ServiceError``.
    """
    if isinstance(exc, TSwitchError):
        return exc
    where = f"{what} {uri}"
    if isinstance(exc, ValueError) and str(exc).startswith("Protocol not known"):
        scheme = uri.split("://", 1)[0] if "://" in uri else "?"
        return StorageError(
            f"{where}: unknown URI scheme {scheme!r} ({exc}). Use a local path, file://, memory:// or an "
            "object-store URL such as s3://bucket/key."
        )
    if isinstance(exc, _unreachable_types()) and not isinstance(exc, (FileNotFoundError, PermissionError)):
        return ServiceError(
            f"{where}: the object store at {endpoint_of(uri, storage_options)} does not answer "
            f"({type(exc).__name__}: {exc}). Nothing was committed. Start it or fix the endpoint "
            "(--s3-endpoint / storage option client_kwargs.endpoint_url), then run the command again."
        )
    if not isinstance(exc, OSError):
        return None
    code = exc.errno
    if isinstance(exc, PermissionError) or code in _DENIED:
        return error(
            f"{where}: access denied ({exc}). Check that the credentials (for s3: -S key=... -S secret=..., "
            "AWS_* variables or the instance role) or the file's permissions allow it, and the bucket policy."
        )
    if code in _NO_SPACE:
        return StorageError(
            f"{where}: no space left on the device (or quota exceeded) ({exc}). Nothing was committed; "
            "free space there or write somewhere else, then run the command again."
        )
    if code == errno.EROFS:
        return StorageError(f"{where}: the file system is read-only ({exc}); write somewhere else.")
    if code == errno.ELOOP:
        return StorageError(
            f"{where}: a symbolic link loop ({exc}); the path's links point at each other. Fix or remove the link."
        )
    if isinstance(exc, FileNotFoundError) or code == errno.ENOENT:
        return error(f"{where}: not found ({exc}).")
    return None


@contextlib.contextmanager
def storage_errors(what: str, uri: str, storage_options: dict[str, Any] | None = None, *,
                   error: type[TSwitchError] = StorageError, missing: bool = False) -> Iterator[None]:
    """Storage calls on ``uri`` inside the block: a fault :func:`translate` knows becomes its user error.

    ``missing=False`` lets ``FileNotFoundError`` through, for callers whose own
    message about a missing file says more (which file of a folder, what to do).
    """
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - translate() picks the faults it knows, the rest re-raise
        if isinstance(exc, FileNotFoundError) and not missing:
            raise
        user = translate(exc, uri, what, storage_options, error=error)
        if user is None or user is exc:
            raise
        raise user from None


def check_endpoint(endpoint_url: str) -> None:
    """``ServiceError`` unless something accepts a TCP connection at ``endpoint_url`` within the deadline.

    botocore and s3fs both retry a refused connection with backoff (a command
    against a dead endpoint used to take 15-28 s to fail); one short connect
    first makes that case fail in at most :data:`ENDPOINT_DEADLINE_S` seconds.
    """
    import time
    from urllib.parse import urlsplit

    parts = urlsplit(endpoint_url if "://" in endpoint_url else f"http://{endpoint_url}")
    host = parts.hostname or "localhost"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    last: OSError | None = None
    for attempt in range(ENDPOINT_ATTEMPTS):
        if attempt:
            time.sleep(0.5)
        try:
            with socket.create_connection((host, port), timeout=ENDPOINT_CONNECT_TIMEOUT_S):
                return
        except OSError as exc:
            last = exc
    raise ServiceError(
        f"The object store at {endpoint_url} does not answer ({last}); gave up after {ENDPOINT_ATTEMPTS} "
        f"connection attempts within {ENDPOINT_DEADLINE_S:.1f} s. Nothing was read or written. Start it or "
        "fix the endpoint (--s3-endpoint / storage option client_kwargs.endpoint_url)."
    )


def unwrap_remote(exc: BaseException) -> BaseException:
    """The original exception of one raised inside a Ray task (``RayTaskError.cause``), else ``exc``."""
    seen = 0
    while seen < 8 and type(exc).__name__.startswith("RayTaskError") and getattr(exc, "cause", None) is not None:
        exc = exc.cause
        seen += 1
    return exc


def user_error_of(exc: BaseException) -> TSwitchError | None:
    """The user error ``exc`` stands for, if any: a ``TSwitchError`` (unwrapped from Ray), or a storage fault
    that names its file (``OSError.filename``) or is an unknown scheme or an unreachable endpoint."""
    exc = unwrap_remote(exc)
    if isinstance(exc, TSwitchError):
        return exc
    filename = getattr(exc, "filename", None)
    return translate(exc, str(filename) if filename else "(a storage URI)", "file")


__all__ = [
    "ENDPOINT_DEADLINE_S",
    "check_endpoint",
    "endpoint_of",
    "storage_errors",
    "translate",
    "unwrap_remote",
    "user_error_of",
]
