"""open_clip vision towers (task_vectors checkpoints converted to safetensors, and the demo zoo).

Accepted key layouts (the first prefix found wins, other keys are ignored):
``model.visual.*`` (the task_vectors ``ImageEncoder`` layout after conversion
to safetensors), ``visual.*`` (an open_clip ``CLIP`` state dict, and the demo
zoo), or bare tower keys (``conv1.weight``, ...). The architecture is a
built-in open_clip model name (``"ViT-B-32"``, ``"ViT-B-32-quickgelu"``) or an
open_clip model-config dict (``{"embed_dim", "vision_cfg", "quick_gelu"}``, the
JSON format of ``open_clip/model_configs``); the tower is built directly from
the config, so a custom architecture needs no registration in open_clip's
global registry. Heads: ``heads/<task>.safetensors`` (see
:class:`~tswitch_ray.eval.adapters.heads.LinearHead`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from tswitch_ray.errors import ConfigError
from tswitch_ray.eval.adapters.base import AdapterBase, select_prefixed
from tswitch_ray.eval.adapters.heads import load_heads_dir
from tswitch_ray.eval.adapters.preprocess import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    Preprocess,
    collate_images,
)


def resolve_open_clip_config(model: str | Mapping[str, Any]) -> dict[str, Any]:
    """An open_clip model config dict from a built-in name or a config dict."""
    if isinstance(model, str):
        import open_clip

        cfg = open_clip.get_model_config(model)
        if cfg is None:
            raise ConfigError(f"open_clip has no model config named {model!r}; pass a config dict with embed_dim and vision_cfg instead.")
        return dict(cfg)
    cfg = dict(model)
    if "embed_dim" not in cfg or "vision_cfg" not in cfg:
        raise ConfigError(f"open_clip model config needs 'embed_dim' and 'vision_cfg' keys; got {sorted(cfg)}.")
    return cfg


@dataclass
class OpenClipVisionAdapter(AdapterBase):
    """An open_clip vision tower plus per-task :class:`LinearHead` s (see module doc for key layouts)."""

    model_cfg: dict[str, Any] = field(default_factory=dict)
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    kind: str = "open_clip"

    PREFIXES = ("model.visual.", "visual.", "")

    @property
    def preprocess(self) -> Preprocess:
        size = self.model_cfg["vision_cfg"].get("image_size", 224)
        size = size[0] if isinstance(size, (list, tuple)) else size
        return Preprocess("image", int(size), tuple(self.mean), tuple(self.std))

    def template(self) -> nn.Module:
        from open_clip.model import _build_vision_tower  # noqa: PLC2701 - builds a tower without the global registry

        cfg = self.model_cfg
        return _build_vision_tower(int(cfg["embed_dim"]), dict(cfg["vision_cfg"]), quick_gelu=bool(cfg.get("quick_gelu", False)))

    def build(self, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
        """Like the base ``build``, but the tower is allocated without its random initialisation.

        Every parameter and buffer is overwritten by the strict load anyway, so
        the template is made on the meta device and materialised empty (ViT-B/32:
        ~2 s of random init saved per model). Falls back to a normal build if
        the tower has state outside its state dict.
        """
        with torch.device("meta"):
            model = self.template()
        own = set(model.state_dict())
        if all(n in own for n, _ in model.named_buffers()) and not any(t.is_meta for t in vars(model).values() if isinstance(t, torch.Tensor)):
            return self.load(model.to_empty(device="cpu"), state_dict)
        return self.load(self.template(), state_dict)

    def tower_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return select_prefixed(state_dict, self.PREFIXES)

    def load(self, model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
        prefix = next(p for p in self.PREFIXES if p == "" or any(k.startswith(p) for k in state_dict))
        return self._load_strict(model, self.tower_state_dict(state_dict), prefix)

    def features(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = model(x)
        return out[0] if isinstance(out, tuple) else out

    def collate(self, items: Sequence[Any]) -> torch.Tensor:
        return collate_images(items, self.preprocess)

    @classmethod
    def from_heads_dir(cls, model: str | Mapping[str, Any], heads_uri: str, tasks: Sequence[str] | None = None, storage_options: Mapping[str, Any] | None = None, **kw: Any) -> "OpenClipVisionAdapter":
        heads = load_heads_dir(heads_uri, tasks, storage_options)
        return cls(heads=dict(heads), source=heads_uri, model_cfg=resolve_open_clip_config(model), **kw)
