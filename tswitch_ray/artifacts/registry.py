"""SQL catalog over committed artifact sets and evaluation results (duckdb).

``Registry(root)`` scans ``root/**/manifest.json`` (committed switch sets) and
``root/**/results.parquet`` (evaluation tables) and exposes three views:

* ``artifacts`` — one row per committed set, with ``valid`` and ``problem``:
  a set that :class:`~tswitch_ray.artifacts.reader.ArtifactReader` would refuse
  at open (unknown format or version, a manifest that fails its digest or is
  inconsistent, a part missing or of another size) is listed with
  ``valid = false`` and the reader's message;
* ``switches`` — one row per (valid set, task, alpha),
* ``results`` — the union of every results table, with ``uri`` = its folder;
* ``versions`` — one row per committed version of each set (docs/ARTIFACTS.md
  "Versions"): its number, whether it is the ``current`` (latest) one, and the
  tasks it ``added``, ``removed``, ``replaced`` (checkpoint changed) and ``kept``
  against the version before it.

Only the manifests, the listing and the result tables are read, never the
switch payloads, unless ``verify_parts`` (then every part of every set is
hashed against its manifest). Columns are documented in docs/ARTIFACTS.md ("Registry").
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import logging
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from tswitch_ray.artifacts.manifest import load_manifest
from tswitch_ray.artifacts.reader import ArtifactReader, check_parts_present
from tswitch_ray.artifacts.schema import (
    MANIFEST_NAME,
    PARTS_DIR,
    RESULTS_NAME,
    RESULTS_SCHEMA,
)
from tswitch_ray.artifacts.versions import VersionStore, version_of, version_path, version_record
from tswitch_ray.errors import ArtifactError, ConfigError
from tswitch_ray.io.fs import normalize_uri, open_fs, uri_of

log = logging.getLogger(__name__)

ARTIFACTS_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("name", pa.string()),
        ("zoo", pa.string()),
        ("fingerprint", pa.string()),
        ("run_key", pa.string()),
        ("tasks", pa.list_(pa.string())),
        ("n_tasks", pa.int64()),
        ("alphas", pa.list_(pa.float64())),
        ("scope", pa.string()),
        ("cut", pa.string()),
        ("knob_mode", pa.string()),
        ("codec", pa.string()),
        ("n_tensors", pa.int64()),
        ("encoded_bytes", pa.int64()),
        ("fp32_bytes", pa.int64()),
        ("ratio", pa.float64()),
        ("bits_per_element", pa.float64()),
        ("created_at", pa.timestamp("us", tz="UTC")),
        ("valid", pa.bool_()),
        ("problem", pa.string()),
        ("version", pa.int64()),
    ]
)

VERSIONS_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("version", pa.int64()),
        ("current", pa.bool_()),
        ("run_key", pa.string()),
        ("created_at", pa.timestamp("us", tz="UTC")),
        ("n_tasks", pa.int64()),
        ("tasks", pa.list_(pa.string())),
        ("added", pa.list_(pa.string())),
        ("removed", pa.list_(pa.string())),
        ("replaced", pa.list_(pa.string())),
        ("kept", pa.list_(pa.string())),
        ("valid", pa.bool_()),
        ("problem", pa.string()),
    ]
)

SWITCHES_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("task", pa.string()),
        ("alpha", pa.float64()),
        ("tensors", pa.int64()),
        ("numel", pa.int64()),
        ("kept", pa.int64()),
        ("kept_fraction", pa.float64()),
        ("encoded_bytes", pa.int64()),
        ("bits_per_element", pa.float64()),
        ("knob", pa.float64()),
    ]
)


def _artifact_row(m: dict[str, Any], uri: str, folder: str, problem: str | None) -> dict[str, Any]:
    """The ``artifacts`` row of manifest ``m``; fields an invalid manifest lacks or mistypes are null."""

    def get(convert: Any, value: Any) -> Any:
        try:
            return None if value is None else convert(value)
        except (TypeError, ValueError):
            return None

    zoo = m.get("zoo") or {}
    if isinstance(zoo, str):
        zoo = {"name": zoo}
    if not isinstance(zoo, dict):
        zoo = {}
    totals = m.get("totals") if isinstance(m.get("totals"), dict) else {}
    tasks = get(lambda v: [str(t) for t in v], m.get("tasks")) if isinstance(m.get("tasks"), list) else None
    alphas = get(lambda v: [float(a) for a in v], m.get("alphas")) if isinstance(m.get("alphas"), list) else None
    tensors = m.get("tensors") if isinstance(m.get("tensors"), list) else []
    return {
        "uri": uri,
        "name": get(str, m.get("name")) or folder.rsplit("/", 1)[-1],
        "zoo": get(str, zoo.get("name")),
        "fingerprint": get(str, zoo.get("fingerprint")),
        "run_key": get(str, m.get("run_key")),
        "tasks": tasks,
        "n_tasks": len(tasks) if tasks is not None else None,
        "alphas": alphas,
        "scope": get(str, m.get("scope")),
        # A manifest without the field predates it: its sets were cut "exact".
        "cut": get(str, m.get("cut", "exact")),
        "knob_mode": get(str, m.get("knob_mode")),
        "codec": get(str, m.get("codec")),
        "n_tensors": len(tensors),
        "encoded_bytes": get(int, totals.get("encoded_bytes", 0)),
        "fp32_bytes": get(int, totals.get("fp32_bytes", 0)),
        "ratio": get(float, totals.get("ratio", 0.0)),
        "bits_per_element": get(float, totals.get("bits_per_element", 0.0)),
        "created_at": _timestamp(m.get("created_at")),
        "valid": problem is None,
        "problem": problem,
        "version": version_of(m),
    }


def _switch_rows(m: dict[str, Any], uri: str) -> list[dict[str, Any]]:
    """The ``switches`` rows of a valid manifest ``m`` (its ``switches`` summaries)."""
    rows = []
    for s in m.get("switches") or []:
        numel = int(s["numel"])
        rows.append({
            "uri": uri,
            "task": s["task"],
            "alpha": float(s["alpha"]),
            "tensors": int(s.get("tensors", 0)),
            "numel": numel,
            "kept": int(s["kept"]),
            "kept_fraction": int(s["kept"]) / numel if numel else 0.0,
            "encoded_bytes": int(s["encoded_bytes"]),
            "bits_per_element": 8 * int(s["encoded_bytes"]) / numel if numel else 0.0,
            "knob": s.get("knob"),
        })
    return rows


def _timestamp(s: Any) -> _dt.datetime | None:
    try:
        t = _dt.datetime.fromisoformat(str(s))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=_dt.timezone.utc)


class Registry:
    """duckdb views ``artifacts``, ``switches`` and ``results`` over everything under ``root_uri``."""

    def __init__(self, root_uri: str, storage_options: dict[str, Any] | None = None,
                 verify_parts: bool = False) -> None:
        self.root_uri = root_uri
        self.storage_options = storage_options or {}
        self.verify_parts = verify_parts
        self.fs, self.root = open_fs(root_uri, self.storage_options)
        self.con = duckdb.connect()
        # Manifests or result files that could not be read, and sets that are invalid: (path, cause).
        self.problems: list[tuple[str, str]] = []
        self.refresh()

    def refresh(self) -> None:
        """Rescan the root and rebuild the views."""
        self.problems = []
        self.fs.invalidate_cache(self.root)
        try:
            listing = {p.rstrip("/"): d.get("size") for p, d in self.fs.find(self.root, detail=True).items()}
        except FileNotFoundError:
            listing = {}
        # Parts folders never hold manifests or results; skip them to keep the scan cheap to reason about.
        files = [f for f in listing if f"/{PARTS_DIR}/" not in f[len(self.root):]]
        manifests = sorted(f for f in files if f.rsplit("/", 1)[-1] == MANIFEST_NAME)
        results = sorted(f for f in files if f.rsplit("/", 1)[-1] == RESULTS_NAME)
        art_rows, sw_rows = self._scan_manifests(manifests, listing)
        self._register("artifacts", pa.Table.from_pylist(art_rows, schema=ARTIFACTS_SCHEMA))
        self._register("versions", pa.Table.from_pylist(self._scan_versions(art_rows), schema=VERSIONS_SCHEMA))
        self._register("switches", pa.Table.from_pylist(sw_rows, schema=SWITCHES_SCHEMA))
        self._register("results", self._scan_results(results))

    def _register(self, name: str, table: pa.Table) -> None:
        # register() replaces an earlier registration of the same name.
        self.con.register(name, table)

    def _scan_manifests(self, paths: list[str], listing: dict[str, Any]
                        ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """One artifacts row per manifest that is a JSON object (valid or not); switches of valid sets only."""
        arts, sws = [], []
        for path in paths:
            folder = path.rsplit("/", 1)[0]
            uri = uri_of(self.fs, folder)
            try:
                raw = self.fs.cat_file(path)
                m = json.loads(raw)
            except (OSError, ValueError) as exc:
                m, cause = None, str(exc)
            else:
                cause = f"a JSON {type(m).__name__}, not an object"
            if not isinstance(m, dict):
                self.problems.append((uri + "/" + MANIFEST_NAME, cause))
                log.warning("registry: skipping unreadable manifest %s: %s", path, cause)
                continue
            problem = self._problem(raw, folder, uri, listing)
            if problem is not None:
                self.problems.append((uri + "/" + MANIFEST_NAME, problem))
            arts.append(_artifact_row(m, uri, folder, problem))
            if problem is None:
                sws.extend(_switch_rows(m, uri))
        return arts, sws

    def _scan_versions(self, arts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One row per committed version of each set: the head, and each earlier version reached from it
        through the ``previous`` digests (a version file that is not the one committed is listed invalid)."""
        rows = []
        for art in arts:
            store = VersionStore(art["uri"], self.storage_options)
            try:
                head = json.loads(store.head_raw() or b"{}")
            except ValueError:
                continue  # an unreadable head is already among the problems
            if not isinstance(head, dict):
                continue
            rows.append(self._version_row(art["uri"], version_record(head), True, art["problem"]))
            for v, _, body, problem in store.history(head):
                if problem is not None:
                    self.problems.append((uri_of(self.fs, f"{store.root}/{version_path(v)}"), problem))
                rows.append(self._version_row(art["uri"], {**version_record(body), "version": v}, False, problem))
        return rows

    @staticmethod
    def _version_row(uri: str, rec: dict[str, Any], current: bool, problem: str | None) -> dict[str, Any]:
        return {"uri": uri, **{k: rec[k] for k in ("version", "run_key", "tasks", "added", "removed", "replaced",
                                                    "kept")},
                "current": current, "created_at": _timestamp(rec["created_at"]), "n_tasks": len(rec["tasks"]),
                "valid": problem is None, "problem": problem}

    def _problem(self, raw: bytes, folder: str, uri: str, listing: dict[str, Any]) -> str | None:
        """Why the reader would refuse the set (its message), or None when it is valid."""
        try:
            _, m = load_manifest(raw, uri)
            check_parts_present(self.fs, folder, uri, m, listing)
            if self.verify_parts:
                ArtifactReader(uri, self.storage_options, verify="full")
        except ArtifactError as exc:
            return str(exc)
        return None

    def _scan_results(self, paths: list[str]) -> pa.Table:
        tables = []
        for path in paths:
            folder = path.rsplit("/", 1)[0]
            try:
                t = pq.read_table(io.BytesIO(self.fs.cat_file(path)))
            except (OSError, pa.ArrowException) as exc:
                self.problems.append((uri_of(self.fs, path), str(exc)))
                log.warning("registry: skipping unreadable results %s: %s", path, exc)
                continue
            tables.append(self._conform(t, uri_of(self.fs, folder), path))
        if not tables:
            return RESULTS_SCHEMA.empty_table()
        return pa.concat_tables(tables, promote_options="permissive")

    def _conform(self, t: pa.Table, uri: str, path: str) -> pa.Table:
        """Give a results table the base columns, in order and type; keep its other columns after them."""
        n = t.num_rows
        cols: dict[str, pa.Array] = {}
        for f in RESULTS_SCHEMA:
            if f.name == "uri":
                cols["uri"] = pa.array([uri] * n, pa.string())
            elif f.name in t.column_names:
                try:
                    cols[f.name] = t.column(f.name).cast(f.type)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                    self.problems.append((uri_of(self.fs, path), f"column {f.name}: {exc}"))
                    cols[f.name] = pa.nulls(n, f.type)
            else:
                cols[f.name] = pa.nulls(n, f.type)
        if n:
            cols["artifact_uri"] = pa.array(
                [normalize_uri(u, self.storage_options) if u else None for u in cols["artifact_uri"].to_pylist()],
                pa.string())
        for name in t.column_names:
            if name not in cols:
                cols[name] = t.column(name)
        return pa.table(cols)

    def query(self, sql: str) -> pa.Table:
        """Run SQL over the views; ``ConfigError`` with duckdb's message on bad SQL."""
        try:
            rel = self.con.sql(sql)
            if rel is None:
                return pa.table({})
            return rel.to_arrow_table() if hasattr(rel, "to_arrow_table") else rel.fetch_arrow_table()
        except duckdb.Error as exc:
            raise ConfigError(f"Registry query over {self.root_uri} failed: {exc}\nSQL: {sql}") from exc

    def close(self) -> None:
        self.con.close()
