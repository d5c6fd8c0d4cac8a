"""Which reader opens a checkpoint URI: safetensors file, sharded HF folder or a ``.pt``/``.bin`` state dict.

Kept apart from :mod:`.checkpoints` (the reader protocol, ``TensorInfo`` and the
``.pt`` reader) and :mod:`.safetensors` (the safetensors readers), which both
build on the former: choosing among them is the one job that needs both.
"""

from __future__ import annotations

import posixpath
from typing import Any

from tswitch_ray.errors import ZooError
from tswitch_ray.io.checkpoints import TORCH_EXTENSIONS, CheckpointReader, TorchStateDictReader
from tswitch_ray.io.fs import access_checked, join_uri, open_fs
from tswitch_ray.io.peft import PeftAdapterReader, is_adapter_folder
from tswitch_ray.io.safetensors import INDEX_FILE, SINGLE_FILE, SafetensorsReader, ShardedSafetensorsReader


def open_checkpoint(uri: str, storage_options: dict[str, Any] | None = None) -> CheckpointReader:
    """The right reader for ``uri``.

    * ``*.safetensors`` -> :class:`~tswitch_ray.io.safetensors.SafetensorsReader`
    * ``*.pt|.pth|.bin|.ckpt`` -> :class:`TorchStateDictReader` (weights only)
    * a folder with ``model.safetensors.index.json`` or ``model.safetensors``
      (or the index file itself) -> :class:`~tswitch_ray.io.safetensors.ShardedSafetensorsReader`
    * a folder with ``pytorch_model.bin`` -> :class:`TorchStateDictReader`

    A PEFT adapter folder is a task, not a checkpoint: see :func:`open_task`.

    File URIs are dispatched on their extension without touching storage
    (a missing file is reported on first use); folders are probed.
    """
    uri = uri.rstrip("/") if uri.rstrip("/") else uri
    low = uri.lower()
    if low.endswith(INDEX_FILE):
        return ShardedSafetensorsReader(uri[: -len(INDEX_FILE)].rstrip("/"), storage_options)
    if low.endswith(".safetensors"):
        return SafetensorsReader(uri, storage_options)
    if low.endswith(TORCH_EXTENSIONS):
        return TorchStateDictReader(uri, storage_options)
    fs, path = open_fs(uri, storage_options)
    with access_checked("checkpoint", uri):  # the probes below read the store
        try:
            is_dir = fs.isdir(path)
            exists = is_dir or fs.exists(path)
        except FileNotFoundError:
            is_dir = exists = False
        if is_dir:
            if fs.exists(posixpath.join(path, INDEX_FILE)) or fs.exists(posixpath.join(path, SINGLE_FILE)):
                return ShardedSafetensorsReader(uri, storage_options)
            if fs.exists(posixpath.join(path, "pytorch_model.bin")):
                return TorchStateDictReader(join_uri(uri, "pytorch_model.bin"), storage_options)
    if is_dir:
        raise ZooError(
            f"checkpoint folder {uri} has no {INDEX_FILE}, {SINGLE_FILE} or pytorch_model.bin; "
            "cannot tell which checkpoint to read."
        )
    if not exists:
        raise ZooError(f"checkpoint {uri} does not exist (or is not readable).")
    raise ZooError(
        f"checkpoint {uri} has an unknown format: expected a .safetensors file, a .pt/.pth/.bin state dict, "
        "or an HF checkpoint folder."
    )


def open_task(uri: str, base: CheckpointReader, storage_options: dict[str, Any] | None = None) -> CheckpointReader:
    """The reader of a zoo task: a PEFT LoRA adapter folder (``adapter_config.json``), read against
    ``base`` (:class:`~tswitch_ray.io.peft.PeftAdapterReader`), or else any checkpoint :func:`open_checkpoint` opens."""
    low = uri.rstrip("/").lower()
    if not low.endswith((".safetensors", INDEX_FILE, *TORCH_EXTENSIONS)) and is_adapter_folder(uri, storage_options):
        return PeftAdapterReader(uri, base, storage_options)
    return open_checkpoint(uri, storage_options)
