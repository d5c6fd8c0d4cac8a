"""When a committed merge still answers for its zoo: an all-task output is recomputed only when its inputs changed.

A merge (TA, TIES, EMR, ...) depends on every task: its marker's identity
records the method, options, base fingerprint and task list, and its
``inputs`` detail the size and stamps of every checkpoint file
(:meth:`Zoo.files_identity`). A zoo that gained, lost or replaced a task
changes one of them, so the merge is made again; with none changed the
committed merge (its outputs verified against the marker) is reused as is.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from tswitch_ray.io.sink import verify_marker


def merge_is_current(out: str, marker: str, fmt: str, identity: Mapping[str, Any], inputs: str,
                     storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The verified marker of the merge committed in ``out`` when it has ``identity`` and ``inputs``, else None.

    A marker that fails verification raises (``ArtifactError``), as reading it anywhere else does.
    """
    committed = verify_marker(out, marker, storage_options, fmt=fmt)
    if committed is None:
        return None
    wanted = json.loads(json.dumps(dict(identity), sort_keys=True, default=str))  # as the marker reads back
    if any(committed.get(k) != v for k, v in wanted.items()) or committed.get("inputs") != inputs:
        return None
    return committed
