"""`tswitch reconstruct`: θ0 + λ·M⊙S for one task and α, streamed to a safetensors file."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch

from tswitch_ray.artifacts import ArtifactReader
from tswitch_ray.errors import ArtifactError
from tswitch_ray.io.safetensors import SafetensorsStreamWriter
from tswitch_ray.serving import read_task_switches, reconstructed
from tswitch_ray.zoo import Zoo, load_zoo


def match_alpha(alphas: list[float], alpha: float, uri: str) -> float:
    """The artifact set's α equal to ``alpha`` (to 1e-9), or a clear error listing the available ones."""
    for a in alphas:
        if math.isclose(a, alpha, rel_tol=0, abs_tol=1e-9):
            return a
    raise ArtifactError(f"{uri}: no switches for α={alpha}; this artifact set has α in {alphas}.")


def check_built_from(reader: ArtifactReader, zoo: Zoo, zoo_fingerprint: str | None = None) -> None:
    """``ArtifactError`` unless the artifact set was built from ``zoo``'s base model.

    ``zoo_fingerprint`` is ``zoo.fingerprint()`` when the caller has it already:
    an evaluation computes it once on the driver and hands it to every check
    and every scoring task, since computing it reads up to 128 KiB of every
    base tensor.
    """
    built_for = reader.manifest["zoo"]["fingerprint"]
    actual = zoo_fingerprint if zoo_fingerprint is not None else zoo.fingerprint()
    if actual != built_for:
        raise ArtifactError(
            f"{reader.uri}: built for base model fingerprint {built_for[:12]}…, but the base checkpoint "
            f"{zoo.base.uri} has fingerprint {actual[:12]}… (different tensors or weights); use the zoo the "
            "switches were built from (their manifest records its URI under zoo.uri)."
        )


def open_switches(artifacts_uri: str, zoo_uri: str | None = None, storage_options: dict[str, Any] | None = None,
                  *, zoo_fingerprint: str | None = None) -> tuple[ArtifactReader, Zoo]:
    """The artifact set and the zoo it was built from (``zoo_uri``, else the one its manifest records),
    after :func:`check_built_from`; ``zoo_fingerprint``: that zoo's fingerprint, if already computed."""
    reader = ArtifactReader(artifacts_uri, storage_options=storage_options)
    zoo = load_zoo(zoo_uri or reader.manifest["zoo"]["uri"], storage_options=storage_options)
    check_built_from(reader, zoo, zoo_fingerprint)
    return reader, zoo


def iter_reconstructed(reader: ArtifactReader, zoo: Zoo, task: str, alpha: float) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, θ0 + λ·Mt⊙St) for every tensor of the base, in file order, one tensor at a time (paper 000 eq. 7).

    Tensors without a switch (non-float, or excluded by the zoo's globs) are θ0 as stored. The knob
    λ is the reader's (:meth:`ArtifactReader.switch`): the one place that decides it for either scope.
    """
    manifest = reader.manifest
    if task not in manifest["tasks"]:
        raise ArtifactError(f"{reader.uri}: no task {task!r}; tasks are {manifest['tasks']}.")
    alpha = match_alpha(list(manifest["alphas"]), alpha, reader.uri)
    # The task's switches are read once, encoded (a few % of θ0's bytes); decoding is per tensor.
    switches = read_task_switches(reader, task, alpha)
    missing = f"{reader.uri}: no switch for task {task!r}, alpha {alpha}, tensor {{name!r}}."
    base = ((name, zoo.base.read(name)) for name in zoo.base.infos())
    yield from reconstructed(base, switches, set(manifest["tensors"]), missing)


def reconstruct_task(artifacts_uri: str, task: str, alpha: float, out: str, zoo_uri: str | None = None,
                     storage_options: dict[str, Any] | None = None) -> str:
    """Write the full state dict θ0 + λ·Mt⊙St for ``task`` at ``alpha`` to ``out`` (safetensors).

    θ0 comes from the zoo recorded in the manifest (or ``zoo_uri``), whose
    fingerprint must match the one the switches were built from. One tensor
    is in memory at a time.
    """
    reader, zoo = open_switches(artifacts_uri, zoo_uri, storage_options)
    alpha = match_alpha(list(reader.manifest["alphas"]), alpha, artifacts_uri)
    if task not in reader.manifest["tasks"]:
        raise ArtifactError(f"{artifacts_uri}: no task {task!r}; tasks are {reader.manifest['tasks']}.")
    meta = {"tswitch_task": task, "tswitch_alpha": repr(alpha), "tswitch_artifacts": artifacts_uri}
    infos = zoo.base.infos()
    with SafetensorsStreamWriter(out, list(infos.values()), storage_options=storage_options, metadata=meta) as writer:
        for name, tensor in iter_reconstructed(reader, zoo, task, alpha):
            writer.write(name, tensor)
    return out
