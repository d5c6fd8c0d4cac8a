"""Versions of an artifact set: each build of a grown, shrunk or changed zoo commits a new one (docs/ARTIFACTS.md "Versions").

Layout, beside the parts::

    OUT/manifest.json              the latest version, written last: the commit point
    OUT/versions/v<N:05d>.json     version N's manifest, byte for byte (written just before the head)
    OUT/parts/<task_key>/part-<shard:05d>.parquet   one task's rows of one shard

A part holds one task's rows, and its folder is that task's key (the task's
checkpoint identity and the build's options): a version that keeps a task
lists that task's committed parts by their relative paths and digests, so
nothing is copied, on local disk and on object stores alike. The store writes
``versions/v<N>.json`` first and ``manifest.json`` last, so a build that
crashes leaves the previous version as the head; a version file above the
head's version is such a leftover and is never read. Every part a version
lists, reused or new, is read back and checked against the digests the new
manifest records before that manifest is written.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from tswitch_ray.artifacts.integrity import (
    MANIFEST_DIGEST_KEY,
    manifest_digest,
    rows_digest,
)
from tswitch_ray.artifacts.manifest import (
    MANIFEST_COLUMNS,
    PartInfo,
    build_manifest,
    load_manifest,
)
from tswitch_ray.artifacts.schema import MANIFEST_NAME, PARTS_DIR
from tswitch_ray.artifacts.writer import ArtifactWriter, CommitConflict
from tswitch_ray.errors import ArtifactError
from tswitch_ray.io.atomic import atomic_write_fs, exists_fs, sha256_hex
from tswitch_ray.io.fs import open_fs
from tswitch_ray.io.sink import create_exclusive_fs, probe_writable

VERSIONS_DIR = "versions"


def version_path(version: int) -> str:
    """Path of version ``version``'s manifest, relative to the set's root."""
    return f"{VERSIONS_DIR}/v{version:05d}.json"


def version_of(manifest: Mapping[str, Any]) -> int:
    """The version a manifest records (1 for sets committed before versions existed)."""
    v = manifest.get("version", 1)
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 1 else 1


def task_of_part(entry: Mapping[str, Any]) -> str | None:
    """The task whose rows a committed part holds, or None for a part of several tasks (older builds)."""
    tasks = entry.get("tasks")
    return tasks[0] if isinstance(tasks, list) and len(tasks) == 1 else None


def changes_between(previous: Mapping[str, Any] | None, task_keys: Mapping[str, str]) -> dict[str, list[str]]:
    """What a version with ``task_keys`` changes against ``previous``: tasks added, removed, replaced, kept."""
    old = dict((previous or {}).get("task_keys") or {})
    return {
        "added": [t for t in task_keys if t not in old],
        "removed": [t for t in old if t not in task_keys],
        "replaced": [t for t in task_keys if t in old and old[t] != task_keys[t]],
        "kept": [t for t in task_keys if old.get(t) == task_keys[t]],
    }


class VersionStore:
    """The versions committed at ``uri``: the head, any earlier version, and the commit of a new one."""

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None) -> None:
        self.uri = uri.rstrip("/") or uri
        self.storage_options = storage_options or {}
        self.fs, self.root = open_fs(self.uri, self.storage_options)

    # --- reading ----------------------------------------------------------------
    def head_raw(self) -> bytes | None:
        """The bytes of ``manifest.json``, or None when nothing is committed."""
        path = f"{self.root}/{MANIFEST_NAME}"
        self.fs.invalidate_cache(self.root)
        try:
            return self.fs.cat_file(path)
        except FileNotFoundError:
            return None

    def head(self) -> dict[str, Any] | None:
        """The latest version's manifest, checked (:func:`load_manifest`); None when nothing is committed."""
        raw = self.head_raw()
        return None if raw is None else load_manifest(raw, self.uri)[0]

    def manifest_raw(self, version: int | None) -> bytes:
        """The bytes of version ``version``'s manifest (None: the latest); ``ArtifactError`` when not committed."""
        raw = self.head_raw()
        if raw is None:
            raise ArtifactError(
                f"{self.uri}: no committed artifact set ({MANIFEST_NAME} missing). The build was never committed, "
                "is still running, or the URI is wrong; staged parts without a manifest are ignored.")
        if version is None:
            return raw
        try:
            latest = version_of(json.loads(raw))
        except ValueError:
            return raw  # load_manifest names what is wrong with it
        if not isinstance(version, int) or version < 1 or version > latest:
            raise ArtifactError(f"{self.uri}: version {version} was not committed; the set has versions 1 to "
                                f"{latest} (`tswitch registry versions {self.uri}` lists them).")
        return raw if version == latest else self._walk_back(json.loads(raw), version)

    def _walk_back(self, head: dict[str, Any], version: int) -> bytes:
        """Version ``version``'s bytes, reached from ``head`` through each version's ``previous`` digest."""
        data = b""
        for _, data, _, problem in self.history(head, stop=version):
            if problem is not None:
                raise ArtifactError(problem)
        return data

    def history(self, head: dict[str, Any], stop: int = 1) -> list[tuple[int, bytes, dict[str, Any], str | None]]:
        """(version, bytes, body, problem) of each version below ``head``, newest first, down to ``stop``.

        Each is reached through the ``previous`` digest of the one after it: a version file replaced by any
        other manifest, even one consistent with its own digest, is not the committed one (``problem`` says
        so, and every older version, no longer reachable, gets a problem too)."""
        out: list[tuple[int, bytes, dict[str, Any], str | None]] = []
        newer: dict[str, Any] | None = head
        for v in range(version_of(head) - 1, stop - 1, -1):
            where = f"{self.uri}/{version_path(v)}"
            data, body, problem = b"", {}, None
            try:
                data = self.fs.cat_file(f"{self.root}/{version_path(v)}")
                body = json.loads(data)
            except FileNotFoundError:
                problem = f"{where}: version {v}'s manifest is missing (removed, or dropped by a build with overwrite)."
            except ValueError as exc:
                problem = f"{where}: not a valid artifact manifest (not JSON: {exc})."
            if problem is None and newer is None:
                problem = f"{where}: a newer version's manifest is unusable, so this one cannot be checked."
            elif problem is None:
                link = newer.get("previous") if isinstance(newer.get("previous"), dict) else {}
                if not isinstance(body, dict) or link.get("version") != v or \
                        link.get("manifest_sha256") != body.get(MANIFEST_DIGEST_KEY) or \
                        manifest_digest(body) != body.get(MANIFEST_DIGEST_KEY):
                    problem = (f"{where}: this is not the manifest version {v + 1} was built on (the version file "
                               "was replaced or edited after it was committed); do not use it.")
            out.append((v, data, body if isinstance(body, dict) else {}, problem))
            newer = body if problem is None else None
        return out

    # --- committing -------------------------------------------------------------
    def start(self) -> None:
        """Before any work: the output is writable."""
        probe_writable(self.fs, self.root, self.uri, "artifacts")

    def commit(self, run_key: str, given: dict[str, Any], computed: Mapping[str, Sequence[int]],
               reused: Sequence[Mapping[str, Any]], seen_head: bytes | None, overwrite: bool) -> dict[str, Any]:
        """Verify every part, then write ``versions/v<N>.json`` and ``manifest.json`` (last); returns the manifest.

        ``computed``: task key -> shard ids staged by this build; ``reused``:
        the previous version's part entries this one keeps. ``seen_head``: the
        head this build was planned against; another build that committed
        since is not overwritten. ``given["version"]`` is N.
        """
        self.check_open(seen_head, overwrite)
        infos, metas = self._verified_new(computed)
        old_infos, old_metas = self._verified_reused(reused)
        rows = pa.concat_tables([*old_metas, *metas]) if (metas or old_metas) else None
        if rows is None:
            raise ArtifactError(f"{self.uri}: run {run_key!r} has no parts to commit.")
        body = build_manifest(self.uri, run_key, self.root.rsplit("/", 1)[-1], given, [*old_infos, *infos], rows)
        data = json.dumps(body, indent=1).encode()
        version_file = f"{self.root}/{version_path(int(given['version']))}"
        if overwrite:
            atomic_write_fs(self.fs, version_file, data)
        elif not create_exclusive_fs(self.fs, version_file, data):
            # Of two builds committing version N at once, the one that created its file first won; a file
            # the head does not reach is an orphan of a build that died before its manifest: replaced.
            head = self.head()
            if head is not None and version_of(head) >= int(given["version"]):
                raise self._lost_race()
            atomic_write_fs(self.fs, version_file, data)
        atomic_write_fs(self.fs, f"{self.root}/{MANIFEST_NAME}", data)
        if self.head_raw() != data and not overwrite:
            raise self._lost_race()  # another build's manifest landed over this one's
        if overwrite:
            self._prune(body)
        return body

    def check_open(self, seen_head: bytes | None, overwrite: bool = False) -> None:
        """``CommitConflict`` when another build committed here since this one was planned against ``seen_head``.

        The build calls it as each part lands, so a build that lost the race
        stops at its next part instead of encoding everything.
        """
        if not overwrite and self.head_raw() != seen_head:
            raise self._lost_race()

    def _lost_race(self) -> CommitConflict:
        return CommitConflict(f"{self.uri}: another build committed a new version here while this one ran, so this "
                              "build lost the race and stopped; nothing of it was committed and its staged parts "
                              "were removed. Run the build again to make a version on top of that one (or with --overwrite "
                              "to replace it, if it was built with other options).")

    def discard(self, task_keys: Sequence[str]) -> None:
        """After a lost race: remove the staged folders of ``task_keys`` that the current head does not list
        (a task the winner also built has the same key and bytes: its parts are the winner's now)."""
        head = self.head() or {}
        listed = {str(p.get("path", "")).split("/")[1] for p in head.get("parts") or [] if "/" in str(p.get("path"))}
        for key in task_keys:
            folder = f"{self.root}/{PARTS_DIR}/{key}"
            if key not in listed and exists_fs(self.fs, folder):
                self.fs.rm(folder, recursive=True)

    def _verified_new(self, computed: Mapping[str, Sequence[int]]) -> tuple[list[PartInfo], list[pa.Table]]:
        infos: list[PartInfo] = []
        metas: list[pa.Table] = []
        for key, ids in computed.items():
            if ids:
                part_infos, meta = ArtifactWriter(self.uri, key, storage_options=self.storage_options) \
                    ._verified_parts(sorted(ids))
                infos.extend(part_infos)
                metas.append(meta)
        return infos, metas

    def _verified_reused(self, entries: Sequence[Mapping[str, Any]]) -> tuple[list[PartInfo], list[pa.Table]]:
        """The previous version's parts this one keeps, each read back and checked against its recorded digests."""

        def check(entry: Mapping[str, Any]) -> tuple[PartInfo, pa.Table]:
            path = str(entry["path"])
            where = f"{self.uri}: part {path}, committed by the previous version and kept by this one,"
            try:
                data = self.fs.cat_file(f"{self.root}/{path}")
            except FileNotFoundError:
                raise ArtifactError(f"{where} is missing; nothing was committed. Rebuild with overwrite to make "
                                    "the set anew.") from None
            if len(data) != int(entry["bytes"]) or sha256_hex(data) != entry["sha256"]:
                raise ArtifactError(f"{where} does not match the sha256 its manifest records (file "
                                    f"{sha256_hex(data)[:12]}…, recorded {str(entry['sha256'])[:12]}…); it was "
                                    "changed or corrupted. Nothing was committed; rebuild with overwrite.")
            meta = pq.read_table(io.BytesIO(data), columns=MANIFEST_COLUMNS)
            if rows_digest(meta.column("row_sha256").to_pylist()) != entry["rows_sha256"]:
                raise ArtifactError(f"{where} holds other rows than its manifest records; nothing was committed. "
                                    "Rebuild with overwrite.")
            info = PartInfo(shard_id=int(entry["shard_id"]), path=path, sha256=str(entry["sha256"]),
                            rows=int(entry["rows"]), bytes=int(entry["bytes"]),
                            payload_bytes=int(entry.get("payload_bytes", 0)), run_key=path.split("/")[1],
                            tensors=list(entry.get("tensors") or []), tasks=list(entry.get("tasks") or []),
                            rows_sha256=str(entry["rows_sha256"]))
            return info, meta

        if not entries:
            return [], []
        with ThreadPoolExecutor(max_workers=min(8, len(entries))) as pool:
            checked = list(pool.map(check, entries))
        return [i for i, _ in checked], [m for _, m in checked]

    def _prune(self, body: Mapping[str, Any]) -> None:
        """After an overwrite: drop the parts and version files no longer reachable from the new head."""
        keep = {p["path"].split("/")[1] for p in body["parts"]}
        try:
            dirs = self.fs.ls(f"{self.root}/{PARTS_DIR}", detail=False)
        except FileNotFoundError:
            dirs = []
        for d in dirs:
            if d.rstrip("/").rsplit("/", 1)[-1] not in keep:
                self.fs.rm(d, recursive=True)
        mine = version_path(int(body["version"])).rsplit("/", 1)[-1]
        try:
            files = self.fs.ls(f"{self.root}/{VERSIONS_DIR}", detail=False)
        except FileNotFoundError:
            files = []
        for f in files:
            if f.rsplit("/", 1)[-1] != mine and exists_fs(self.fs, f):
                self.fs.rm_file(f)


def version_record(body: Mapping[str, Any]) -> dict[str, Any]:
    """What the registry lists of one version's manifest: its number, run, time and changes."""
    changes = body.get("changes") if isinstance(body.get("changes"), dict) else {}
    tasks = body.get("tasks") if isinstance(body.get("tasks"), list) else []
    return {
        "version": version_of(body),
        "run_key": body.get("run_key"),
        "created_at": body.get("created_at"),
        "tasks": [str(t) for t in tasks],
        "added": [str(t) for t in changes.get("added", tasks)],
        "removed": [str(t) for t in changes.get("removed", [])],
        "replaced": [str(t) for t in changes.get("replaced", [])],
        "kept": [str(t) for t in changes.get("kept", [])],
        "manifest_sha256": body.get(MANIFEST_DIGEST_KEY),
    }


def committed_manifest(raw: bytes, uri: str, version: int | None) -> tuple[dict[str, Any], Any]:
    """:func:`load_manifest` of a version's bytes, and that the body is the version asked for."""
    body, m = load_manifest(raw, uri)
    if version is not None and version_of(body) != version:
        raise ArtifactError(f"{uri}/{version_path(version)}: the manifest says version {version_of(body)}, not "
                            f"{version}; the file was moved or replaced.")
    return body, m

