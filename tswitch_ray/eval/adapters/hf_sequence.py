"""Hugging Face RoBERTa-family ``*ForSequenceClassification`` folders.

The backbone ``roberta.*`` is merged; each task folder's own
``classifier.dense`` / ``classifier.out_proj`` is its head
(:class:`~tswitch_ray.eval.adapters.heads.SequenceHead`). Inputs are token ids;
features are the ``<s>`` token's last hidden state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from tswitch_ray.errors import ConfigError, ZooError
from tswitch_ray.eval.adapters.base import AdapterBase
from tswitch_ray.eval.adapters.heads import SequenceHead
from tswitch_ray.eval.adapters.hf_files import read_json, task_classifier
from tswitch_ray.eval.adapters.preprocess import Preprocess, collate_tokens
from tswitch_ray.io.fs import resolve_uri

ROBERTA_FAMILY = ("roberta", "xlm-roberta", "camembert")
_HEAD_KEYS = ("dense.weight", "dense.bias", "out_proj.weight", "out_proj.bias")


def _sequence_head(folder: str, storage_options: Mapping[str, Any] | None) -> SequenceHead:
    """The task folder's ``classifier.{dense,out_proj}`` as a :class:`SequenceHead`."""
    t = task_classifier(folder, storage_options)
    if any(k not in t for k in _HEAD_KEYS):
        raise ZooError(f"{folder}: RoBERTa classifier needs classifier.{{dense,out_proj}}.{{weight,bias}}; found {sorted('classifier.' + k for k in t)}.")
    head = SequenceHead(int(t["dense.weight"].shape[1]), int(t["out_proj.weight"].shape[0]))
    head.load_state_dict({k: t[k].float() for k in _HEAD_KEYS})
    return head.eval()


@dataclass
class HFSequenceClassifierAdapter(AdapterBase):
    """RoBERTa-family sequence classifiers: merged ``<prefix>.*`` backbone, per-task ``classifier.*`` heads."""

    config: Any = None
    kind: str = "hf_sequence_classifier"

    @property
    def base_prefix(self) -> str:
        return "roberta."

    @property
    def preprocess(self) -> Preprocess:
        pad = int(self.config.pad_token_id if self.config.pad_token_id is not None else 1)
        # RoBERTa positions start after the padding index.
        max_len = int(self.config.max_position_embeddings) - pad - 1
        return Preprocess("text", pad_token_id=pad, max_length=max_len)

    def template(self) -> nn.Module:
        from transformers import AutoModel

        return AutoModel.from_config(self.config, add_pooling_layer=False)

    def load(self, model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
        return self._load_hf(model, state_dict, (self.base_prefix, ""), drop=("classifier.", "pooler.", "lm_head."), ignore=("position_ids", "token_type_ids"))

    def features(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        mask = (x != self.preprocess.pad_token_id).long()
        return model(input_ids=x, attention_mask=mask).last_hidden_state[:, 0]

    def collate(self, items: Sequence[Any]) -> torch.Tensor:
        return collate_tokens(items, self.preprocess)

    @classmethod
    def from_folders(cls, base: str, task_folders: Mapping[str, str], storage_options: Mapping[str, Any] | None = None) -> "HFSequenceClassifierAdapter":
        from transformers import AutoConfig

        raw = read_json(resolve_uri(base, "config.json"), storage_options)
        mt = raw.get("model_type")
        if mt not in ROBERTA_FAMILY:
            raise ConfigError(f"{base}: model_type {mt!r} is not supported by the sequence-classifier adapter (RoBERTa family: {', '.join(ROBERTA_FAMILY)}).")
        config = AutoConfig.for_model(**{k: v for k, v in raw.items() if k not in ("architectures", "transformers_version")})
        heads: dict[str, nn.Module] = {task: _sequence_head(folder, storage_options) for task, folder in task_folders.items()}
        return cls(heads=heads, source=base, config=config)
