"""Model adapters: turn a (merged) state dict into a model and score it on a task.

Merging methods produce state dicts whose keys are exactly those of the zoo's
checkpoint files. An adapter knows one checkpoint family: how to build a module
from such a state dict, how to get the pre-classifier features (what
Auto-Switch's kNN router and WEMoE's routers look at), how to apply a task's
classification head, and how to turn dataset rows into input tensors.

Heads are never merged: they are per task and live outside the merged weights.

Four families:

* :class:`OpenClipVisionAdapter` — an open_clip vision tower. Accepted key
  layouts (the first prefix found wins, other keys are ignored):
  ``model.visual.*`` (the task_vectors ``ImageEncoder`` layout after
  conversion to safetensors), ``visual.*`` (an open_clip ``CLIP`` state dict,
  and the demo zoo), or bare tower keys (``conv1.weight``, ...). The
  architecture is a built-in open_clip model name (``"ViT-B-32"``,
  ``"ViT-B-32-quickgelu"``) or an open_clip model-config dict
  (``{"embed_dim", "vision_cfg", "quick_gelu"}``, the JSON format of
  ``open_clip/model_configs``); the tower is built directly from the config, so
  a custom architecture needs no registration in open_clip's global registry.
  Heads: ``heads/<task>.safetensors`` (see :class:`LinearHead`).
* :class:`HFCLIPVisionAdapter` — a Hugging Face ``CLIPVisionModel`` folder
  (``config.json`` + ``model.safetensors``; keys ``vision_model.*``), features
  = ``pooler_output``; heads as above, optionally carrying the CLIP
  ``projection`` (FusionBench applies the base model's ``visual_projection``).
* :class:`HFViTClassifierAdapter` — ``ViTForImageClassification`` folders (the
  30-ViT benchmark): the backbone ``vit.*`` is what is merged, each task's own
  ``classifier.*`` is its head. Features = the final-layernormed CLS token.
* :class:`HFSequenceClassifierAdapter` — RoBERTa-family
  ``*ForSequenceClassification`` folders: backbone ``roberta.*`` merged, the
  task's ``classifier.dense``/``classifier.out_proj`` is its head. Inputs are
  token ids; features = the ``<s>`` token's last hidden state.

:func:`adapter_from_spec` builds any of them from a small JSON-able dict (what
``demo.json`` and eval configs hold).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from PIL import Image
from torch import nn

from tswitch_ray.errors import ConfigError, ZooError
from tswitch_ray.io.atomic import read_bytes
from tswitch_ray.io.fs import open_fs, resolve_uri
from tswitch_ray.io.safetensors import read_safetensors, save_safetensors

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HEAD_SUFFIX = ".safetensors"


# ---------------------------------------------------------------- preprocessing


@dataclass(frozen=True)
class Preprocess:
    """How dataset rows become input tensors.

    ``modality="image"``: resize the shorter side to ``image_size`` (bicubic),
    centre-crop, scale to [0, 1], normalise by ``mean``/``std`` (open_clip's
    eval transform). ``modality="text"``: right-pad token ids with
    ``pad_token_id`` to the longest row, truncating at ``max_length``.
    """

    modality: str
    image_size: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    pad_token_id: int | None = None
    max_length: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def collate_images(items: Sequence[Image.Image], pre: Preprocess) -> torch.Tensor:
    """PIL images -> float32 ``[B, 3, S, S]``, normalised.

    Exactly open_clip's eval transform (``open_clip.image_transform(S,
    is_train=False)``: torchvision ``Resize(S, bicubic)`` of the shorter side,
    ``CenterCrop(S)``, RGB conversion, ``ToTensor``, ``Normalize``), so that
    accuracies match the papers' preprocessing pixel for pixel.
    """
    size = int(pre.image_size or 0)
    if size <= 0:
        raise ConfigError(f"image preprocessing needs a positive image_size, got {pre.image_size!r}.")
    arrs = []
    for img in items:
        w, h = img.size
        short, long = (w, h) if w <= h else (h, w)
        if short != size:  # torchvision Resize(int): shorter side to size, longer side truncated
            new_long = int(size * long / short)
            new_w, new_h = (size, new_long) if w <= h else (new_long, size)
            img = img.resize((new_w, new_h), Image.BICUBIC)
            w, h = img.size
        if (w, h) != (size, size):  # torchvision CenterCrop offsets
            top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
            img = img.crop((left, top, left + size, top + size))
        arrs.append(np.asarray(img.convert("RGB"), dtype=np.uint8))
    if not arrs:
        return torch.empty((0, 3, size, size), dtype=torch.float32)
    x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(pre.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean) / std


def collate_tokens(items: Sequence[Sequence[int]], pre: Preprocess) -> torch.Tensor:
    """Token-id lists -> int64 ``[B, T]`` right-padded with the pad id."""
    pad = int(pre.pad_token_id if pre.pad_token_id is not None else 0)
    cap = pre.max_length
    rows = [list(r)[:cap] if cap else list(r) for r in items]
    longest = max((len(r) for r in rows), default=0) or 1
    out = torch.full((len(rows), longest), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out


# ---------------------------------------------------------------- HF folders and JSON files


def read_hf_folder_tensors(folder: str, storage_options: Mapping[str, Any] | None = None, prefix: str | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a HF ``save_pretrained`` folder (single file or sharded index).

    With ``prefix``, only shards holding keys starting with it are read.
    """
    so = dict(storage_options or {})
    fs, path = open_fs(folder, so)
    index = path.rstrip("/") + "/model.safetensors.index.json"
    if fs.exists(index):
        weight_map: dict[str, str] = json.loads(read_bytes(resolve_uri(folder, "model.safetensors.index.json"), so))["weight_map"]
        files = sorted({f for k, f in weight_map.items() if prefix is None or k.startswith(prefix)})
    else:
        files = ["model.safetensors"]
    out: dict[str, torch.Tensor] = {}
    for name in files:
        tensors, _ = read_safetensors(resolve_uri(folder, name), so)
        out.update({k: v for k, v in tensors.items() if prefix is None or k.startswith(prefix)})
    return out


def read_json(uri: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    try:
        return json.loads(read_bytes(uri, storage_options))
    except json.JSONDecodeError as e:
        raise ZooError(f"{uri}: not valid JSON ({e}).") from e


# ---------------------------------------------------------------- heads


class LinearHead(nn.Module):
    """A per-task linear classifier, the analogue of the papers' zero-shot heads.

    On disk (``heads/<task>.safetensors``): ``weight`` ``[C, D]``, optional
    ``bias`` ``[C]`` (zeros if absent), optional ``projection`` ``[D, H]``
    applied to the backbone features first (CLIP's ``visual_projection``).
    Metadata: ``normalize`` (``"true"``: L2-normalise features before the
    linear map, as task_vectors' ``ClassificationHead`` does; the default for
    CLIP-family adapters) and ``classes`` (a JSON list of class names).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, projection: torch.Tensor | None = None, normalize: bool = True, classes: Sequence[str] | None = None) -> None:
        super().__init__()
        weight = weight.detach().float()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias.detach().float() if bias is not None else torch.zeros(weight.shape[0]), requires_grad=False)
        self.projection = nn.Parameter(projection.detach().float(), requires_grad=False) if projection is not None else None
        self.normalize = bool(normalize)
        self.classes = list(classes) if classes is not None else None

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.projection.shape[1] if self.projection is not None else self.weight.shape[1])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        f = features.float()
        if self.projection is not None:
            f = f @ self.projection.T
        if self.normalize:
            f = f / f.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return f @ self.weight.T + self.bias

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"weight": self.weight.data, "bias": self.bias.data}
        if self.projection is not None:
            out["projection"] = self.projection.data
        return out

    def metadata(self) -> dict[str, str]:
        md = {"normalize": "true" if self.normalize else "false", "format": "tswitch-linear-head-v1"}
        if self.classes is not None:
            md["classes"] = json.dumps(self.classes)
        return md


def save_head(uri: str, head: LinearHead, storage_options: Mapping[str, Any] | None = None) -> None:
    """Write a :class:`LinearHead` as safetensors (tensors + metadata)."""
    save_safetensors(head.tensors(), uri, dict(storage_options or {}), head.metadata())


def load_head(uri: str, storage_options: Mapping[str, Any] | None = None, *, default_normalize: bool = True) -> LinearHead:
    """Read a head file; ``ZooError`` naming the file when ``weight`` is missing or shapes disagree."""
    tensors, md = read_safetensors(uri, dict(storage_options or {}))
    if "weight" not in tensors:
        raise ZooError(f"{uri}: head file has no 'weight' tensor (found {sorted(tensors)}); a head needs weight [C, D] and optionally bias [C].")
    w = tensors["weight"]
    b = tensors.get("bias")
    p = tensors.get("projection")
    if w.ndim != 2 or (b is not None and tuple(b.shape) != (w.shape[0],)) or (p is not None and (p.ndim != 2 or p.shape[0] != w.shape[1])):
        raise ZooError(
            f"{uri}: head tensors have inconsistent shapes: weight {tuple(w.shape)}, bias {None if b is None else tuple(b.shape)}, "
            f"projection {None if p is None else tuple(p.shape)}; expected weight [C, D], bias [C], projection [D, H]."
        )
    norm = md.get("normalize")
    normalize = default_normalize if norm is None else norm.lower() == "true"
    classes = json.loads(md["classes"]) if "classes" in md else None
    return LinearHead(w, b, p, normalize, classes)


def load_heads_dir(heads_uri: str, tasks: Sequence[str] | None = None, storage_options: Mapping[str, Any] | None = None, *, default_normalize: bool = True) -> dict[str, LinearHead]:
    """Heads ``<heads_uri>/<task>.safetensors`` for ``tasks`` (all files in the folder if None)."""
    if tasks is None:
        fs, path = open_fs(heads_uri, dict(storage_options or {}))
        try:
            names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False) if p.endswith(HEAD_SUFFIX))
        except FileNotFoundError as e:
            raise ZooError(f"{heads_uri}: heads folder not found.") from e
        tasks = [n[: -len(HEAD_SUFFIX)] for n in names]
        if not tasks:
            raise ZooError(f"{heads_uri}: no <task>.safetensors head files in the heads folder.")
    return {t: load_head(resolve_uri(heads_uri, t + HEAD_SUFFIX), storage_options, default_normalize=default_normalize) for t in tasks}


class SequenceHead(nn.Module):
    """RoBERTa's classification head (``dense`` -> tanh -> ``out_proj``) on the ``<s>`` features."""

    def __init__(self, hidden: int, num_labels: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, num_labels)

    @property
    def num_classes(self) -> int:
        return int(self.out_proj.out_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.out_proj(torch.tanh(self.dense(features)))


# ---------------------------------------------------------------- protocol + shared base


@runtime_checkable
class ModelAdapter(Protocol):
    """What the evaluation runner needs from a checkpoint family."""

    kind: str
    preprocess: Preprocess

    @property
    def tasks(self) -> list[str]: ...

    def num_classes(self, task: str) -> int: ...

    def build(self, state_dict: Mapping[str, torch.Tensor]) -> nn.Module: ...

    def load(self, model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> nn.Module: ...

    def features(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor: ...

    def logits(self, model: nn.Module, x: torch.Tensor, task: str) -> torch.Tensor: ...

    def collate(self, items: Sequence[Any]) -> torch.Tensor: ...


def _select_prefixed(state_dict: Mapping[str, torch.Tensor], prefixes: Sequence[str], drop: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """Keys under the first prefix any key has (``""`` = bare), prefix stripped; ``drop`` prefixes removed after."""
    for p in prefixes:
        if p == "" or any(k.startswith(p) for k in state_dict):
            out = {k[len(p) :]: v for k, v in state_dict.items() if k.startswith(p)}
            return {k: v for k, v in out.items() if not any(k.startswith(d) for d in drop)}
    return {}


def _hf_key_map(model: nn.Module, source: str = "") -> dict[str, str]:
    """Checkpoint-file key -> the module's own state-dict key, for a transformers model.

    transformers 5 renames parameters at load time (e.g. ViT's
    ``encoder.layer.0.attention.attention.query`` became
    ``layers.0.attention.q_proj``) and reverts the renaming when saving; the
    reverse mapping is read from transformers itself. Only pure renamings are
    supported (the tensor objects are matched by identity).
    """
    own = model.state_dict()
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4.x: checkpoint keys are the module's keys
        return {k: k for k in own}
    by_ptr: dict[tuple, str] = {}
    for k, t in own.items():
        by_ptr.setdefault((t.data_ptr(), tuple(t.shape), t.dtype), k)
    out: dict[str, str] = {}
    for fk, t in revert_weight_conversion(model, dict(own)).items():
        mk = by_ptr.get((t.data_ptr(), tuple(t.shape), t.dtype)) if isinstance(t, torch.Tensor) else None
        if mk is None:
            raise ZooError(
                f"{source}: this transformers version stores {type(model).__name__}'s tensor {fk} through a conversion that is not a "
                "plain renaming; the adapter cannot map checkpoint keys onto the module. Use a transformers version whose layout matches the files."
            )
        out[fk] = mk
    return out


@dataclass
class _AdapterBase:
    """Shared plumbing: heads on the right device, strict loading with a readable error."""

    heads: dict[str, nn.Module] = field(default_factory=dict)
    source: str = "<state dict>"

    @property
    def tasks(self) -> list[str]:
        return list(self.heads)

    def head(self, task: str) -> nn.Module:
        if task not in self.heads:
            raise ConfigError(f"{self.source}: no classification head for task {task!r}; heads exist for {', '.join(self.heads) or 'no task'}.")
        return self.heads[task]

    def num_classes(self, task: str) -> int:
        return int(self.head(task).num_classes)

    def _head_on(self, task: str, device: torch.device) -> nn.Module:
        h = self.head(task)
        p = next(h.parameters())
        if p.device != device:
            h.to(device)
        return h.eval()

    def logits(self, model: nn.Module, x: torch.Tensor, task: str) -> torch.Tensor:
        f = self.features(model, x)  # type: ignore[attr-defined]
        return self._head_on(task, f.device)(f.float())

    def _load_strict(
        self,
        model: nn.Module,
        sd: Mapping[str, torch.Tensor],
        expected_prefix: str,
        ignore: Sequence[str] = (),
        *,
        names: Mapping[str, str] | None = None,
        unexpected: Sequence[str] = (),
    ) -> nn.Module:
        """Copy ``sd`` (module keys) into ``model``; every parameter must be present with its shape.

        ``names`` maps module keys to the checkpoint's own key names for error
        messages; ``unexpected`` lists checkpoint keys already found not to fit.
        """
        names = names or {}
        own = model.state_dict()
        wanted = [k for k in own if not any(i in k for i in ignore)]
        missing = [expected_prefix + names.get(k, k) for k in wanted if k not in sd]
        unexpected = list(unexpected) + [expected_prefix + k for k in sd if k not in own and not any(i in k for i in ignore)]
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"{len(missing)} missing, e.g. {missing[:3]}")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected, e.g. {unexpected[:3]}")
            raise ZooError(
                f"{self.source}: state dict does not match the {self.kind} architecture "  # type: ignore[attr-defined]
                f"(keys read under prefix {expected_prefix!r}): {'; '.join(parts)}. Check the model config and the checkpoint's key layout."
            )
        bad = [k for k in wanted if tuple(sd[k].shape) != tuple(own[k].shape)]
        if bad:
            k = bad[0]
            raise ZooError(f"{self.source}: tensor {expected_prefix}{names.get(k, k)} has shape {tuple(sd[k].shape)} but the architecture expects {tuple(own[k].shape)}.")
        with torch.no_grad():
            for k in wanted:
                own[k].copy_(sd[k].to(own[k].dtype))
        return model.eval()

    def _load_hf(self, model: nn.Module, state_dict: Mapping[str, torch.Tensor], prefixes: Sequence[str], drop: Sequence[str] = (), ignore: Sequence[str] = ()) -> nn.Module:
        """Load a checkpoint-layout state dict into a transformers module.

        The checkpoint's keys are under the first of ``prefixes`` it uses
        (``drop``-prefixed keys, e.g. heads, are left out); they are matched
        with the template's own checkpoint layout, so transformers versions
        whose modules renamed their parameters (5.x) load files saved in the
        classic layout, as ``from_pretrained`` does. Keys already in the
        module's own layout (``model.state_dict()``) are accepted as well.
        """
        prefix = next((p for p in prefixes if p == "" or any(k.startswith(p) for k in state_dict)), "")
        ckpt = _select_prefixed(state_dict, prefixes, drop)
        own_prefixes = tuple(prefixes) + (("",) if "" not in prefixes else ())
        keymap: dict[str, str] = _select_prefixed(_hf_key_map(model, self.source), own_prefixes, drop)  # type: ignore[arg-type]
        own = set(keymap.values())
        sd: dict[str, torch.Tensor] = {}
        unexpected = []
        for k, v in ckpt.items():
            if k in keymap:
                sd[keymap[k]] = v
            elif k in own:  # an in-memory state dict of the same transformers version (module layout)
                sd[k] = v
            elif not any(i in k for i in ignore):
                unexpected.append(prefix + k)
        return self._load_strict(model, sd, prefix, ignore, names={m: f for f, m in keymap.items()}, unexpected=unexpected)

    def build(self, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
        return self.load(self.template(), state_dict)  # type: ignore[attr-defined]


# ---------------------------------------------------------------- open_clip


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
class OpenClipVisionAdapter(_AdapterBase):
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
        return _select_prefixed(state_dict, self.PREFIXES)

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


# ---------------------------------------------------------------- Hugging Face


def _hf_image_stats(folder: str, so: Mapping[str, Any] | None, default_mean, default_std) -> tuple[tuple, tuple]:
    fs, path = open_fs(folder, dict(so or {}))
    p = path.rstrip("/") + "/preprocessor_config.json"
    if fs.exists(p):
        cfg = read_json(resolve_uri(folder, "preprocessor_config.json"), so)
        return tuple(cfg.get("image_mean", default_mean)), tuple(cfg.get("image_std", default_std))
    return tuple(default_mean), tuple(default_std)


@dataclass
class HFCLIPVisionAdapter(_AdapterBase):
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
        mean, std = _hf_image_stats(folder, storage_options, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        heads = load_heads_dir(heads_uri, tasks, storage_options)
        return cls(heads=dict(heads), source=folder, config=config, mean=mean, std=std)


def _task_classifier(folder: str, so: Mapping[str, Any] | None) -> dict[str, torch.Tensor]:
    tensors = read_hf_folder_tensors(folder, so, prefix="classifier.")
    if not tensors:
        raise ZooError(f"{folder}: checkpoint has no classifier.* tensors; each task folder must carry its own classification head.")
    return {k[len("classifier.") :]: v for k, v in tensors.items()}


@dataclass
class HFViTClassifierAdapter(_AdapterBase):
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
            t = _task_classifier(folder, storage_options)
            if "weight" not in t:
                raise ZooError(f"{folder}: classifier.weight missing from the task checkpoint.")
            heads[task] = LinearHead(t["weight"], t.get("bias"), normalize=False)
        mean, std = _hf_image_stats(base, storage_options, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        return cls(heads=heads, source=base, config=config, mean=mean, std=std)


_ROBERTA_FAMILY = ("roberta", "xlm-roberta", "camembert")


@dataclass
class HFSequenceClassifierAdapter(_AdapterBase):
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
        if mt not in _ROBERTA_FAMILY:
            raise ConfigError(f"{base}: model_type {mt!r} is not supported by the sequence-classifier adapter (RoBERTa family: {', '.join(_ROBERTA_FAMILY)}).")
        config = AutoConfig.for_model(**{k: v for k, v in raw.items() if k not in ("architectures", "transformers_version")})
        heads: dict[str, nn.Module] = {}
        for task, folder in task_folders.items():
            t = _task_classifier(folder, storage_options)
            need = ("dense.weight", "dense.bias", "out_proj.weight", "out_proj.bias")
            if any(k not in t for k in need):
                raise ZooError(f"{folder}: RoBERTa classifier needs classifier.{{dense,out_proj}}.{{weight,bias}}; found {sorted('classifier.' + k for k in t)}.")
            head = SequenceHead(int(t["dense.weight"].shape[1]), int(t["out_proj.weight"].shape[0]))
            head.load_state_dict({k: t[k].float() for k in need})
            heads[task] = head.eval()
        return cls(heads=heads, source=base, config=config)


# ---------------------------------------------------------------- spec


ADAPTER_KINDS = ("open_clip", "hf_clip_vision", "hf_vit_classifier", "hf_sequence_classifier")


def adapter_from_spec(spec: Mapping[str, Any], base_uri: str = "", storage_options: Mapping[str, Any] | None = None) -> ModelAdapter:
    """Build an adapter from a JSON-able spec; relative paths resolve against ``base_uri``.

    * ``{"kind": "open_clip", "model": "ViT-B-32" | {config dict}, "heads": "heads", "tasks": [...]?, "mean": [...]?, "std": [...]?}``
    * ``{"kind": "hf_clip_vision", "folder": "base_hf", "heads": "heads", "tasks": [...]?}``
    * ``{"kind": "hf_vit_classifier" | "hf_sequence_classifier", "base": "base_folder", "tasks": {"task": "folder", ...}}``
    """
    kind = spec.get("kind")
    so = storage_options
    if kind == "open_clip":
        extra = {k: tuple(spec[k]) for k in ("mean", "std") if k in spec}
        return OpenClipVisionAdapter.from_heads_dir(spec["model"], resolve_uri(base_uri, spec.get("heads", "heads")), spec.get("tasks"), so, **extra)
    if kind == "hf_clip_vision":
        return HFCLIPVisionAdapter.from_folder(resolve_uri(base_uri, spec["folder"]), resolve_uri(base_uri, spec.get("heads", "heads")), spec.get("tasks"), so)
    if kind in ("hf_vit_classifier", "hf_sequence_classifier"):
        tasks = spec.get("tasks")
        if not isinstance(tasks, Mapping) or not tasks:
            raise ConfigError(f"adapter spec of kind {kind!r} needs 'tasks': a mapping of task name to checkpoint folder.")
        folders = {t: resolve_uri(base_uri, f) for t, f in tasks.items()}
        cls = HFViTClassifierAdapter if kind == "hf_vit_classifier" else HFSequenceClassifierAdapter
        return cls.from_folders(resolve_uri(base_uri, spec["base"]), folders, so)
    raise ConfigError(f"adapter spec kind {kind!r} is unknown; use one of {', '.join(ADAPTER_KINDS)}.")
