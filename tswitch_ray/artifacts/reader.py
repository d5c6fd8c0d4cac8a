"""Reading a committed artifact set: manifest first, then only the row groups a read needs.

A set without ``manifest.json`` does not exist for the reader, whatever parts
are staged (see :mod:`tswitch_ray.artifacts.writer`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import ValidationError

from tswitch_ray.artifacts.encoding import EncodedSwitch, decode_switch, payload_sha256
from tswitch_ray.artifacts.manifest import ALPHA_TOL
from tswitch_ray.artifacts.schema import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_NAME,
    METADATA_COLUMNS,
    PART_SCHEMA,
    PARTS_DIR,
    Manifest,
)
from tswitch_ray.errors import ArtifactError
from tswitch_ray.io.atomic import sha256_hex
from tswitch_ray.io.fs import open_fs


class ArtifactReader:
    """Read a committed artifact set; anything without a manifest does not exist.

    ``verify="rows"`` (default) checks at open that every listed part exists
    with its recorded size, and on every read Parquet page CRCs and each
    switch's payload sha256 — reading only the row groups needed.
    ``verify="full"`` also hashes every part file against the manifest at open
    (reads the whole set once); :meth:`verify` does that on demand.
    """

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None,
                 verify: Literal["rows", "full"] = "rows") -> None:
        self.uri = uri.rstrip("/") or uri
        self.storage_options = storage_options or {}
        self.fs, self.root = open_fs(uri, self.storage_options)
        mpath = f"{self.root}/{MANIFEST_NAME}"
        try:
            self.fs.invalidate_cache(mpath)
            raw = self.fs.cat_file(mpath)
        except FileNotFoundError as exc:
            raise ArtifactError(
                f"{self.uri}: no committed artifact set ({MANIFEST_NAME} missing). The build was never committed, "
                "is still running, or the URI is wrong; staged parts without a manifest are ignored."
            ) from exc
        try:
            self.manifest: dict[str, Any] = json.loads(raw)
            self._m = Manifest.model_validate(self.manifest)
        except (ValueError, ValidationError) as exc:
            raise ArtifactError(f"{self.uri}/{MANIFEST_NAME}: not a valid artifact manifest ({exc}).") from exc
        if self._m.format != FORMAT or self._m.format_version > FORMAT_VERSION:
            raise ArtifactError(f"{self.uri}/{MANIFEST_NAME}: format {self._m.format!r} v{self._m.format_version} "
                                f"is not readable by this version (reads {FORMAT!r} up to v{FORMAT_VERSION}).")
        self._check_parts_present()
        self._knobs = {(k.task, k.alpha): k.knob for k in (self._m.knobs or [])}
        self._tensor_parts: dict[str, list[Any]] = {}
        for p in self._m.parts:
            for name in p.tensors:
                self._tensor_parts.setdefault(name, []).append(p)
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
    def scope(self) -> str:
        return self._m.scope

    @property
    def knob_mode(self) -> str:
        return self._m.knob_mode

    @property
    def tensors(self) -> list[str]:
        return list(self.manifest.get("tensors") or sorted(self._tensor_parts))

    def _abs(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def _check_parts_present(self) -> None:
        run_dir = f"{self.root}/{PARTS_DIR}/{self._m.run_key}"
        self.fs.invalidate_cache(run_dir)
        try:
            sizes = {p.rstrip("/"): d.get("size") for p, d in self.fs.find(run_dir, detail=True).items()}
        except FileNotFoundError:
            sizes = {}
        for part in self._m.parts:
            path = self._abs(part.path)
            if path not in sizes:
                raise ArtifactError(f"{self.uri}: part {part.path} listed in the manifest is missing; "
                                    "the artifact set is incomplete (deleted or partially copied).")
            if sizes[path] is not None and int(sizes[path]) != part.bytes:
                raise ArtifactError(f"{self.uri}: part {part.path} has {sizes[path]} bytes, the manifest says "
                                    f"{part.bytes}; the part is corrupt or was replaced.")

    def verify(self) -> None:
        """Hash every part file against the manifest; ``ArtifactError`` names the first bad one."""
        for part in self._m.parts:
            try:
                data = self.fs.cat_file(self._abs(part.path))
            except FileNotFoundError as exc:
                raise ArtifactError(f"{self.uri}: part {part.path} is missing.") from exc
            if sha256_hex(data) != part.sha256:
                raise ArtifactError(f"{self.uri}: part {part.path} fails its sha256 checksum "
                                    f"(manifest {part.sha256[:12]}…, file {sha256_hex(data)[:12]}…); the part is corrupt.")

    def _alpha(self, alpha: float) -> float:
        for a in self._m.alphas:
            if abs(a - float(alpha)) <= ALPHA_TOL:
                return a
        raise ArtifactError(f"{self.uri}: alpha {alpha} was not built (available: {self.alphas}).")

    def _task(self, task: str) -> str:
        if task not in self._m.tasks:
            raise ArtifactError(f"{self.uri}: task {task!r} is not in this artifact set (tasks: {self.tasks}).")
        return task

    def _read(self, rel: str, columns: Sequence[str] | None, filters: Any) -> pa.Table:
        try:
            return pq.read_table(self._abs(rel), filesystem=self.fs, columns=list(columns) if columns else None,
                                 filters=filters, page_checksum_verification=True)
        except FileNotFoundError as exc:
            raise ArtifactError(f"{self.uri}: part {rel} is missing.") from exc
        except (OSError, pa.ArrowException) as exc:
            raise ArtifactError(f"{self.uri}: part {rel} cannot be read ({exc}); the part is corrupt.") from exc

    def table(self, columns: Sequence[str] | None = None, filters: Any = None) -> pa.Table:
        """Rows of every part; metadata columns only unless ``columns`` names payload ones.

        ``filters`` is anything ``pyarrow.parquet.read_table`` accepts, e.g.
        ``[("task", "==", "cars"), ("alpha", "==", 0.6)]``.
        """
        cols = list(columns) if columns else list(METADATA_COLUMNS)
        tables = [self._read(p.path, cols, filters) for p in self._m.parts]
        if not tables:
            return PART_SCHEMA.empty_table().select(cols)
        return pa.concat_tables(tables)

    def rows(self, task: str, alpha: float) -> pa.Table:
        """Metadata rows of one (task, alpha)."""
        return self.table(filters=[("task", "==", self._task(task)), ("alpha", "==", self._alpha(alpha))])

    def knob(self, task: str, alpha: float, tensor: str | None = None) -> float:
        """The knob of a switch: the manifest's table for scope "model", the row's for scope "tensor"."""
        a = self._alpha(alpha)
        if self._m.scope == "model":
            return self._knobs[(self._task(task), a)]
        if tensor is None:
            raise ArtifactError(f"{self.uri}: scope 'tensor' has one knob per tensor; name the tensor.")
        t = self.table(columns=["knob"], filters=[("task", "==", self._task(task)), ("alpha", "==", a),
                                                  ("tensor", "==", tensor)])
        if t.num_rows != 1:
            raise ArtifactError(f"{self.uri}: no switch for task {task!r}, alpha {a}, tensor {tensor!r}.")
        return float(t.column("knob")[0].as_py())

    def _decode_row(self, row: dict[str, Any], part: str) -> tuple[np.ndarray, np.ndarray, float]:
        where = f"{self.uri}: part {part}, task {row['task']!r}, alpha {row['alpha']}, tensor {row['tensor']!r}"
        digest = payload_sha256(row["mask_bits"], row["rem_bits"], row["sign_bits"])
        if digest != row["payload_sha256"]:
            raise ArtifactError(f"{where}: payload fails its sha256 checksum; the part is corrupt.")
        enc = EncodedSwitch(numel=row["numel"], kept=row["kept"], k=row["k"], inverted=row["inverted"],
                            mask_bits=row["mask_bits"], rem_bits=row["rem_bits"], sign_bits=row["sign_bits"],
                            codec=row["codec"])
        try:
            mask, positive = decode_switch(enc)
        except ArtifactError as exc:
            raise ArtifactError(f"{where}: {exc}") from exc
        shape = tuple(row["shape"])
        if self._m.scope == "model":
            knob = self._knobs[(row["task"], self._alpha(row["alpha"]))]
        else:
            knob = row["knob"]
        return mask.reshape(shape), positive.reshape(shape), float(knob)

    def switch(self, task: str, alpha: float, tensor: str) -> tuple[np.ndarray, np.ndarray, float]:
        """(mask, positive, knob) of one tensor, shaped like the tensor; reads only that row's row group."""
        task, a = self._task(task), self._alpha(alpha)
        parts = self._tensor_parts.get(tensor) if self._tensor_parts else self._m.parts
        if not parts:
            raise ArtifactError(f"{self.uri}: tensor {tensor!r} is not in this artifact set.")
        flt = [("task", "==", task), ("alpha", "==", a), ("tensor", "==", tensor)]
        for p in parts:
            t = self._read(p.path, None, flt)
            if t.num_rows:
                return self._decode_row(t.to_pylist()[0], p.path)
        raise ArtifactError(f"{self.uri}: no switch for task {task!r}, alpha {a}, tensor {tensor!r}.")

    def iter_switches(self, task: str, alpha: float) -> Iterator[tuple[str, np.ndarray, np.ndarray, float]]:
        """Yield ``(tensor, mask, positive, knob)`` for every tensor, one part in memory at a time."""
        task, a = self._task(task), self._alpha(alpha)
        flt = [("task", "==", task), ("alpha", "==", a)]
        for p in self._m.parts:
            t = self._read(p.path, None, flt)
            for batch in t.to_batches(max_chunksize=1):
                for row in batch.to_pylist():
                    mask, positive, knob = self._decode_row(row, p.path)
                    yield row["tensor"], mask, positive, knob
