"""The one commit lifecycle of everything the product writes (in the style of ray.data's Datasink).

A :class:`Sink` is driven as::

    sink.start()          # before any work: the destination is writable, no other committed output is there
    sink.write(...)       # stage parts (from any worker; staged parts are invisible)
    sink.complete(...)    # verify the staged parts' checksums, publish, write the manifest / marker LAST
    sink.failed()         # on any error instead of complete: staging removed, nothing visible

Readers trust only what a manifest or marker lists, so an output is visible
all at once or not at all; :func:`verify_marker` checks a committed folder's
marker against its own digest and its outputs against the marker. :class:`FolderSink` is the generic one: output
files in a folder and a JSON marker written last (merge outputs use it);
``tswitch_ray.artifacts.ArtifactWriter`` is the switch-artifact sink.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import fsspec

from tswitch_ray import __version__
from tswitch_ray.errors import ArtifactError
from tswitch_ray.io.atomic import FileDigest, atomic_write_fs, exists_fs, remove_tree_fs, sha256_hex
from tswitch_ray.io.faults import storage_errors
from tswitch_ray.io.fs import fs_is_local, open_fs

STAGING_DIR = ".staging"
# 2: the marker carries ``marker_sha256``; markers of version 1 have none and are not verifiable.
MARKER_FORMAT_VERSION = 2
MARKER_DIGEST_KEY = "marker_sha256"


def json_digest(body: Mapping[str, Any], without: str) -> str:
    """sha256 of a JSON object without its own digest key ``without``, in one canonical spelling:
    ``json.dumps(body, sort_keys=True, separators=(",", ":"))`` (ASCII, floats as Python's ``repr``).

    The digest of artifact manifests and commit markers (docs/ARTIFACTS.md "Integrity").
    """
    rest = {k: v for k, v in body.items() if k != without}
    return sha256_hex(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode())


class Sink(ABC):
    """start -> write* -> complete, or failed; see the module docstring."""

    uri: str

    @abstractmethod
    def start(self) -> None:
        """Probe the destination and refuse a committed output this run may not replace; before any work."""

    @abstractmethod
    def write(self, *args: Any, **kwargs: Any) -> Any:
        """Stage one part; staged parts are invisible to readers."""

    @abstractmethod
    def complete(self, *args: Any, **kwargs: Any) -> Any:
        """Verify the staged parts, publish them and write the manifest or marker last."""

    @abstractmethod
    def failed(self) -> None:
        """Remove the staging; nothing of this run becomes visible."""


def probe_writable(fs: fsspec.AbstractFileSystem, root: str, uri: str, what: str) -> None:
    """Write and delete a probe object under ``root``, so a missing bucket or a denied write fails before any work."""
    probe = f"{root}/.tswitch-probe-{uuid.uuid4().hex}"
    try:
        if fs_is_local(fs):  # object stores have no directories, and mkdirs there would create a bucket
            fs.mkdirs(root, exist_ok=True)
        fs.pipe_file(probe, b"")
        fs.rm_file(probe)
    except Exception as exc:  # noqa: BLE001 - every backend raises its own types; all mean "cannot write here"
        raise ArtifactError(
            f"{uri}: cannot write {what} there ({type(exc).__name__}: {exc}). Check that the bucket or "
            "directory exists and that the credentials allow writing (for s3: the endpoint_url, key and secret "
            "storage options, or the AWS_* variables)."
        ) from exc


def create_exclusive_fs(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    """Write ``data`` whole at ``path`` only if nothing is there; False (nothing written) if something is.

    On a local disk: a fsync-ed temporary file linked to ``path`` (``link``
    fails if the name exists, atomically), so of two writers exactly one
    creates it. On an object store: a plain atomic PUT after an existence
    check (the callers read back what they wrote to find a lost race).
    """
    path = fs._strip_protocol(path)
    if not fs_is_local(fs):
        if exists_fs(fs, path):
            return False
        atomic_write_fs(fs, path, data)
        return True
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.new-{uuid.uuid4().hex}")
    atomic_write_fs(fs, tmp, data)
    try:
        with storage_errors("cannot write", path, fs.storage_options, missing=True):
            os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


def read_marker(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, Any] | None:
    """The JSON object at ``path``, or None when there is none (or it is unreadable: then nothing is committed)."""
    if not exists_fs(fs, path):
        return None
    try:
        body = json.loads(fs.cat_file(path))
    except (FileNotFoundError, ValueError):
        return None
    return body if isinstance(body, dict) else None


def _check_files(fs: fsspec.AbstractFileSystem, files: Sequence[FileDigest], path_of: Callable[[FileDigest], str],
                 missing: Callable[[FileDigest], str], changed: Callable[[FileDigest, bytes], str]) -> None:
    """Read every file back and check its size and sha256; ``ArtifactError`` (``missing`` / ``changed``) otherwise."""

    def check(f: FileDigest) -> None:
        try:
            data = fs.cat_file(path_of(f))
        except FileNotFoundError:
            raise ArtifactError(missing(f)) from None
        if len(data) != f.bytes or sha256_hex(data) != f.sha256:
            raise ArtifactError(changed(f, data))

    # Reading and hashing release the GIL: files verify side by side.
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(files)))) as pool:
        list(pool.map(check, files))


def verify_digests(fs: fsspec.AbstractFileSystem, files: Sequence[FileDigest], what: str) -> None:
    """Read every staged file back and check its size and sha256; ``ArtifactError`` names the first bad one."""
    _check_files(
        fs, files, lambda f: fs._strip_protocol(f.uri),
        lambda f: f"{f.uri}: staged {what} part is missing; it was removed while the run went on.",
        lambda f, data: (f"{f.uri}: staged {what} part does not match the checksum its writer recorded "
                         f"({len(data)} bytes, sha256 {sha256_hex(data)[:12]}…; written {f.bytes} bytes, "
                         f"{f.sha256[:12]}…); it was changed or corrupted after it was written."))


def verify_marker(uri: str, marker: str, storage_options: dict[str, Any] | None = None,
                  fmt: str | None = None) -> dict[str, Any] | None:
    """The marker of the output committed in folder ``uri``, checked; None when nothing is committed there.

    Checked: the marker is a JSON object of format ``fmt`` (when given) and
    version :data:`MARKER_FORMAT_VERSION`, matches its ``marker_sha256``, and
    every output it lists exists inside the folder with its recorded size and
    sha256. Anything else is an ``ArtifactError`` naming the file: the output
    was changed after it was committed (or by an older version), and is not used.
    """
    base = uri.rstrip("/") or uri
    fs, root = open_fs(base, storage_options)
    where = f"{base}/{marker}"
    path = f"{root}/{marker}"
    fs.invalidate_cache(root)
    if not exists_fs(fs, path):
        return None
    redo = f"Remove {base} (or commit it again with overwrite) to make it anew."
    try:
        body = json.loads(fs.cat_file(path))
    except (FileNotFoundError, ValueError) as exc:
        raise ArtifactError(f"{where}: the commit marker is unreadable ({exc}). {redo}") from exc
    if not isinstance(body, dict):
        raise ArtifactError(f"{where}: the commit marker is not a JSON object. {redo}")
    if fmt is not None and body.get("format") != fmt:
        raise ArtifactError(f"{where}: field 'format' is {body.get('format')!r}, expected {fmt!r}. {redo}")
    if body.get("format_version") != MARKER_FORMAT_VERSION:
        raise ArtifactError(f"{where}: field 'format_version' is {body.get('format_version')!r}; this version "
                            f"verifies only version {MARKER_FORMAT_VERSION} markers, which carry their own digest. "
                            f"{redo}")
    if body.get(MARKER_DIGEST_KEY) != json_digest(body, MARKER_DIGEST_KEY):
        raise ArtifactError(f"{where}: the commit marker does not match its {MARKER_DIGEST_KEY!r}; it was edited "
                            f"or corrupted after the commit. {redo}")
    outputs = body.get("outputs")
    if not isinstance(outputs, list):
        raise ArtifactError(f"{where}: field 'outputs' is not a list. {redo}")
    files = [_listed_output(o, base, where, redo) for o in outputs]

    _check_files(
        fs, files, lambda f: f"{root}/{f.uri[len(base) + 1:]}",
        lambda f: f"{f.uri}: output listed in {marker} is missing. {redo}",
        lambda f, data: (f"{f.uri}: output does not match the checksum {marker} records ({len(data)} bytes, "
                         f"sha256 {sha256_hex(data)[:12]}…; committed {f.bytes} bytes, {f.sha256[:12]}…); it was "
                         f"changed or corrupted after the commit. {redo}"))
    return body


def _listed_output(entry: Any, base: str, where: str, redo: str) -> FileDigest:
    """One ``outputs`` entry of a marker as a digest, refusing paths that leave the folder."""
    try:
        rel, sha, size = entry["path"], entry["sha256"], int(entry["bytes"])
    except (TypeError, KeyError, ValueError):
        raise ArtifactError(f"{where}: an entry of 'outputs' lacks path, sha256 or bytes: {entry!r}. {redo}") from None
    if not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel or ".." in rel.split("/") \
            or "://" in rel:
        raise ArtifactError(f"{where}: output path {rel!r} is not a file inside the folder. {redo}")
    return FileDigest(f"{base}/{rel}", str(sha), size)


def _canonical(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, keys strings)."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


class FolderSink(Sink):
    """Output files in one folder, made visible together by a JSON marker written last.

    Parts are staged under ``<uri>/.staging/<staging_key>/``. ``identity``
    says what the output is (e.g. method, options, zoo fingerprint); a
    committed output with another identity is refused at :meth:`start`
    unless ``overwrite``, one with the same identity is replaced. The marker
    holds ``format``, ``format_version``, the identity, ``details``,
    ``outputs`` (path relative to the folder, sha256, bytes of each file),
    ``created_at``, ``tool_version`` and ``marker_sha256`` (its own digest,
    :func:`json_digest`); :func:`verify_marker` checks all of it.
    """

    def __init__(self, uri: str, *, marker: str, fmt: str, identity: Mapping[str, Any], staging_key: str,
                 what: str, storage_options: dict[str, Any] | None = None, overwrite: bool = False) -> None:
        if not staging_key or "/" in staging_key or staging_key.startswith("."):
            raise ValueError(f"staging_key must be a plain, non-empty name, got {staging_key!r}")
        self.uri = uri.rstrip("/") or uri
        self.marker, self.fmt, self.what = marker, fmt, what
        self.identity = _canonical(dict(identity))
        self.storage_options = storage_options or {}
        self.overwrite = overwrite
        self.fs, self.root = open_fs(self.uri, self.storage_options)
        self.staging_uri = f"{self.uri}/{STAGING_DIR}/{staging_key}"
        self._staging = f"{self.root}/{STAGING_DIR}/{staging_key}"
        self._marker_path = f"{self.root}/{marker}"

    def committed(self) -> dict[str, Any] | None:
        """The marker of the output committed here, if any."""
        return read_marker(self.fs, self._marker_path)

    def start(self) -> None:
        probe_writable(self.fs, self.root, self.uri, self.what)
        previous = self.committed()
        if previous is None or self.overwrite:
            return
        differs = {k: v for k, v in self.identity.items() if previous.get(k) != v}
        if differs:
            was = ", ".join(f"{k} {previous.get(k)!r}" for k in differs)
            now = ", ".join(f"{k} {v!r}" for k, v in differs.items())
            raise ArtifactError(
                f"{self.uri}: committed {self.what} already exist there (marker {self.marker}, made with {was}, "
                f"at {previous.get('created_at')}); refusing to replace them with {now}. Choose another output "
                "location or set overwrite."
            )

    def staged(self, rel: str) -> str:
        """URI of the staged part ``rel`` (for writers that stream to it themselves)."""
        return f"{self.staging_uri}/{rel}"

    def write(self, rel: str, data: bytes) -> FileDigest:
        """Stage ``data`` as part ``rel``; returns its digest for :meth:`complete`."""
        atomic_write_fs(self.fs, f"{self._staging}/{rel}", data)
        return FileDigest(self.staged(rel), sha256_hex(data), len(data))

    def complete(self, staged: Sequence[FileDigest], publish: Callable[[], Sequence[FileDigest]],
                 details: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Verify ``staged``, run ``publish`` (which writes the outputs from them), then write the marker last.

        The old marker goes first: from then until the new one is written no
        marker claims the folder is complete. Returns the marker written.
        """
        verify_digests(self.fs, staged, self.what)
        if exists_fs(self.fs, self._marker_path):
            self.fs.rm_file(self._marker_path)
        outputs = publish()
        body = {
            "format": self.fmt,
            "format_version": MARKER_FORMAT_VERSION,
            **self.identity,
            **_canonical(dict(details or {})),
            "outputs": [{"path": self._relative(o.uri), "sha256": o.sha256, "bytes": o.bytes} for o in outputs],
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "tool_version": __version__,
        }
        body[MARKER_DIGEST_KEY] = json_digest(body, MARKER_DIGEST_KEY)
        atomic_write_fs(self.fs, self._marker_path, json.dumps(body, indent=1).encode())
        remove_tree_fs(self.fs, self._staging)
        self._clean_staging_root()
        return body

    def failed(self) -> None:
        remove_tree_fs(self.fs, self._staging)
        self._clean_staging_root()

    def _relative(self, uri: str) -> str:
        return uri[len(self.uri) + 1:] if uri.startswith(self.uri + "/") else uri

    def _clean_staging_root(self) -> None:
        """Drop ``.staging`` itself once no run stages there (object stores have no empty folders to drop)."""
        root = f"{self.root}/{STAGING_DIR}"
        if fs_is_local(self.fs):
            try:
                self.fs.rmdir(root)
            except OSError:  # missing, or another run's staging is still in it
                pass
