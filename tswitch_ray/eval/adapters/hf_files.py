"""Reading Hugging Face ``save_pretrained`` folders: tensors, JSON configs, image statistics, task classifiers.

Shared by the three Hugging Face families; every byte goes through
:mod:`tswitch_ray.io`.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

import torch

from tswitch_ray.errors import ZooError
from tswitch_ray.io.atomic import exists, read_bytes
from tswitch_ray.io.fs import resolve_uri
from tswitch_ray.io.safetensors import read_safetensors

INDEX_FILE = "model.safetensors.index.json"


def read_json(uri: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A JSON file as a dict; ``ZooError`` naming the file when it is not valid JSON."""
    try:
        return json.loads(read_bytes(uri, storage_options))
    except json.JSONDecodeError as e:
        raise ZooError(f"{uri}: not valid JSON ({e}).") from e


def read_hf_folder_tensors(folder: str, storage_options: Mapping[str, Any] | None = None, prefix: str | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a HF ``save_pretrained`` folder (single file or sharded index).

    With ``prefix``, only shards holding keys starting with it are read.
    """
    so = dict(storage_options or {})
    if exists(resolve_uri(folder, INDEX_FILE), so):
        weight_map: dict[str, str] = json.loads(read_bytes(resolve_uri(folder, INDEX_FILE), so))["weight_map"]
        files = sorted({f for k, f in weight_map.items() if prefix is None or k.startswith(prefix)})
    else:
        files = ["model.safetensors"]
    out: dict[str, torch.Tensor] = {}
    for name in files:
        tensors, _ = read_safetensors(resolve_uri(folder, name), so)
        out.update({k: v for k, v in tensors.items() if prefix is None or k.startswith(prefix)})
    return out


def hf_image_stats(folder: str, storage_options: Mapping[str, Any] | None, default_mean: Sequence[float], default_std: Sequence[float]) -> tuple[tuple, tuple]:
    """``(image_mean, image_std)`` of the folder's ``preprocessor_config.json``, else the defaults."""
    uri = resolve_uri(folder, "preprocessor_config.json")
    if exists(uri, dict(storage_options or {})):
        cfg = read_json(uri, storage_options)
        return tuple(cfg.get("image_mean", default_mean)), tuple(cfg.get("image_std", default_std))
    return tuple(default_mean), tuple(default_std)


def task_classifier(folder: str, storage_options: Mapping[str, Any] | None) -> dict[str, torch.Tensor]:
    """A task checkpoint's ``classifier.*`` tensors, prefix stripped (its own head)."""
    tensors = read_hf_folder_tensors(folder, storage_options, prefix="classifier.")
    if not tensors:
        raise ZooError(f"{folder}: checkpoint has no classifier.* tensors; each task folder must carry its own classification head.")
    return {k[len("classifier.") :]: v for k, v in tensors.items()}

