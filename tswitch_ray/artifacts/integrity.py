"""The digests that bind an artifact set's content to its identity (docs/ARTIFACTS.md "Integrity").

Three links, each a sha256:

* ``row_sha256`` (a Parquet column) covers a row's key (task, α, tensor), its
  header fields (shape, dtype, codec, knob, kept, ...) and, through
  ``payload_sha256``, its codec streams: a row edited or relabelled no longer
  matches its digest;
* ``rows_sha256`` (per part, in the manifest) covers the part's ``row_sha256``
  values in row order: a row from anywhere else is not among them;
* ``manifest_sha256`` (in the manifest) covers the manifest's canonical body.

These detect any change not followed by recomputing every link above it
(corruption, a part or row swapped or edited, a manifest edited by hand). They
are not signatures: whoever may rewrite a manifest and its digest may rewrite
the set.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

from tswitch_ray.artifacts.schema import ROW_DIGEST_COLUMNS, ROW_DIGEST_TAG
from tswitch_ray.io.sink import json_digest

MANIFEST_DIGEST_KEY = "manifest_sha256"


def _canon(value: Any) -> Any:
    """A row value as the digest encodes it: floats exact (``float.hex``), the rest as JSON has it."""
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return value.hex()
    if isinstance(value, (list, tuple)):
        return [_canon(v) for v in value]
    raise TypeError(f"row value of type {type(value).__name__} has no canonical encoding: {value!r}")


def row_digest(row: Mapping[str, Any]) -> str:
    """``row_sha256`` of a row read back from a part (Python values as ``pyarrow`` gives them).

    sha256 of the compact JSON array ``[ROW_DIGEST_TAG, v_1, ..., v_n]`` over
    :data:`~tswitch_ray.artifacts.schema.ROW_DIGEST_COLUMNS` in order, floats as ``float.hex()``.
    """
    body = [ROW_DIGEST_TAG, *(_canon(row[c]) for c in ROW_DIGEST_COLUMNS)]
    return hashlib.sha256(json.dumps(body, separators=(",", ":"), ensure_ascii=True).encode()).hexdigest()


def rows_digest(row_digests: Iterable[str]) -> str:
    """``rows_sha256`` of a part: sha256 of its rows' hex ``row_sha256`` values concatenated in row order."""
    h = hashlib.sha256()
    for d in row_digests:
        h.update(d.encode("ascii"))
    return h.hexdigest()


def manifest_digest(body: Mapping[str, Any]) -> str:
    """``manifest_sha256``: sha256 of the body without that key, as
    ``json.dumps(body, sort_keys=True, separators=(",", ":"))`` writes it (ASCII, floats as ``repr``);
    the same canonical digest as commit markers' (:func:`tswitch_ray.io.sink.json_digest`)."""
    return json_digest(body, MANIFEST_DIGEST_KEY)
