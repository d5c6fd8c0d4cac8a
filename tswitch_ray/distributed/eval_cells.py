"""The eval cell cache: one file per scored (method, task) cell, bound to what its scores were computed from.

A cell file is an envelope::

    {"format": "tswitch-ray/eval-cell", "format_version": 1,
     "binding_sha256": ..., "rows": [...], "cell_sha256": ...}

``binding_sha256`` is the digest (:func:`~tswitch_ray.io.sink.json_digest`)
of everything the scores depend on: the method spec's key, the task (and, for
a cell of all tasks, which tasks), the data URIs, ``limit`` and
``batch_size``, the adapter, the zoo's checkpoint files (path, size, stamp)
and the digest of the weights' source (the switch set's ``manifest_sha256``,
the merge output's ``marker_sha256``). ``cell_sha256`` covers the whole
envelope. A cached cell is reused only when both match: one edited after it
was written, one of another format (an older version's bare list of rows), or
one computed from other artifacts, merges, checkpoints or data is scored anew.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import fsspec

from tswitch_ray.io.sink import json_digest, read_marker

CELL_FORMAT = "tswitch-ray/eval-cell"
CELL_FORMAT_VERSION = 1
CELL_DIGEST_KEY = "cell_sha256"


def source_digest(uri: str | None, marker: str, storage_options: Mapping[str, Any] | None) -> str | None:
    """The committed digest of the output at folder ``uri`` (its manifest or marker ``marker``), None if none."""
    if uri is None:
        return None
    from tswitch_ray.io.fs import open_fs

    fs, root = open_fs(uri, dict(storage_options or {}))
    body = read_marker(fs, f"{root.rstrip('/')}/{marker}")
    if body is None:
        return None
    return str(body.get("manifest_sha256") or body.get("marker_sha256") or json_digest(body, ""))


def binding_digest(binding: Mapping[str, Any]) -> str:
    """The digest a cell is bound to (see the module docstring for what ``binding`` holds)."""
    return json_digest(json.loads(json.dumps(dict(binding), sort_keys=True, default=str)), "")


def cell_bytes(rows: Sequence[Mapping[str, Any]], binding_sha256: str) -> bytes:
    """The envelope of ``rows`` bound to ``binding_sha256``, as written to the cell file."""
    body: dict[str, Any] = {"format": CELL_FORMAT, "format_version": CELL_FORMAT_VERSION,
                            "binding_sha256": binding_sha256, "rows": json.loads(json.dumps(list(rows)))}
    body[CELL_DIGEST_KEY] = json_digest(body, CELL_DIGEST_KEY)
    return json.dumps(body).encode()


def cached_rows(fs: fsspec.AbstractFileSystem, path: str, binding_sha256: str) -> list[dict[str, Any]] | None:
    """The rows of the cell file at ``path`` if it is intact and bound to ``binding_sha256``; None otherwise."""
    body = read_marker(fs, path)
    if (body is None or body.get("format") != CELL_FORMAT or body.get("format_version") != CELL_FORMAT_VERSION
            or body.get("binding_sha256") != binding_sha256
            or body.get(CELL_DIGEST_KEY) != json_digest(body, CELL_DIGEST_KEY)
            or not isinstance(body.get("rows"), list)):
        return None
    return body["rows"]
