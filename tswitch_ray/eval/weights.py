"""The weights each method is scored with, and the sizes its storage is counted from.

Every function reads lazily (one tensor at a time) from the zoo, the switch
artifacts or a merge's output files; none holds more than the state dict it
returns. T-Switch and Auto-Switch read θ0 and the switches only: the
fine-tuned checkpoints are never touched for them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from tswitch_ray.artifacts import ArtifactReader
from tswitch_ray.io.safetensors import read_safetensors
from tswitch_ray.methods.storage import StorageModel
from tswitch_ray.reconstruct import iter_reconstructed
from tswitch_ray.switch_sets import match_alpha, open_switches
from tswitch_ray.zoo import Zoo

Tensor = torch.Tensor
StateDict = dict[str, Tensor]

_MLP_MARKERS = (".mlp.", ".mlp_", ".intermediate.", ".output.dense")


def read_checkpoint(zoo: Zoo, which: str) -> StateDict:
    """A whole checkpoint of the zoo (``"base"`` or a task name), tensor by tensor."""
    reader = zoo.reader(which)
    return {name: reader.read(name) for name in reader.infos()}


def read_merged(uri: str, storage_options: Mapping[str, Any] | None = None) -> StateDict:
    return read_safetensors(uri, storage_options)[0]


def reconstruct_switched(artifacts_uri: str, zoo_uri: str, task: str, alpha: float,
                         storage_options: Mapping[str, Any] | None = None, *,
                         zoo_fingerprint: str | None = None) -> StateDict:
    """θ0 + λ·Mt⊙St for every tensor (docs/MATH.md "Reconstruction", paper 000 eq. 7), from the
    artifacts and θ0 only.

    ``zoo_fingerprint``: the zoo's fingerprint if the caller computed it already (see ``open_switches``).
    """
    reader, zoo = open_switches(artifacts_uri, zoo_uri, dict(storage_options or {}), zoo_fingerprint=zoo_fingerprint)
    return dict(iter_reconstructed(reader, zoo, task, alpha))


def read_switches(artifacts_uri: str, zoo_uri: str, tasks: Sequence[str], alpha: float,
                  storage_options: Mapping[str, Any] | None = None, *, zoo_fingerprint: str | None = None
                  ) -> tuple[StateDict, list[dict[str, tuple[Tensor, Tensor, float]]]]:
    """θ0 and every task's switches ``{tensor: (mask, positive, λ)}`` — Auto-Switch's whole input.

    ``zoo_fingerprint``: the zoo's fingerprint if the caller computed it already (see ``open_switches``).
    """
    reader, zoo = open_switches(artifacts_uri, zoo_uri, dict(storage_options or {}), zoo_fingerprint=zoo_fingerprint)
    base = read_checkpoint(zoo, "base")
    switches = []
    for task in tasks:
        per = {}
        for name, mask, positive, knob in reader.iter_switches(task, alpha):
            per[name] = (torch.from_numpy(mask), torch.from_numpy(positive), float(knob))
        switches.append(per)
    return base, switches


# ------------------------------------------------------------------ storage


def storage_model(zoo: Zoo, artifacts: Sequence[str] = (), storage_options: Mapping[str, Any] | None = None
                  ) -> StorageModel:
    """The sizes every method's storage is counted from (``StorageModel.bytes_for``), from the zoo's
    headers and the switch artifacts' tables only."""
    infos = zoo.tensor_infos()
    base_infos = zoo.reader("base").infos()
    model_bytes = sum(i.nbytes for i in base_infos.values())
    float_infos = [i for i in infos.values() if i.dtype in ("F32", "F16", "BF16", "F64")]
    float_numel = sum(i.numel for i in float_infos)
    mlp_numel = sum(i.numel for i in float_infos if any(m in i.name for m in _MLP_MARKERS))
    dtype_bytes = sum(i.nbytes for i in float_infos) / max(float_numel, 1)
    sm = StorageModel(len(zoo.task_names), model_bytes, float_numel, mlp_numel, dtype_bytes)
    for uri in artifacts:
        reader = ArtifactReader(uri, storage_options=dict(storage_options or {}))
        t = reader.table(columns=["alpha", "payload_bytes"])
        for a in reader.alphas:
            a = match_alpha(reader.alphas, a, uri)
            mask = [x == a for x in t.column("alpha").to_pylist()]
            sm.switch_bytes[a] = int(sum(b for b, m in zip(t.column("payload_bytes").to_pylist(), mask) if m))
            # Each task's own tensors (task_specific heads, changed buffers) are stored beside the switches of every α.
            sm.switch_bytes[a] += int(reader.manifest["totals"].get("task_tensors_bytes", 0))
    return sm
