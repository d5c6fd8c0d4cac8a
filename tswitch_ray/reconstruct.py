"""`tswitch reconstruct`: θ0 + λ·M⊙S for one task and α, under the task's own names and with its own
task-specific tensors and buffers, streamed to a safetensors file or a Hugging Face folder."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from tswitch_ray.artifacts import ArtifactReader
from tswitch_ray.artifacts.task_tensors import read_task_tensors
from tswitch_ray.errors import ArtifactError
from tswitch_ray.io.checkpoints import TensorInfo, dtype_name
from tswitch_ray.io.safetensors import SafetensorsStreamWriter
from tswitch_ray.serving import read_task_switches, reconstructed
from tswitch_ray.switch_sets import match_alpha, open_switches
from tswitch_ray.zoo import Zoo
from tswitch_ray.zoo.keymap import unmap_name


class TaskLayout:
    """How one task's reconstruction is named and what it holds besides switched tensors.

    From the manifest alone: the task's key rules (its tensors are written
    under its own names), the base tensors it lacks (left out), and its own
    tensors (task-specific ones and changed buffers), read from its
    lossless part with every digest checked. Tasks of builds without any of
    these keep the base's names and tensors.
    """

    def __init__(self, reader: ArtifactReader, task: str) -> None:
        manifest = reader.manifest
        lay = (manifest.get("layouts") or {}).get(task, {})
        self.pairs = tuple(tuple(p) for p in lay.get("rules", ()))
        self.absent = set(lay.get("absent", ()))
        self.names: dict[str, str] = dict(lay.get("names", {}))
        entry = next((e for e in manifest.get("task_tensors") or () if e["task"] == task), None)
        own = read_task_tensors(reader.fs, reader.root, reader.uri, entry) if entry is not None else []
        self.own: dict[str, tuple[str, torch.Tensor]] = {name: (stored, t) for name, stored, _, t in own}

    def stored(self, name: str) -> str:
        """The task's own name for the zoo's tensor ``name``."""
        return self.names.get(name) or unmap_name(self.pairs, name)

    def order(self, base_names: Iterable[str]) -> list[str]:
        """Zoo names of the task's tensors, in the base's order, then the task's own tensors the base lacks."""
        names = [n for n in base_names if n not in self.absent]
        listed = set(names)
        return names + [n for n in self.own if n not in listed]


def reconstructed_infos(reader: ArtifactReader, zoo: Zoo, task: str, layout: TaskLayout | None = None) -> list[TensorInfo]:
    """Header of a task's reconstruction (names, shapes, dtypes in :func:`iter_reconstructed`'s order)."""
    layout = layout or TaskLayout(reader, task)
    base = zoo.base.infos()
    out = []
    for name in layout.order(base):
        if name in layout.own:
            stored, t = layout.own[name]
            out.append(TensorInfo(stored, tuple(t.shape), dtype_name(t.dtype), t.numel() * t.element_size()))
        else:
            out.append(dataclasses.replace(base[name], name=layout.stored(name)))
    return out


def iter_reconstructed(reader: ArtifactReader, zoo: Zoo, task: str, alpha: float,
                       layout: TaskLayout | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, θ0 + λ·Mt⊙St) for every tensor of the task, one tensor at a time (paper 000 eq. 7).

    Names are the task's own (its checkpoint's key layout) and the order is
    :func:`reconstructed_infos`'. Tensors without a switch (non-float, or
    excluded by the zoo's globs) are θ0 as stored; the task's own tensors
    (``task_specific``, buffers that differ from the base's) are its own,
    bit for bit. The knob λ is the reader's (:meth:`ArtifactReader.switch`):
    the one place that decides it for either scope.
    """
    manifest = reader.manifest
    if task not in manifest["tasks"]:
        raise ArtifactError(f"{reader.uri}: no task {task!r}; tasks are {manifest['tasks']}.")
    alpha = match_alpha(list(manifest["alphas"]), alpha, reader.uri)
    layout = layout or TaskLayout(reader, task)
    # The task's switches are read once, encoded (a few % of θ0's bytes); decoding is per tensor.
    switches = read_task_switches(reader, task, alpha)
    missing = f"{reader.uri}: no switch for task {task!r}, alpha {alpha}, tensor {{name!r}}."
    own = set(layout.own)  # never switched: task-specific tensors and buffers

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name in layout.order(zoo.base.infos()):
            yield name, (layout.own[name][1] if name in own else zoo.base.read(name))

    for name, tensor in reconstructed(tensors(), switches, set(manifest["tensors"]) - own, missing):
        yield (layout.own[name][0] if name in own else layout.stored(name)), tensor


def reconstruct_task(artifacts_uri: str, task: str, alpha: float, out: str, zoo_uri: str | None = None,
                     storage_options: dict[str, Any] | None = None, version: int | None = None) -> str:
    """Write the full state dict θ0 + λ·Mt⊙St for ``task`` at ``alpha`` to ``out`` (safetensors).

    θ0 comes from the zoo recorded in the manifest (or ``zoo_uri``), whose
    fingerprint must match the one the switches were built from. One tensor
    is in memory at a time. ``version``: that committed version of the set
    (default: the latest).
    """
    reader, zoo = open_switches(artifacts_uri, zoo_uri, storage_options, version=version)
    alpha = match_alpha(list(reader.manifest["alphas"]), alpha, artifacts_uri)
    if task not in reader.manifest["tasks"]:
        raise ArtifactError(f"{artifacts_uri}: no task {task!r}; tasks are {reader.manifest['tasks']}.")
    meta = {"tswitch_task": task, "tswitch_alpha": repr(alpha), "tswitch_artifacts": artifacts_uri}
    layout = TaskLayout(reader, task)
    infos = reconstructed_infos(reader, zoo, task, layout)
    with SafetensorsStreamWriter(out, infos, storage_options=storage_options, metadata=meta) as writer:
        for name, tensor in iter_reconstructed(reader, zoo, task, alpha, layout):
            writer.write(name, tensor)
    return out


# The commit marker of a reconstructed Hugging Face folder, written last (docs/ARTIFACTS.md "Reconstructed folders").
RECONSTRUCT_MARKER = "reconstruct.json"


def reconstruct_task_hf(artifacts_uri: str, task: str, alpha: float, out: str, zoo_uri: str | None = None,
                        storage_options: dict[str, Any] | None = None, *, max_shard_size: int | str = "5GB",
                        overwrite: bool = False, version: int | None = None) -> str:
    """Write ``task`` at ``alpha`` (the set's latest version unless ``version``) as a folder ``from_pretrained``
    loads (:mod:`tswitch_ray.io.hf_folder`).

    The tensors are :func:`iter_reconstructed`'s, whatever it yields, one shard in memory; the folder is
    committed by :data:`RECONSTRUCT_MARKER`, written last, and a folder holding another committed
    reconstruction is refused before any work unless ``overwrite``.
    """
    from tswitch_ray.io.hf_folder import HFFolderWriter, first_config_files, parse_size
    from tswitch_ray.io.sink import FolderSink

    parse_size(max_shard_size)  # a bad size is refused before anything is read
    reader, zoo = open_switches(artifacts_uri, zoo_uri, storage_options, version=version)
    alpha = match_alpha(list(reader.manifest["alphas"]), alpha, artifacts_uri)
    if task not in reader.manifest["tasks"]:
        raise ArtifactError(f"{artifacts_uri}: no task {task!r}; tasks are {reader.manifest['tasks']}.")
    files = first_config_files([zoo.tasks[task].uri, zoo.base.uri], storage_options)  # the task's config, else the base's
    sink = FolderSink(out, marker=RECONSTRUCT_MARKER, fmt="tswitch-ray/reconstruct", staging_key=f"reconstruct-{task}",
                      identity={"task": task, "alpha": alpha, "artifacts": artifacts_uri, "output_format": "hf"},
                      what="reconstructed model", storage_options=storage_options, overwrite=overwrite)
    sink.start()
    try:
        meta = {"tswitch_task": task, "tswitch_alpha": repr(alpha), "tswitch_artifacts": artifacts_uri}
        writer = HFFolderWriter(sink, files, max_shard_size=max_shard_size, metadata=meta)
        for name, tensor in iter_reconstructed(reader, zoo, task, alpha):
            writer.write(name, tensor)
        sink.complete(writer.finish(), writer.publish)
    except BaseException:
        sink.failed()
        raise
    return sink.uri
