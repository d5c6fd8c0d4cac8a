"""Any Hugging Face ``*ForSequenceClassification`` / ``*ForImageClassification`` zoo, built by transformers itself.

The backbone (the module under the class's ``base_model_prefix``: ``bert.*``,
``roberta.*``, ``deberta.*``, ``vit.*``, ``convnext.*``, ...) is what is merged.
Each task's head is everything else in its own folder (``classifier.*``, and
e.g. DeBERTa's ``pooler.*``), loaded into a *shell*: the task's own
``AutoModelFor*Classification`` built from its ``config.json`` on the meta
device, with the backbone slot left empty. Scoring plugs the (merged) backbone
into the shell and runs transformers' own forward, so the head is applied
exactly as ``from_pretrained`` would (BERT's pooler, RoBERTa's two-layer head,
DeBERTa's context pooler, ViT's CLS token, ConvNeXt's pooled features).

Models are made with ``from_config`` and filled with ``load_state_dict``:
nothing from a checkpoint folder runs (no ``from_pretrained`` code path, never
``trust_remote_code``). Supported model types are checked from the folders'
``config.json`` before any work (:func:`check_model_types`).

A task may be a PEFT LoRA adapter folder (``adapter_config.json``, no
``config.json``): it is the base's model, so its config is the base's
``config.json`` (``base_model_name_or_path`` is never read), and its head is the
base's head tensors read through the adapter
(:func:`~tswitch_ray.io.readers.open_task`): θ0 + τ, i.e. the classifier
peft saved in ``modules_to_save``. Its label count is the base head's: the
reader refuses a ``modules_to_save`` tensor of another shape.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tswitch_ray.errors import ConfigError, ZooError
from tswitch_ray.eval.adapters.base import AdapterBase, hf_key_map
from tswitch_ray.eval.adapters.hf_files import (
    is_adapter_task,
    preprocessor_config,
    read_json,
    task_head_tensors,
)
from tswitch_ray.eval.adapters.preprocess import (
    Preprocess,
    collate_images,
    collate_tokens,
)
from tswitch_ray.io.fs import resolve_uri

# Text model types whose sequence classifiers are tested end to end (MiniLM checkpoints are model_type "bert").
SEQUENCE_MODEL_TYPES = ("bert", "camembert", "deberta", "deberta-v2", "distilbert", "electra", "roberta", "xlm-roberta")
# RoBERTa's positions start after the padding index, so fewer tokens fit.
_POSITIONS_AFTER_PAD = ("roberta", "xlm-roberta", "camembert")
# Image classifiers whose inputs are not plain pixel_values, or that wrap another library's models.
_IMAGE_EXCLUDED = ("imagegpt", "perceiver", "shieldgemma2", "timm_wrapper")
# Buffers some checkpoints carry that the modules recompute (not weights).
_IGNORED = ("position_ids", "token_type_ids")
_CONFIG_DROP = ("architectures", "transformers_version", "auto_map", "dtype", "torch_dtype")


def supported_model_types(modality: str) -> tuple[str, ...]:
    """The ``model_type`` values the adapter of ``modality`` (``"text"`` / ``"image"``) accepts."""
    if modality == "text":
        return SEQUENCE_MODEL_TYPES
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
    )

    return tuple(sorted(t for t in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES if t not in _IMAGE_EXCLUDED))


def _auto_class(modality: str) -> Any:
    from transformers import (
        AutoModelForImageClassification,
        AutoModelForSequenceClassification,
    )

    return AutoModelForSequenceClassification if modality == "text" else AutoModelForImageClassification


def _read_config(folder: str, kind: str, modality: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The folder's ``config.json``; ``ConfigError`` naming it unless its model type is supported."""
    uri = resolve_uri(folder, "config.json")
    raw = read_json(uri, storage_options)
    mt = raw.get("model_type")
    supported = supported_model_types(modality)
    if mt not in supported:
        auto = "AutoModelForSequenceClassification" if modality == "text" else "AutoModelForImageClassification"
        raise ConfigError(
            f"{uri}: model_type {mt!r} is not supported by the {kind!r} adapter ({auto}); supported model types: "
            f"{', '.join(supported)}."
        )
    return raw


def check_model_types(base: str, task_folders: Mapping[str, str], kind: str, modality: str,
                      storage_options: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Every folder's ``config.json`` read and checked (supported, the base's model type); by folder.

    A PEFT adapter task has no ``config.json`` of its own: it is the base's model, so it gets the base's.
    """
    raws = {base: _read_config(base, kind, modality, storage_options)}
    for folder in task_folders.values():
        adapter = is_adapter_task(folder, storage_options)
        raws[folder] = raws[base] if adapter else _read_config(folder, kind, modality, storage_options)
    mt = raws[base]["model_type"]
    for task, folder in task_folders.items():
        if raws[folder]["model_type"] != mt:
            raise ConfigError(f"{resolve_uri(folder, 'config.json')}: task {task!r} has model_type "
                              f"{raws[folder]['model_type']!r}, the base {base} has {mt!r}; a zoo's tasks are fine-tunes of its base.")
    return raws


def _config(raw: Mapping[str, Any], *, labels: bool = True) -> Any:
    """A transformers config from ``config.json``'s dict (fp32, whatever dtype the files were saved in)."""
    from transformers import AutoConfig

    drop = _CONFIG_DROP + (() if labels else ("id2label", "label2id", "num_labels"))
    return AutoConfig.for_model(**{k: v for k, v in raw.items() if k not in drop})


def _full_model(modality: str, config: Any, meta: bool) -> nn.Module:
    """The task class of ``config`` (fp32), on the meta device (no memory, no init) when ``meta``."""
    auto = _auto_class(modality)
    if not meta:
        return auto.from_config(config, dtype=torch.float32)
    with torch.device("meta"):
        return auto.from_config(config, dtype=torch.float32)


def _head_shell(modality: str, config: Any, folder: str, storage_options: Mapping[str, Any] | None,
                base: str) -> tuple[nn.Module, str]:
    """The task's own classifier with an empty backbone slot, its head loaded from ``folder`` (an adapter
    folder read against ``base``); and the slot's name."""
    shell = _full_model(modality, config, meta=True)
    prefix = shell.base_model_prefix
    shell.to_empty(device="cpu")  # uninitialised storage (untouched pages), only to read transformers' key map
    to_module = {f: m for f, m in hf_key_map(shell, folder).items() if not m.startswith(prefix + ".")}
    setattr(shell, prefix, nn.Module())
    tensors = task_head_tensors(folder, storage_options, prefix + ".", base)
    sd = {to_module.get(k, k): v for k, v in tensors.items() if not any(i in k for i in _IGNORED)}
    own = shell.state_dict()
    missing, unexpected = [k for k in own if k not in sd], [k for k in sd if k not in own]
    if missing or unexpected:
        raise ZooError(f"{folder}: the task's head does not match {type(shell).__name__} of its config.json: "
                       f"missing {missing[:3]}, unexpected {unexpected[:3]} (tensors outside {prefix}.*).")
    bad = [k for k in own if tuple(sd[k].shape) != tuple(own[k].shape)]
    if bad:
        raise ZooError(f"{folder}: head tensor {bad[0]} has shape {tuple(sd[bad[0]].shape)}, its config.json "
                       f"(num_labels {config.num_labels}) gives {tuple(own[bad[0]].shape)}.")
    shell.load_state_dict({k: v.float() for k, v in sd.items()})
    shell.requires_grad_(False)
    return shell.eval(), prefix


@dataclass
class HFClassifierAdapter(AdapterBase):
    """A transformers ``*For{Sequence,Image}Classification`` zoo: merged backbone, each task's own head shell."""

    config: Any = None  # the base's config: the backbone
    task_configs: dict[str, Any] = field(default_factory=dict)
    prefix: str = ""  # the class's base_model_prefix
    modality: str = "image"
    image_size: int = 224
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    kind: str = "hf_image_classifier"

    @property
    def base_prefix(self) -> str:
        return self.prefix + "."

    @property
    def preprocess(self) -> Preprocess:
        if self.modality == "image":
            return Preprocess("image", int(self.image_size), tuple(self.mean), tuple(self.std))
        pad = int(self.config.pad_token_id if self.config.pad_token_id is not None else 0)
        max_pos = getattr(self.config, "max_position_embeddings", None)
        if max_pos is not None and self.config.model_type in _POSITIONS_AFTER_PAD:
            max_pos = int(max_pos) - pad - 1
        return Preprocess("text", pad_token_id=pad, max_length=max_pos)

    def num_classes(self, task: str) -> int:
        self.head(task)  # the error naming the tasks that have heads
        return int(self.task_configs[task].num_labels)

    def template(self) -> nn.Module:
        return getattr(_full_model(self.modality, self.config, meta=False), self.prefix)

    def load(self, model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
        # A bare base-model file (ViTModel, BertModel) may carry a pooler the task class's backbone has not.
        drop = () if hasattr(model, "pooler") and model.pooler is not None else ("pooler.",)
        return self._load_hf(model, state_dict, (self.base_prefix, ""), drop=drop, ignore=_IGNORED)

    def _inputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.modality == "image":
            return {"pixel_values": x}
        return {"input_ids": x, "attention_mask": (x != self.preprocess.pad_token_id).long()}

    def features(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The text's first token, or the image's pooled features (the CLS token where there is no pooler)."""
        out = model(**self._inputs(x))
        h = out.last_hidden_state
        pooled = getattr(out, "pooler_output", None)
        if self.modality == "image" and pooled is not None:
            return pooled.flatten(1)
        return h[:, 0] if h.ndim == 3 else h.mean(dim=tuple(range(2, h.ndim)))

    def logits(self, model: nn.Module, x: torch.Tensor, task: str) -> torch.Tensor:
        shell = self._head_on(task, x.device)
        setattr(shell, self.prefix, model)
        try:
            return shell(**self._inputs(x)).logits.float()
        finally:
            setattr(shell, self.prefix, nn.Module())  # the shell holds no backbone between calls

    def collate(self, items: Sequence[Any]) -> torch.Tensor:
        return collate_images(items, self.preprocess) if self.modality == "image" else collate_tokens(items, self.preprocess)

    @classmethod
    def from_folders(cls, base: str, task_folders: Mapping[str, str], storage_options: Mapping[str, Any] | None = None,
                     *, kind: str | None = None, modality: str | None = None) -> HFClassifierAdapter:
        modality = modality or cls.modality
        kind = kind or cls.kind
        raws = check_model_types(base, task_folders, kind, modality, storage_options)
        shells: dict[str, nn.Module] = {}
        configs: dict[str, Any] = {}
        prefix = ""
        for task, folder in task_folders.items():
            configs[task] = _config(raws[folder])
            shells[task], prefix = _head_shell(modality, configs[task], folder, storage_options, base)
        extra: dict[str, Any] = {}
        if modality == "image":
            extra = _image_settings(base, raws[base], storage_options)
        return cls(heads=shells, source=base, config=_config(raws[base], labels=False), task_configs=configs,
                   prefix=prefix, modality=modality, kind=kind, **extra)


def _image_settings(base: str, raw: Mapping[str, Any], storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Input size and normalisation: the base's ``preprocessor_config.json`` (what its image processor feeds the
    model), else ``config.json``'s ``image_size``, else 224; mean and std default to 0.5."""
    pre = preprocessor_config(base, storage_options)
    s = pre.get("crop_size") or pre.get("size")
    if isinstance(s, dict):
        s = s.get("height", s.get("shortest_edge"))
    size = s or raw.get("image_size") or 224
    size = size[0] if isinstance(size, (list, tuple)) else size
    return {"image_size": int(size), "mean": tuple(pre.get("image_mean", (0.5,) * 3)), "std": tuple(pre.get("image_std", (0.5,) * 3))}
