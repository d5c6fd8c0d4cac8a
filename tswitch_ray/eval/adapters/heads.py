"""Per-task classification heads: the linear head file format (CLIP-family zoos).

Heads are never merged: they belong to their task and live outside the merged
weights, so every adapter keeps a ``{task: head}`` map next to its backbone.
Hugging Face ``*For*Classification`` zoos keep each head inside its task's
folder instead (:mod:`.hf_classifier`).
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from tswitch_ray.errors import ZooError
from tswitch_ray.io.fs import open_fs, resolve_uri
from tswitch_ray.io.safetensors import read_safetensors, save_safetensors

HEAD_SUFFIX = ".safetensors"


class LinearHead(nn.Module):
    """A per-task linear classifier, the analogue of the papers' zero-shot heads.

    On disk (``heads/<task>.safetensors``): ``weight`` ``[C, D]``, optional
    ``bias`` ``[C]`` (zeros if absent), optional ``projection`` ``[D, H]``
    applied to the backbone features first (CLIP's ``visual_projection``).
    Metadata: ``normalize`` (``"true"``: L2-normalise features before the
    linear map, as task_vectors' ``ClassificationHead`` does; the default for
    CLIP-family adapters) and ``classes`` (a JSON list of class names).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, projection: torch.Tensor | None = None, normalize: bool = True, classes: Sequence[str] | None = None) -> None:
        super().__init__()
        weight = weight.detach().float()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias.detach().float() if bias is not None else torch.zeros(weight.shape[0]), requires_grad=False)
        self.projection = nn.Parameter(projection.detach().float(), requires_grad=False) if projection is not None else None
        self.normalize = bool(normalize)
        self.classes = list(classes) if classes is not None else None

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.projection.shape[1] if self.projection is not None else self.weight.shape[1])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        f = features.float()
        if self.projection is not None:
            f = f @ self.projection.T
        if self.normalize:
            f = f / f.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return f @ self.weight.T + self.bias

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"weight": self.weight.data, "bias": self.bias.data}
        if self.projection is not None:
            out["projection"] = self.projection.data
        return out

    def metadata(self) -> dict[str, str]:
        md = {"normalize": "true" if self.normalize else "false", "format": "tswitch-linear-head-v1"}
        if self.classes is not None:
            md["classes"] = json.dumps(self.classes)
        return md


def save_head(uri: str, head: LinearHead, storage_options: Mapping[str, Any] | None = None) -> None:
    """Write a :class:`LinearHead` as safetensors (tensors + metadata)."""
    save_safetensors(head.tensors(), uri, dict(storage_options or {}), head.metadata())


def load_head(uri: str, storage_options: Mapping[str, Any] | None = None, *, default_normalize: bool = True) -> LinearHead:
    """Read a head file; ``ZooError`` naming the file when ``weight`` is missing or shapes disagree."""
    tensors, md = read_safetensors(uri, dict(storage_options or {}))
    if "weight" not in tensors:
        raise ZooError(f"{uri}: head file has no 'weight' tensor (found {sorted(tensors)}); a head needs weight [C, D] and optionally bias [C].")
    w = tensors["weight"]
    b = tensors.get("bias")
    p = tensors.get("projection")
    if w.ndim != 2 or (b is not None and tuple(b.shape) != (w.shape[0],)) or (p is not None and (p.ndim != 2 or p.shape[0] != w.shape[1])):
        raise ZooError(
            f"{uri}: head tensors have inconsistent shapes: weight {tuple(w.shape)}, bias {None if b is None else tuple(b.shape)}, "
            f"projection {None if p is None else tuple(p.shape)}; expected weight [C, D], bias [C], projection [D, H]."
        )
    norm = md.get("normalize")
    normalize = default_normalize if norm is None else norm.lower() == "true"
    classes = json.loads(md["classes"]) if "classes" in md else None
    return LinearHead(w, b, p, normalize, classes)


def head_tasks_in(heads_uri: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Task names of the ``<task>.safetensors`` files in the heads folder, sorted."""
    fs, path = open_fs(heads_uri, dict(storage_options or {}))
    try:
        names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False) if p.endswith(HEAD_SUFFIX))
    except FileNotFoundError as e:
        raise ZooError(f"{heads_uri}: heads folder not found.") from e
    tasks = [n[: -len(HEAD_SUFFIX)] for n in names]
    if not tasks:
        raise ZooError(f"{heads_uri}: no <task>.safetensors head files in the heads folder.")
    return tasks


def load_heads_dir(heads_uri: str, tasks: Sequence[str] | None = None, storage_options: Mapping[str, Any] | None = None, *, default_normalize: bool = True) -> dict[str, LinearHead]:
    """Heads ``<heads_uri>/<task>.safetensors`` for ``tasks`` (all files in the folder if None)."""
    if tasks is None:
        tasks = head_tasks_in(heads_uri, storage_options)
    return {t: load_head(resolve_uri(heads_uri, t + HEAD_SUFFIX), storage_options, default_normalize=default_normalize) for t in tasks}
