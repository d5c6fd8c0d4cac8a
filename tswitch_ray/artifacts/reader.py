"""Reading a committed artifact set: manifest first, then only the row groups a read needs.

A set without ``manifest.json`` does not exist for the reader, whatever parts
are staged (see :mod:`tswitch_ray.artifacts.writer`). Nothing is returned that
the manifest did not commit: the manifest is checked against its digest at
open, every row read against its ``row_sha256`` and its part's committed row
digests, every decoded payload against its ``payload_sha256``, and a part read
whole against its file sha256 (docs/ARTIFACTS.md "Integrity").
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tswitch_ray.artifacts.encoding import EncodedSwitch, decode_switch, payload_sha256
from tswitch_ray.artifacts.integrity import row_digest, rows_digest
from tswitch_ray.artifacts.manifest import ALPHA_TOL
from tswitch_ray.artifacts.schema import (
    METADATA_COLUMNS,
    PART_SCHEMA,
    PAYLOAD_COLUMNS,
    ROW_DIGEST_COLUMNS,
    Manifest,
    PartEntry,
)
from tswitch_ray.artifacts.versions import VersionStore, committed_manifest, version_of
from tswitch_ray.errors import ArtifactError
from tswitch_ray.io.atomic import sha256_hex
from tswitch_ray.io.fs import open_fs


def check_parts_present(fs: Any, root: str, uri: str, m: Manifest,
                        listing: dict[str, Any] | None = None) -> None:
    """Every part ``m`` lists exists under ``root`` with its recorded size (``listing``: path -> size, if known)."""
    if listing is None:
        listing = {}
        # One listing per parts folder: a version's parts may lie in the folders of earlier versions' tasks.
        for folder in sorted({p.path.rsplit("/", 1)[0] for p in m.parts}):
            fs.invalidate_cache(f"{root}/{folder}")
            try:
                found = fs.find(f"{root}/{folder}", detail=True)
            except FileNotFoundError:
                continue
            listing.update({p.rstrip("/"): d.get("size") for p, d in found.items()})
    for part in m.parts:
        path = f"{root}/{part.path}"
        if path not in listing:
            raise ArtifactError(f"{uri}: part {part.path} listed in the manifest is missing; "
                                "the artifact set is incomplete (deleted or partially copied).")
        if listing[path] is not None and int(listing[path]) != part.bytes:
            raise ArtifactError(f"{uri}: part {part.path} has {listing[path]} bytes, the manifest says "
                                f"{part.bytes}; the part is corrupt or was replaced.")


# Read along with any requested columns, so that every row read can be checked.
_CHECK_COLUMNS = (*ROW_DIGEST_COLUMNS, "row_sha256")


class ArtifactReader:
    """Read a committed artifact set; anything without a manifest does not exist.

    At open, the manifest is checked (:func:`~tswitch_ray.artifacts.manifest.load_manifest`:
    format, version, its own digest, knobs consistent with the scope) and
    every listed part must exist with its recorded size. ``verify="rows"``
    (default) then checks on every read, reading only the row groups needed:
    Parquet page CRCs, each row against its ``row_sha256`` and the part's
    committed row digests (``rows_sha256``), each decoded payload against its
    ``payload_sha256``; a part read whole is hashed against the manifest.
    ``verify="full"`` also hashes every part file at open (reads the whole
    set once); :meth:`verify` does that on demand. ``version``: read that
    committed version of the set (docs/ARTIFACTS.md "Versions"); the latest by default.
    """

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None,
                 verify: Literal["rows", "full"] = "rows", version: int | None = None) -> None:
        self.uri = uri.rstrip("/") or uri
        self.storage_options = storage_options or {}
        self.fs, self.root = open_fs(uri, self.storage_options)
        raw = VersionStore(self.uri, self.storage_options).manifest_raw(version)
        self.manifest, self._m = committed_manifest(raw, self.uri, version)
        check_parts_present(self.fs, self.root, self.uri, self._m)
        self._knobs = {(k.task, self._alpha(k.alpha)): k.knob for k in (self._m.knobs or [])}
        self._tensor_parts: dict[str, list[PartEntry]] = {}
        for p in self._m.parts:
            for name in p.tensors:
                self._tensor_parts.setdefault(name, []).append(p)
        self._committed: dict[str, frozenset[str]] = {}  # part path -> its committed row digests
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
    def version(self) -> int:
        """The version of the set this reader reads (1 for sets built before versions existed)."""
        return version_of(self.manifest)

    @property
    def scope(self) -> str:
        return self._m.scope

    @property
    def cut(self) -> str:
        """The threshold cut rule; "exact" for sets written before it was recorded."""
        return self._m.cut

    @property
    def knob_mode(self) -> str:
        return self._m.knob_mode

    @property
    def tensors(self) -> list[str]:
        return list(self.manifest.get("tensors") or sorted(self._tensor_parts))

    def _abs(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def verify(self) -> None:
        """Hash every part file against the manifest; ``ArtifactError`` names the first bad one."""
        for part in self._m.parts:
            self._whole(part)

    def _whole(self, part: PartEntry) -> bytes:
        """The bytes of ``part``, checked against the manifest's sha256 of the file."""
        try:
            data = self.fs.cat_file(self._abs(part.path))
        except FileNotFoundError as exc:
            raise ArtifactError(f"{self.uri}: part {part.path} is missing.") from exc
        if sha256_hex(data) != part.sha256:
            raise ArtifactError(f"{self.uri}: part {part.path} fails its sha256 checksum "
                                f"(manifest {part.sha256[:12]}…, file {sha256_hex(data)[:12]}…); the part is corrupt "
                                "or was replaced. Rebuild the set or restore the part.")
        return data

    def _alpha(self, alpha: float) -> float:
        for a in self._m.alphas:
            if abs(a - float(alpha)) <= ALPHA_TOL:
                return a
        raise ArtifactError(f"{self.uri}: alpha {alpha} was not built (available: {self.alphas}).")

    def _task(self, task: str) -> str:
        if task not in self._m.tasks:
            raise ArtifactError(f"{self.uri}: task {task!r} is not in this artifact set (tasks: {self.tasks}).")
        return task

    def _parquet(self, part: PartEntry, columns: Sequence[str] | None, filters: Any, source: Any = None) -> pa.Table:
        try:
            return pq.read_table(source if source is not None else self._abs(part.path),
                                 filesystem=None if source is not None else self.fs,
                                 columns=list(columns) if columns else None, filters=filters,
                                 page_checksum_verification=True)
        except FileNotFoundError as exc:
            raise ArtifactError(f"{self.uri}: part {part.path} is missing.") from exc
        except (OSError, pa.ArrowException) as exc:
            raise ArtifactError(f"{self.uri}: part {part.path} cannot be read ({exc}); the part is corrupt.") from exc

    def _committed_rows(self, part: PartEntry) -> frozenset[str]:
        """The row digests ``part`` holds, checked against the manifest's ``rows_sha256`` (read once per part)."""
        if part.path not in self._committed:
            digests = self._parquet(part, ["row_sha256"], None).column("row_sha256").to_pylist()
            if rows_digest(digests) != part.rows_sha256:
                raise ArtifactError(
                    f"{self.uri}: part {part.path} does not hold the rows the manifest committed (its row digests "
                    f"hash to {rows_digest(digests)[:12]}…, the manifest says {part.rows_sha256[:12]}…); the part "
                    "was replaced or edited. Rebuild the set or restore the part.")
            self._committed[part.path] = frozenset(digests)
        return self._committed[part.path]

    def _read(self, part: PartEntry, columns: Sequence[str] | None, filters: Any) -> pa.Table:
        """Rows of ``part`` (``columns``; all when None), each checked to be a row the manifest committed.

        A read of every row group with every column fetches the whole file
        anyway: then it is hashed against the manifest first.
        """
        whole = filters is None and (columns is None or any(c in PAYLOAD_COLUMNS for c in columns))
        if whole:
            t = self._parquet(part, None, None, source=io.BytesIO(self._whole(part)))
        else:
            wanted = None if columns is None else list(dict.fromkeys([*columns, *_CHECK_COLUMNS]))
            t = self._parquet(part, wanted, filters)
        committed = self._committed_rows(part)
        lacking = [c for c in _CHECK_COLUMNS if c not in t.column_names]
        if lacking:
            raise ArtifactError(f"{self.uri}: part {part.path} lacks the columns {lacking}; it is not a part of "
                                "this set (replaced or edited). Rebuild the set or restore the part.")
        for row in t.select(list(_CHECK_COLUMNS)).to_pylist():
            self._check_row(row, part, committed)
        return t if columns is None else t.select(list(columns))

    def _check_row(self, row: dict[str, Any], part: PartEntry, committed: frozenset[str]) -> None:
        where = f"{self.uri}: part {part.path}, task {row['task']!r}, alpha {row['alpha']}, tensor {row['tensor']!r}"
        try:
            digest = row_digest(row)
        except TypeError:  # a column of a type no writer produces
            digest = None
        if digest != row["row_sha256"]:
            raise ArtifactError(f"{where}: the row does not match its row_sha256 (its key, header or payload digest "
                                "was edited); the part is corrupt or was tampered with. Rebuild the set.")
        if row["row_sha256"] not in committed:
            raise ArtifactError(f"{where}: the row is not one the manifest committed; the part was replaced. "
                                "Rebuild the set or restore the part.")

    def table(self, columns: Sequence[str] | None = None, filters: Any = None) -> pa.Table:
        """Rows of every part; metadata columns only unless ``columns`` names payload ones.

        ``filters`` is anything ``pyarrow.parquet.read_table`` accepts, e.g.
        ``[("task", "==", "cars"), ("alpha", "==", 0.6)]``. Every row is checked
        as in :meth:`switch` (payload digests only where payloads are read).
        """
        cols = list(columns) if columns else list(METADATA_COLUMNS)
        tables = [self._read(p, cols, filters) for p in self._m.parts]
        if not tables:
            return PART_SCHEMA.empty_table().select(cols)
        return pa.concat_tables(tables)

    def rows(self, task: str, alpha: float) -> pa.Table:
        """Metadata rows of one (task, alpha)."""
        return self.table(filters=[("task", "==", self._task(task)), ("alpha", "==", self._alpha(alpha))])

    def _knob_of(self, row: dict[str, Any], where: str) -> float:
        """THE knob of a switch: the manifest's table for scope "model", the row's own for scope "tensor"."""
        if self._m.scope == "model":
            return self._knobs[(row["task"], self._alpha(row["alpha"]))]
        if row["knob"] is None:
            raise ArtifactError(f"{where}: scope 'tensor' but the row has no knob; the part is invalid.")
        return float(row["knob"])

    def knob(self, task: str, alpha: float, tensor: str | None = None) -> float:
        """The knob of a switch, as :meth:`switch` returns it (scope "tensor": name the tensor)."""
        a = self._alpha(alpha)
        if self._m.scope == "model":
            return self._knobs[(self._task(task), a)]
        if tensor is None:
            raise ArtifactError(f"{self.uri}: scope 'tensor' has one knob per tensor; name the tensor.")
        row, part = self._find_row(self._task(task), a, tensor, list(_CHECK_COLUMNS))
        return self._knob_of(row, f"{self.uri}: part {part.path}, tensor {tensor!r}")

    def _encoded_row(self, row: dict[str, Any], part: PartEntry) -> tuple[EncodedSwitch, tuple[int, ...], float]:
        """(encoded switch, shape, knob) of a row :meth:`_read` checked; the payload is checked against its digest here."""
        digest = payload_sha256(row["mask_bits"], row["rem_bits"], row["sign_bits"])
        if digest != row["payload_sha256"]:
            raise ArtifactError(f"{self._where(row, part)}: payload fails its sha256 checksum; the part is corrupt.")
        enc = EncodedSwitch(numel=row["numel"], kept=row["kept"], k=row["k"], inverted=row["inverted"],
                            mask_bits=row["mask_bits"], rem_bits=row["rem_bits"], sign_bits=row["sign_bits"],
                            codec=row["codec"])
        return enc, tuple(row["shape"]), self._knob_of(row, self._where(row, part))

    def _where(self, row: dict[str, Any], part: PartEntry) -> str:
        return f"{self.uri}: part {part.path}, task {row['task']!r}, alpha {row['alpha']}, tensor {row['tensor']!r}"

    def _decode_row(self, row: dict[str, Any], part: PartEntry) -> tuple[np.ndarray, np.ndarray, float]:
        """(mask, positive, knob) of a row :meth:`_read` checked, shaped like the tensor."""
        enc, shape, knob = self._encoded_row(row, part)
        try:
            mask, positive = decode_switch(enc)
        except ArtifactError as exc:
            raise ArtifactError(f"{self._where(row, part)}: {exc}") from exc
        return mask.reshape(shape), positive.reshape(shape), knob

    @staticmethod
    def _holds(part: PartEntry, task: str) -> bool:
        """Whether ``part`` may hold rows of ``task`` (parts of older sets list no tasks: any may)."""
        return part.tasks is None or task in part.tasks

    def _find_row(self, task: str, alpha: float, tensor: str,
                  columns: list[str] | None) -> tuple[dict[str, Any], PartEntry]:
        parts = self._tensor_parts.get(tensor) if self._tensor_parts else self._m.parts
        parts = [p for p in parts or [] if self._holds(p, task)]
        if not parts:
            raise ArtifactError(f"{self.uri}: tensor {tensor!r} is not in this artifact set.")
        flt = [("task", "==", task), ("alpha", "==", alpha), ("tensor", "==", tensor)]
        for p in parts:
            t = self._read(p, columns, flt)
            if t.num_rows:
                return t.to_pylist()[0], p
        raise ArtifactError(f"{self.uri}: no switch for task {task!r}, alpha {alpha}, tensor {tensor!r}.")

    def switch(self, task: str, alpha: float, tensor: str) -> tuple[np.ndarray, np.ndarray, float]:
        """(mask, positive, knob) of one tensor, shaped like the tensor; reads only that row's row group."""
        row, part = self._find_row(self._task(task), self._alpha(alpha), tensor, None)
        return self._decode_row(row, part)

    def _task_rows(self, task: str, alpha: float) -> Iterator[tuple[dict[str, Any], PartEntry]]:
        """Every row of ``task`` at ``alpha`` with its part, one part in memory at a time."""
        task, a = self._task(task), self._alpha(alpha)
        flt = [("task", "==", task), ("alpha", "==", a)]
        for p in self._m.parts:
            if not self._holds(p, task):
                continue
            t = self._read(p, None, flt)
            for batch in t.to_batches(max_chunksize=1):
                for row in batch.to_pylist():
                    yield row, p

    def iter_encoded(self, task: str, alpha: float) -> Iterator[tuple[str, EncodedSwitch, tuple[int, ...], float, str]]:
        """Yield ``(tensor, encoded switch, shape, knob, where)`` for every tensor, checked as :meth:`switch` but
        not decoded; ``where`` names the row for a decode error. One part in memory at a time."""
        for row, p in self._task_rows(task, alpha):
            enc, shape, knob = self._encoded_row(row, p)
            yield row["tensor"], enc, shape, knob, self._where(row, p)

    def iter_switches(self, task: str, alpha: float) -> Iterator[tuple[str, np.ndarray, np.ndarray, float]]:
        """Yield ``(tensor, mask, positive, knob)`` for every tensor, one part in memory at a time."""
        for row, p in self._task_rows(task, alpha):
            mask, positive, knob = self._decode_row(row, p)
            yield row["tensor"], mask, positive, knob
