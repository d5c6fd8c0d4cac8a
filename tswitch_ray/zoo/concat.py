"""Concatenate safetensors parts (one per shard) into one file, one tensor in memory at a time."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tswitch_ray.zoo.readers import CheckpointReader, open_checkpoint
from tswitch_ray.zoo.writer import SafetensorsStreamWriter


def concat_safetensors(parts: Sequence[str], uri: str, order: Sequence[str] | None = None,
                       metadata: dict[str, str] | None = None, storage_options: dict[str, Any] | None = None) -> str:
    """Write every tensor of ``parts`` to ``uri`` in ``order`` (default: parts' order); returns ``uri``."""
    owner: dict[str, CheckpointReader] = {}
    for part in parts:
        reader = open_checkpoint(part, storage_options)
        for name in reader.infos():
            owner[name] = reader
    names = list(order) if order is not None else list(owner)
    layout = [owner[n].infos()[n] for n in names]
    with SafetensorsStreamWriter(uri, layout, storage_options=storage_options, metadata=metadata) as writer:
        for name in names:
            writer.write(name, owner[name].read(name))
    return uri
