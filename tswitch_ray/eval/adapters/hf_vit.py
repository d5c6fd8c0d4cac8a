"""Hugging Face ``ViTForImageClassification`` folders (the 30-ViT benchmark).

The backbone ``vit.*`` is what is merged; each task folder's own
``classifier.*`` is its head (a :class:`~tswitch_ray.eval.adapters.heads.LinearHead`
without normalisation). Features are the final-layernormed CLS token, what
``ViTForImageClassification`` classifies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from tswitch_ray.errors import ZooError
from tswitch_ray.eval.adapters.base import AdapterBase
from tswitch_ray.eval.adapters.heads import LinearHead
from tswitch_ray.eval.adapters.hf_files import (
    hf_image_stats,
    read_json,
    task_classifier,
)
from tswitch_ray.eval.adapters.preprocess import Preprocess, collate_images
from tswitch_ray.io.fs import resolve_uri


@dataclass
class HFViTClassifierAdapter(AdapterBase):
    """``ViTForImageClassification`` zoo: merged backbone ``vit.*``, each task's own ``classifier`` head."""

    config: Any = None
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    kind: str = "hf_vit_classifier"

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess("image", int(self.config.image_size), tuple(self.mean), tuple(self.std))

    def template(self) -> nn.Module:
        from transformers import ViTModel

        return ViTModel(self.config, add_pooling_layer=False)

    def load(self, model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
        return self._load_hf(model, state_dict, ("vit.", ""), drop=("classifier.", "pooler."))

    def features(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        # ViTForImageClassification classifies the layernormed CLS token.
        return model(pixel_values=x).last_hidden_state[:, 0]

    def collate(self, items: Sequence[Any]) -> torch.Tensor:
        return collate_images(items, self.preprocess)

    @classmethod
    def from_folders(cls, base: str, task_folders: Mapping[str, str], storage_options: Mapping[str, Any] | None = None) -> "HFViTClassifierAdapter":
        from transformers import ViTConfig

        raw = read_json(resolve_uri(base, "config.json"), storage_options)
        config = ViTConfig(**{k: v for k, v in raw.items() if k not in ("architectures", "transformers_version", "id2label", "label2id")})
        heads: dict[str, nn.Module] = {}
        for task, folder in task_folders.items():
            t = task_classifier(folder, storage_options)
            if "weight" not in t:
                raise ZooError(f"{folder}: classifier.weight missing from the task checkpoint.")
            heads[task] = LinearHead(t["weight"], t.get("bias"), normalize=False)
        mean, std = hf_image_stats(base, storage_options, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        return cls(heads=heads, source=base, config=config, mean=mean, std=std)
