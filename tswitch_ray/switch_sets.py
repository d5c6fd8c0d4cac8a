"""An artifact set of switches opened together with the zoo it was built from (the base model they apply to).

What every reader of switches for weights needs first (reconstruct, serving,
the evaluation): the set's α matched, and the proof, by the base's
fingerprint, that θ0 is the one the switches were built for.
"""

from __future__ import annotations

import math
from typing import Any

from tswitch_ray.artifacts import ArtifactReader
from tswitch_ray.errors import ArtifactError
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
                  *, zoo_fingerprint: str | None = None, version: int | None = None) -> tuple[ArtifactReader, Zoo]:
    """The artifact set (its latest ``version`` unless one is named) and the zoo it was built from (``zoo_uri``,
    else the one its manifest records), after :func:`check_built_from`; ``zoo_fingerprint``: that zoo's
    fingerprint, if already computed."""
    reader = ArtifactReader(artifacts_uri, storage_options=storage_options, version=version)
    zoo = load_zoo(zoo_uri or reader.manifest["zoo"]["uri"], storage_options=storage_options)
    check_built_from(reader, zoo, zoo_fingerprint)
    return reader, zoo
