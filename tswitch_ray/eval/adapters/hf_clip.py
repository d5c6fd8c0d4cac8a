"""Hugging Face ``CLIPVisionModel`` folders (as FusionBench distributes its CLIP models).

A folder holds ``config.json`` and ``model.safetensors`` (keys
``vision_model.*``, or bare as transformers 5 saves a fresh
``CLIPVisionModel``); a whole ``CLIPModel`` checkpoint works too, its
``vision_model.*`` keys are taken. Features are the ``pooler_output``; heads are
:class:`~tswitch_ray.eval.adapters.heads.LinearHead` files, optionally carrying
the CLIP ``projection`` (FusionBench applies the base model's
``visual_projection``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from tswitch_ray.eval.adapters.base import AdapterBase
from tswitch_ray.eval.adapters.heads import load_heads_dir
from tswitch_ray.eval.adapters.hf_files import hf_image_stats, read_json
from tswitch_ray.eval.adapters.preprocess import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    Preprocess,
    collate_images,
)
from tswitch_ray.io.fs import resolve_uri


@dataclass
class HFCLIPVisionAdapter(AdapterBase):
    """A HF ``CLIPVisionModel`` (keys ``vision_model.*``, or bare as transformers 5 saves a fresh one) plus per-task :class:`LinearHead` s.

    A whole ``CLIPModel`` checkpoint works too: its ``vision_model.*`` keys are taken.
    """

    config: Any = None
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    kind: str = "hf_clip_vision"

    NOT_VISION = ("text_model.", "visual_projection.", "text_projection.", "logit_scale")

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess("image", int(self.config.image_size), tuple(self.mean), tuple(self.std))

    def template(self) -> nn.Module:
        from transformers import CLIPVisionModel

        return CLIPVisionModel(self.config)

    def load(self, model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
        # FusionBench / transformers 4 files: vision_model.*; a CLIPVisionModel saved by transformers 5: bare keys.
        return self._load_hf(model, state_dict, ("vision_model.", ""), drop=self.NOT_VISION, ignore=("position_ids",))

    def features(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model(pixel_values=x).pooler_output

    def collate(self, items: Sequence[Any]) -> torch.Tensor:
        return collate_images(items, self.preprocess)

    @classmethod
    def from_folder(cls, folder: str, heads_uri: str, tasks: Sequence[str] | None = None, storage_options: Mapping[str, Any] | None = None) -> "HFCLIPVisionAdapter":
        from transformers import CLIPVisionConfig

        raw = read_json(resolve_uri(folder, "config.json"), storage_options)
        if raw.get("model_type") == "clip":  # a full CLIPModel config: take its vision part
            raw = raw.get("vision_config", {})
        raw = {k: v for k, v in raw.items() if k not in ("architectures", "transformers_version")}
        config = CLIPVisionConfig(**raw)
        mean, std = hf_image_stats(folder, storage_options, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        heads = load_heads_dir(heads_uri, tasks, storage_options)
        return cls(heads=dict(heads), source=folder, config=config, mean=mean, std=std)
