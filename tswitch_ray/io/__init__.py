"""The I/O layer: every byte the product reads or writes goes through this package.

* :mod:`~tswitch_ray.io.fs` - URIs to fsspec filesystems (the only caller of
  ``fsspec.core.url_to_fs``), joining, resolving (against a folder or a file's
  folder) and normalising URIs, denied reads as user errors.
* :mod:`~tswitch_ray.io.atomic` - the one atomic whole-file writer, small
  whole-file reads, existence checks, tree removal.
* :mod:`~tswitch_ray.io.checkpoints` - the checkpoint reader protocol
  (``infos``, ``read``, ``read_range``, ``read_ranges``), tensor infos and
  dtypes, ``.pt`` state dicts (weights only).
* :mod:`~tswitch_ray.io.safetensors` - the safetensors header parser, lazy
  readers, atomic and streaming writers, concatenation of parts.
* :mod:`~tswitch_ray.io.readers` - :func:`~tswitch_ray.io.readers.open_checkpoint`,
  the reader for a URI (file, sharded folder or state dict), and
  :func:`~tswitch_ray.io.readers.open_task`, which also opens PEFT adapter folders.
* :mod:`~tswitch_ray.io.peft` - a LoRA adapter folder as a task: τ = s · B·A per module.
* :mod:`~tswitch_ray.io.faults` - storage, network and Ray faults translated
  into one-paragraph user errors naming the URI.
* :mod:`~tswitch_ray.io.tables` - whole Parquet files, written atomically.
* :mod:`~tswitch_ray.io.sink` - the commit lifecycle (start, write, complete,
  failed) and :class:`~tswitch_ray.io.sink.FolderSink`.

Only the torch-free helpers are re-exported here, so importing the package
stays cheap; import readers and writers from their modules.
"""

from tswitch_ray.io.atomic import (
    FileDigest,
    atomic_write,
    atomic_write_fs,
    exists,
    read_bytes,
    remove_tree,
    sha256_hex,
)
from tswitch_ray.io.fs import (
    access_checked,
    fs_is_local,
    is_local,
    join_uri,
    normalize_uri,
    open_fs,
    options_for,
    protocol_of,
    resolve_against_file,
    resolve_uri,
    uri_of,
)

__all__ = [
    "FileDigest",
    "access_checked",
    "atomic_write",
    "atomic_write_fs",
    "exists",
    "fs_is_local",
    "is_local",
    "join_uri",
    "normalize_uri",
    "open_fs",
    "options_for",
    "protocol_of",
    "read_bytes",
    "remove_tree",
    "resolve_against_file",
    "resolve_uri",
    "sha256_hex",
    "uri_of",
]
