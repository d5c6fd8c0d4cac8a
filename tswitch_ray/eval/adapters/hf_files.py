"""Reading Hugging Face ``save_pretrained`` folders: tensors, JSON configs, image statistics, task heads.

Shared by the Hugging Face families. Tensors are read with
:func:`~tswitch_ray.io.readers.open_checkpoint`, so a folder may hold what the
build reads: ``model.safetensors``, sharded safetensors with their index, or a
``pytorch_model.bin`` (loaded weights-only, never running pickled code).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from tswitch_ray.errors import ZooError
from tswitch_ray.io.atomic import exists, read_bytes
from tswitch_ray.io.checkpoints import CheckpointReader
from tswitch_ray.io.fs import resolve_uri
from tswitch_ray.io.peft import PeftAdapterReader, is_adapter_folder
from tswitch_ray.io.readers import open_checkpoint, open_task


def read_json(uri: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A JSON file as a dict; ``ZooError`` naming the file when it is not valid JSON."""
    try:
        return json.loads(read_bytes(uri, dict(storage_options or {})))
    except json.JSONDecodeError as e:
        raise ZooError(f"{uri}: not valid JSON ({e}).") from e


def read_hf_folder_tensors(folder: str, storage_options: Mapping[str, Any] | None = None, prefix: str | None = None,
                           *, keep: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a HF ``save_pretrained`` folder (single file, sharded index or ``pytorch_model.bin``).

    With ``prefix`` (or ``keep``), only those keys are read; a sharded folder
    then opens only the shards that hold them.
    """
    reader = open_checkpoint(folder, dict(storage_options or {}))
    wanted = keep or (lambda k: prefix is None or k.startswith(prefix))
    return {k: reader.read(k) for k in reader.infos() if wanted(k)}


def hf_image_stats(folder: str, storage_options: Mapping[str, Any] | None, default_mean: Sequence[float], default_std: Sequence[float]) -> tuple[tuple, tuple]:
    """``(image_mean, image_std)`` of the folder's ``preprocessor_config.json``, else the defaults."""
    cfg = preprocessor_config(folder, storage_options)
    return tuple(cfg.get("image_mean", default_mean)), tuple(cfg.get("image_std", default_std))


def preprocessor_config(folder: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The folder's ``preprocessor_config.json`` (empty when it has none)."""
    uri = resolve_uri(folder, "preprocessor_config.json")
    return read_json(uri, storage_options) if exists(uri, dict(storage_options or {})) else {}


def is_adapter_task(folder: str, storage_options: Mapping[str, Any] | None) -> bool:
    """Whether the task ``folder`` is a PEFT LoRA adapter (``adapter_config.json``), read against the base."""
    return is_adapter_folder(folder, dict(storage_options or {}))


def task_reader(folder: str, base: str, storage_options: Mapping[str, Any] | None) -> CheckpointReader:
    """The task's tensors as the build reads them: a full folder, or an adapter as θ0 + τ of the base's names."""
    so = dict(storage_options or {})
    if is_adapter_task(folder, so):
        return open_task(folder, open_checkpoint(base, so), so)
    return open_checkpoint(folder, so)


def task_head_tensors(folder: str, storage_options: Mapping[str, Any] | None, backbone_prefix: str,
                      base: str | None = None) -> dict[str, torch.Tensor]:
    """A task checkpoint's own head: every tensor outside ``backbone_prefix`` (e.g. ``classifier.*``, DeBERTa's ``pooler.*``).

    With ``base``, a PEFT adapter folder is read against it: its head is the base's head tensors
    as the adapter changes them (θ0 + τ; a ``modules_to_save`` classifier is the trained one).
    """
    reader = task_reader(folder, base, storage_options) if base is not None else open_checkpoint(folder, dict(storage_options or {}))
    names = list(reader.infos())
    head = [k for k in names if not k.startswith(backbone_prefix)]
    if len(head) == len(names) or not head:
        what = f"no {backbone_prefix}* tensors (a bare base model)" if head else f"no tensors outside {backbone_prefix}* (no head)"
        if isinstance(reader, PeftAdapterReader):  # its names are the base's
            raise ZooError(
                f"{folder}: a PEFT adapter task is read against the base {base}, whose checkpoint has {what}; save the "
                "base as the *For*Classification class the adapter was trained on (its head then is the base's "
                "classifier.* as the adapter's modules_to_save changes it)."
            )
        raise ZooError(
            f"{folder}: checkpoint has {what}; each task folder must be the task's *For*Classification model, "
            "saved with save_pretrained, carrying its own classification head (classifier.*)."
        )
    return {k: reader.read(k) for k in head}
