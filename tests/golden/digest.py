"""Digests of what tswitch writes, taken from the files' semantic content only.

Used by the golden byte-identity test (tests/test_golden_identity.py) and its
recorder (tests/golden/record.py). Everything here reads the product's files
with fsspec, json, pyarrow and hashlib only, never with tswitch_ray's own
readers: those are what the restructure of issue 13 moves, and a digest taken
through them could hide a change they made themselves.

A digest holds no temp path and none of the metadata a later change may
legitimately add or reword (creation times, run keys, zoo fingerprints and
URIs, part file names and sizes, safetensors header metadata, results
``uri``/``seconds``). Floats are written with ``float.hex()``: exact to the bit
and still readable in a diff.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import struct
from typing import Any

import fsspec
import pyarrow.parquet as pq

#: The columns of an artifact part today (docs/ARTIFACTS.md). A later issue may add columns;
#: those are ignored, while a missing or changed one shows up in the row's hash.
PART_COLUMNS = (
    "task", "tensor", "alpha", "scope", "knob_mode", "shape", "dtype", "numel",
    "n_pos", "n_neg", "d_pos", "d_neg", "t_pos", "t_neg", "kept", "sum_abs", "sum_sq", "knob",
    "codec", "k", "inverted", "mask_bits", "rem_bits", "sign_bits", "payload_bytes", "payload_sha256",
)
#: Path-free manifest fields that describe what the artifact set holds.
MANIFEST_FIELDS = ("format", "format_version", "tasks", "alphas", "scope", "knob_mode", "codec", "knobs",
                   "tensors", "switches")
#: ``totals`` entries that follow from the switches; ``file_bytes`` is left out (Parquet framing).
TOTALS_FIELDS = ("numel_per_task", "fp32_bytes", "encoded_bytes", "task_vectors_fp32_bytes", "ratio",
                 "bits_per_element")
#: Deterministic columns of an eval's results.parquet (not ``uri`` or ``seconds``).
RESULT_COLUMNS = ("method", "label", "task", "alpha", "accuracy", "n", "storage_bytes", "options")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canon(value: Any) -> Any:
    """``value`` made JSON-stable: floats as hex, bytes as their sha256, mappings with sorted keys."""
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value.hex()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "sha256:" + sha256(bytes(value))
    if isinstance(value, dict):
        return {str(k): canon(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [canon(v) for v in value]
    raise TypeError(f"cannot digest a {type(value).__name__}: {value!r}")


def _open_fs(uri: str, storage_options: dict[str, Any] | None) -> tuple[Any, str]:
    return fsspec.core.url_to_fs(uri, **(storage_options or {}))


def read_bytes(uri: str, storage_options: dict[str, Any] | None = None) -> bytes:
    fs, path = _open_fs(uri, storage_options)
    return fs.cat_file(path)


# ---------------------------------------------------------------- safetensors


def safetensors_digest(data: bytes) -> list[list[Any]]:
    """``[name, dtype, shape, sha256 of the raw bytes]`` per tensor, in file (data offset) order.

    The header is parsed by hand (8-byte little-endian length, then JSON) and
    its ``__metadata__`` ignored: it may hold paths and zoo fingerprints.
    """
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header.pop("__metadata__", None)
    body = data[8 + n :]
    entries = sorted(header.items(), key=lambda kv: (kv[1]["data_offsets"][0], kv[1]["data_offsets"][1], kv[0]))
    out = []
    for name, info in entries:
        start, end = info["data_offsets"]
        out.append([name, info["dtype"], list(info["shape"]), sha256(body[start:end])])
    return out


def safetensors_file_digest(uri: str, storage_options: dict[str, Any] | None = None) -> list[list[Any]]:
    return safetensors_digest(read_bytes(uri, storage_options))


def safetensors_folder_digest(uri: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every ``*.safetensors`` directly in a folder (a merge output), by file name.

    Other files (a commit marker, staging folders) are not outputs' content and are ignored.
    """
    fs, path = _open_fs(uri, storage_options)
    files = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".safetensors") and fs.isfile(p))
    if not files:
        raise AssertionError(f"{uri}: no .safetensors output")
    return {posixpath.basename(p): safetensors_digest(fs.cat_file(p)) for p in files}


# ---------------------------------------------------------------- artifact sets


def _row_digest(row: dict[str, Any]) -> list[Any]:
    """A row's key fields in the clear, then the hash of all of today's columns (payloads hashed)."""
    missing = [c for c in PART_COLUMNS if c not in row]
    if missing:
        raise AssertionError(f"artifact part row lacks column(s) {missing}")
    full = canon({c: row[c] for c in PART_COLUMNS})
    body = json.dumps(full, sort_keys=True, separators=(",", ":")).encode()
    return [row["task"], canon(row["alpha"]), row["tensor"], row["kept"], canon(row["knob"]), sha256(body)]


def artifact_digest(uri: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The committed artifact set at ``uri``: path-free manifest fields and every part row, sorted.

    Rows are read from the parts the manifest lists, whatever their names.
    """
    fs, root = _open_fs(uri, storage_options)
    manifest = json.loads(fs.cat_file(posixpath.join(root, "manifest.json")))
    summary = {k: canon(manifest.get(k)) for k in MANIFEST_FIELDS}
    totals = manifest.get("totals") or {}
    summary["totals"] = {k: canon(totals.get(k)) for k in TOTALS_FIELDS}
    summary["zoo_name"] = (manifest.get("zoo") or {}).get("name")
    cut = manifest.get("cut", "exact")
    if cut != "exact":
        # "exact" is what every set meant before the manifest recorded its cut: such a set keeps its digest.
        summary["cut"] = cut
    rows: list[list[Any]] = []
    for part in manifest["parts"]:
        with fs.open(posixpath.join(root, part["path"]), "rb") as f:
            table = pq.read_table(f)
        rows.extend(_row_digest(r) for r in table.to_pylist())
    rows.sort(key=lambda r: (r[0], r[1], r[2]))
    keys = [tuple(r[:3]) for r in rows]
    if len(set(keys)) != len(keys):
        raise AssertionError(f"{uri}: duplicate (task, alpha, tensor) rows")
    return {"manifest": summary, "rows": rows}


# ---------------------------------------------------------------- eval results


def results_digest(uri: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """results.parquet's deterministic columns per row (sorted), ``artifact_uri`` as present or not,
    and the row order as (label, task)."""
    with fsspec.open(uri, "rb", **(storage_options or {})) as f:
        table = pq.read_table(f)
    rows = []
    for r in table.to_pylist():
        options = r["options"]
        row = {c: r[c] for c in RESULT_COLUMNS if c != "options"}
        row["options"] = json.loads(options) if isinstance(options, str) else options
        row["has_artifact_uri"] = r.get("artifact_uri") is not None
        rows.append(canon(row))
    order = [[r["label"], r["task"]] for r in rows]
    return {"rows": sorted(rows, key=lambda r: (r["label"], r["task"])), "order": order}


# ---------------------------------------------------------------- comparing


def differences(expected: Any, actual: Any, where: str = "", limit: int = 8) -> list[str]:
    """Where two digests differ, as ``path: expected -> actual`` lines (the first ``limit``)."""
    out: list[str] = []
    _diff(expected, actual, where, out, limit)
    return out


def _diff(expected: Any, actual: Any, where: str, out: list[str], limit: int) -> None:
    if len(out) >= limit or expected == actual:
        return
    if isinstance(expected, dict) and isinstance(actual, dict):
        for key in sorted(set(expected) | set(actual)):
            if key not in actual:
                out.append(f"{where}/{key}: missing (expected {_short(expected[key])})")
            elif key not in expected:
                out.append(f"{where}/{key}: unexpected {_short(actual[key])}")
            else:
                _diff(expected[key], actual[key], f"{where}/{key}", out, limit)
            if len(out) >= limit:
                return
        return
    if isinstance(expected, list) and isinstance(actual, list) and len(expected) == len(actual):
        for i, (e, a) in enumerate(zip(expected, actual)):
            if e != a and isinstance(e, list) and e and isinstance(e[0], str):
                out.append(f"{where}[{i}]: {_short(e)} -> {_short(a)}")  # a row or tensor, named by its head
            elif isinstance(e, dict) and {"label", "task"} <= set(e):
                _diff(e, a, f"{where}[{e['label']} | {e['task']}]", out, limit)  # a results row
            else:
                _diff(e, a, f"{where}[{i}]", out, limit)
            if len(out) >= limit:
                return
        return
    if isinstance(expected, list) and isinstance(actual, list):
        out.append(f"{where}: {len(expected)} items -> {len(actual)} items; first of each that differs: "
                   f"{_short(next((e for e in expected if e not in actual), None))} -> "
                   f"{_short(next((a for a in actual if a not in expected), None))}")
        return
    out.append(f"{where}: {_short(expected)} -> {_short(actual)}")


def _short(value: Any, width: int = 400) -> str:
    text = json.dumps(value, sort_keys=True, ensure_ascii=False)
    return text if len(text) <= width else text[: width - 1] + "…"
