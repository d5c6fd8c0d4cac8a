"""Adapters from the small JSON-able spec that ``demo.json`` and eval configs hold."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tswitch_ray.errors import ConfigError
from tswitch_ray.eval.adapters.base import ModelAdapter
from tswitch_ray.eval.adapters.hf_clip import HFCLIPVisionAdapter
from tswitch_ray.eval.adapters.hf_sequence import HFSequenceClassifierAdapter
from tswitch_ray.eval.adapters.hf_vit import HFImageClassifierAdapter
from tswitch_ray.eval.adapters.open_clip import OpenClipVisionAdapter
from tswitch_ray.eval.adapters.silero import SileroVADAdapter
from tswitch_ray.io.fs import resolve_uri

ADAPTER_KINDS = ("open_clip", "hf_clip_vision", "hf_image_classifier", "hf_vit_classifier", "hf_sequence_classifier",
                "silero_vad")
# Kinds whose tasks are Hugging Face *For*Classification folders, each with its own head.
HF_CLASSIFIER_KINDS = {"hf_image_classifier": HFImageClassifierAdapter, "hf_vit_classifier": HFImageClassifierAdapter,
                       "hf_sequence_classifier": HFSequenceClassifierAdapter}


def adapter_from_spec(spec: Mapping[str, Any], base_uri: str = "", storage_options: Mapping[str, Any] | None = None) -> ModelAdapter:
    """Build an adapter from a JSON-able spec; relative paths resolve against ``base_uri``.

    * ``{"kind": "open_clip", "model": "ViT-B-32" | {config dict}, "heads": "heads", "tasks": [...]?, "mean": [...]?, "std": [...]?}``
    * ``{"kind": "hf_clip_vision", "folder": "base_hf", "heads": "heads", "tasks": [...]?}``
    * ``{"kind": "hf_image_classifier" | "hf_sequence_classifier", "base": "base_folder", "tasks": {"task": "folder", ...}}``
      (a task folder is a ``save_pretrained`` folder, or a PEFT LoRA adapter folder of the base)
      (``hf_vit_classifier`` is the image kind's former name; docs/EVAL.md walks through one)
    * ``{"kind": "silero_vad", "heads": "heads", "tasks": [...]?}`` (the real-model zoo, :mod:`.silero`)
    """
    kind = spec.get("kind")
    so = storage_options
    if kind == "open_clip":
        extra = {k: tuple(spec[k]) for k in ("mean", "std") if k in spec}
        return OpenClipVisionAdapter.from_heads_dir(spec["model"], resolve_uri(base_uri, spec.get("heads", "heads")), spec.get("tasks"), so, **extra)
    if kind == "hf_clip_vision":
        return HFCLIPVisionAdapter.from_folder(resolve_uri(base_uri, spec["folder"]), resolve_uri(base_uri, spec.get("heads", "heads")), spec.get("tasks"), so)
    if kind == "silero_vad":
        return SileroVADAdapter.from_heads_dir(resolve_uri(base_uri, spec.get("heads", "heads")), spec.get("tasks"), so)
    if kind in HF_CLASSIFIER_KINDS:
        tasks = spec.get("tasks")
        if not isinstance(tasks, Mapping) or not tasks:
            raise ConfigError(f"adapter spec of kind {kind!r} needs 'tasks': a mapping of task name to checkpoint folder.")
        if not isinstance(spec.get("base"), str):
            raise ConfigError(f"adapter spec of kind {kind!r} needs 'base': the base model's save_pretrained folder.")
        folders = {t: resolve_uri(base_uri, f) for t, f in tasks.items()}
        return HF_CLASSIFIER_KINDS[kind].from_folders(resolve_uri(base_uri, spec["base"]), folders, so, kind=kind)
    raise ConfigError(f"adapter spec kind {kind!r} is unknown; use one of {', '.join(ADAPTER_KINDS)}.")
