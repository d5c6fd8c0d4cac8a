"""A PEFT LoRA adapter folder as a task of the zoo: τ read from its factors, never a merged model.

A folder with ``adapter_config.json`` and ``adapter_model.safetensors`` (or
``adapter_model.bin``), as ``PeftModel.save_pretrained`` writes it, is read
directly (no peft import, no model built):

* ``<module>.lora_A.weight`` / ``lora_B.weight`` (also with an adapter name,
  ``lora_A.<adapter>.weight``, and ``lora_embedding_A`` / ``_B`` of embedding
  layers) under the ``base_model.model.`` prefix are the factors of the base
  tensor ``<module>.weight``: its τ is s · B·A in fp32
  (:func:`~tswitch_ray.switch.taskvec.lora_task_vector`), with s from the
  config's ``r`` / ``lora_alpha`` / ``use_rslora`` and its ``rank_pattern`` /
  ``alpha_pattern`` as peft resolves them;
* ``<module>.base_layer.weight`` (peft saves it for adapted embeddings) is the
  task's weight under the update: τ = (base_layer − θ0) + s · B·A;
* every other tensor (``modules_to_save``, trained biases) replaces the base
  tensor of its name whole: τ = θt − θ0;
* a base tensor the adapter does not touch has τ = 0.

The reader holds no tensor: each τ reads the two factors of one module, so
memory is one module's worth whatever the model size. ``read`` gives the task's
dense weight θ0 + τ in the base's dtype (what ``merge_and_unload`` would hold),
for the evaluation of the task itself. What this does not model is refused
with the reason: DoRA, LoRA biases, trainable tokens, parameter targeting,
layer replication, convolution LoRA and other PEFT types.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from tswitch_ray.errors import ZooError
from tswitch_ray.io.atomic import read_bytes
from tswitch_ray.io.checkpoints import CheckpointReader, TensorInfo, TorchStateDictReader, dtype_to_torch
from tswitch_ray.io.fs import access_checked, join_uri, open_fs
from tswitch_ray.io.safetensors import SafetensorsReader
from tswitch_ray.switch.taskvec import lora_task_vector, task_vector

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_PREFIX = "base_model.model."
_LINEAR = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.weight$")
_EMBEDDING = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_embedding_A|lora_embedding_B)(?:\.(?P<adapter>[^.]+))?$")
_BASE_LAYER = re.compile(r"^(?P<module>.+)\.base_layer\.(?P<param>[^.]+)$")
_SAVED = re.compile(r"^(?P<module>.+)\.modules_to_save\.(?P<adapter>[^.]+)\.(?P<param>[^.]+)$")
# DoRA magnitudes, trainable-token deltas and LoRA biases: updates other than s · B·A.
_REFUSED = re.compile(r"lora_magnitude_vector|trainable_tokens_|\.lora_(?:A|B|embedding_[AB])(?:\.[^.]+)?\.bias$")
# init_lora_weights values that rewrite W0 when the adapter is created (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA).
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


class LoraSettings(BaseModel):
    """The fields of ``adapter_config.json`` that decide τ; the others (dropout, init, task type) do not."""

    model_config = ConfigDict(extra="ignore")

    peft_type: str
    r: int
    lora_alpha: float
    # Flags older peft versions do not write, or write as null: absent and null both mean off.
    use_rslora: bool | None = False
    fan_in_fan_out: bool | None = False
    use_dora: bool | None = False
    lora_bias: bool | None = False
    use_qalora: bool | None = False
    rank_pattern: dict[str, int] | None = None
    alpha_pattern: dict[str, float] | None = None
    trainable_token_indices: Any = None
    target_parameters: Any = None
    layer_replication: Any = None
    init_lora_weights: Any = True
    use_bdlora: Any = None
    kasa_config: Any = None
    velora_config: Any = None

    def refusal(self) -> str | None:
        """Why τ cannot be read from this adapter as s · B·A, or None."""
        reasons = [
            (bool(self.use_dora), "it is a DoRA adapter (use_dora: true), whose update is not s · B·A"),
            (bool(self.lora_bias), "it trains a LoRA bias (lora_bias: true), which is not supported"),
            (bool(self.trainable_token_indices), "it trains token rows (trainable_token_indices), not supported"),
            (bool(self.target_parameters), "it targets parameters (target_parameters), not supported"),
            (bool(self.layer_replication), "it replicates layers (layer_replication), so it has another architecture"),
            (str(self.init_lora_weights).lower().startswith(_BASE_CHANGING_INITS),
             f"it was initialised with {self.init_lora_weights!r}, which changes the base weights too, so s · B·A is "
             "not its update on this base (peft's save_pretrained(path_initial_model_for_weight_conversion=...) "
             "writes one that is)"),
            (any((self.use_qalora, self.use_bdlora, self.kasa_config, self.velora_config)),
             "it is a LoRA variant (QALoRA, block-diagonal LoRA, KaSA or VeLoRA) whose update is not s · B·A"),
        ]
        return next((why for bad, why in reasons if bad), None)

    def rank_alpha(self, module: str) -> tuple[int, float]:
        """r and α of ``module`` as peft resolves them (``get_pattern_key``: the first pattern matching a suffix)."""
        ranks, alphas = self.rank_pattern or {}, self.alpha_pattern or {}
        return (ranks.get(_pattern_key(ranks, module), self.r),
                alphas.get(_pattern_key(alphas, module), self.lora_alpha))


def _pattern_key(patterns: dict[str, Any], module: str) -> str:
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return module


@dataclass(frozen=True)
class LoraModule:
    """The factors of one adapted base tensor, as keys of the adapter file."""

    a_key: str
    b_key: str
    alpha: float
    transpose: bool
    base_layer_key: str | None = None


@dataclass(frozen=True)
class AdapterPlan:
    """Which adapter tensors make each base tensor's τ (header-only, so cheap to ship to workers)."""

    lora: dict[str, LoraModule]
    replaced: dict[str, str]  # base tensor -> adapter key of its whole replacement


def is_adapter_folder(uri: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether ``uri`` is a folder holding ``adapter_config.json``."""
    fs, path = open_fs(uri, storage_options)
    with access_checked("checkpoint", uri):
        try:
            return fs.isdir(path) and fs.exists(posixpath.join(path, ADAPTER_CONFIG))
        except FileNotFoundError:
            return False


class PeftAdapterReader:
    """One LoRA adapter folder read as a task checkpoint of ``base`` (see the module docstring).

    ``infos`` are the base's (a task has the base's tensors, shapes and dtypes);
    :meth:`task_vector` gives a tensor's exact τ; :meth:`read` the dense
    θ0 + τ in the base's dtype. ``weights``: the adapter file's reader (by
    default the folder's ``adapter_model.safetensors``, else ``.bin``). Cheap to
    create and picklable: nothing is read until first use.
    """

    def __init__(self, uri: str, base: CheckpointReader, storage_options: dict[str, Any] | None = None,
                 weights: CheckpointReader | None = None) -> None:
        self.uri = uri.rstrip("/") or uri
        self.base = base
        self._storage_options = storage_options
        self._weights = weights
        self._settings: LoraSettings | None = None
        self._plan: AdapterPlan | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"

    # -- the adapter's config and files -----------------------------------
    @property
    def settings(self) -> LoraSettings:
        if self._settings is None:
            self._settings = _read_settings(join_uri(self.uri, ADAPTER_CONFIG), self._storage_options)
        return self._settings

    @property
    def weights(self) -> CheckpointReader:
        if self._weights is None:
            self._weights = _open_weights(self.uri, self._storage_options)
        return self._weights

    @property
    def plan(self) -> AdapterPlan:
        if self._plan is None:
            self._plan = plan_adapter(self.settings, self.weights.infos(), self.base.infos(), self.weights.uri,
                                      self.base.uri)
        return self._plan

    # -- the reader protocol ----------------------------------------------
    def infos(self) -> dict[str, TensorInfo]:
        # The adapter's keys are planned (and checked against the base) here, where the zoo validates its tasks.
        _ = self.plan
        return self.base.infos()

    def task_vector(self, name: str, base: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """τ of base tensor ``name`` in float32 on ``base``'s device (``base``: θ0 of ``name``, any float dtype).

        ``out``: a flat float32 buffer of at least the tensor's size to compute into.
        """
        plan = self.plan
        if name in plan.lora:
            return self._lora_tau(name, plan.lora[name], base, out)
        if name in plan.replaced:
            theta = self.weights.read(plan.replaced[name]).to(base.device)
            return task_vector(theta, base, name, out=out)
        if out is None:
            return torch.zeros(base.shape, dtype=torch.float32, device=base.device)
        return out[: base.numel()].view(base.shape).zero_()

    def _lora_tau(self, name: str, mod: LoraModule, base: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        a = self.weights.read(mod.a_key).to(base.device)
        b = self.weights.read(mod.b_key).to(base.device)
        tau = lora_task_vector(a, b, mod.alpha, bool(self.settings.use_rslora), mod.transpose, out=out)
        del a, b
        if mod.base_layer_key is not None:
            # The adapter carries its own copy of the weight under the update (peft does for embeddings).
            tau.add_(task_vector(self.weights.read(mod.base_layer_key).to(base.device), base, name))
        return tau

    def read(self, name: str) -> torch.Tensor:
        """The task's weight θ0 + τ in the base's stored dtype (untouched tensors: θ0 itself)."""
        base = self.base.read(name)
        plan = self.plan
        if name not in plan.lora and name not in plan.replaced:
            return base
        tau = self.task_vector(name, base)
        return tau.add_(base).to(base.dtype)

    def read_range(self, name: str, start: int, end: int) -> bytes:
        plan = self.plan
        if name not in plan.lora and name not in plan.replaced:
            return self.base.read_range(name, start, end)
        return self.read(name).reshape(-1).view(torch.uint8)[start:end].numpy().tobytes()

    def read_ranges(self, requests: Sequence[tuple[str, int, int]]) -> list[bytes]:
        return [self.read_range(n, s, e) for n, s, e in requests]


def _read_settings(uri: str, storage_options: dict[str, Any] | None) -> LoraSettings:
    with access_checked("adapter config", uri):
        raw = read_bytes(uri, storage_options)
    folder = uri.rsplit("/", 1)[0]
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ZooError(f"adapter config {uri} is not valid JSON ({e}).") from None
    kind = data.get("peft_type") if isinstance(data, dict) else None
    if isinstance(kind, str) and kind.upper() != "LORA":
        raise ZooError(f"adapter {folder} cannot be read as a task: its peft_type is {kind!r}; only LoRA adapters "
                       "(peft_type \"LORA\") are supported. Merge it into a full checkpoint (peft's "
                       "merge_and_unload, then save_pretrained) and list that in the zoo.")
    try:
        settings = LoraSettings.model_validate(data)
    except ValidationError as e:
        fields = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        raise ZooError(f"adapter config {uri} is not a LoRA adapter config ({fields}).") from None
    why = settings.refusal()
    if why:
        raise ZooError(f"adapter {folder} cannot be read as a task: {why}. Merge it into a full "
                       "checkpoint (peft's merge_and_unload, then save_pretrained) and list that in the zoo.")
    return settings


def _open_weights(folder: str, storage_options: dict[str, Any] | None) -> CheckpointReader:
    fs, path = open_fs(folder, storage_options)
    with access_checked("adapter folder", folder):
        present = [f for f in ADAPTER_WEIGHTS if fs.exists(posixpath.join(path, f))]
    if not present:
        raise ZooError(f"adapter folder {folder} has {ADAPTER_CONFIG} but neither {' nor '.join(ADAPTER_WEIGHTS)}.")
    uri = join_uri(folder, present[0])
    return SafetensorsReader(uri, storage_options) if uri.endswith(".safetensors") else \
        TorchStateDictReader(uri, storage_options)


def plan_adapter(settings: LoraSettings, adapter: dict[str, TensorInfo], base: dict[str, TensorInfo],
                 adapter_uri: str, base_uri: str) -> AdapterPlan:
    """Map every adapter tensor to the base tensor it changes, checking names, shapes and the adapter name."""
    factors: dict[str, dict[str, str]] = {}
    replaced: dict[str, str] = {}
    base_layer: dict[str, str] = {}
    adapters: set[str] = set()

    def target(key: str, name: str) -> str:
        if name not in base:
            raise ZooError(
                f"adapter file {adapter_uri}: tensor {key!r} changes {name!r}, which base checkpoint {base_uri} "
                f"does not have (its first tensors: {', '.join(list(base)[:3])}); the adapter was trained on "
                "another model, the base is saved with another key layout, or the tensor is a tied weight the "
                "base file leaves out (an lm_head tied to the embedding)."
            )
        return name

    for key in adapter:
        if _REFUSED.search(key):
            raise ZooError(f"adapter file {adapter_uri}: tensor {key!r} is a DoRA magnitude, LoRA bias or "
                           "trainable-token delta, which is not supported.")
        bare = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        m = _LINEAR.match(bare) or _EMBEDDING.match(bare)
        if m:
            adapters.add(m["adapter"] or "")
            factors.setdefault(target(key, m["module"] + ".weight"), {})[m["kind"][-1]] = key
            continue
        m = _BASE_LAYER.match(bare)
        if m:
            base_layer[target(key, f"{m['module']}.{m['param']}")] = key
            continue
        m = _SAVED.match(bare)
        if m:
            adapters.add(m["adapter"])
            bare = f"{m['module']}.{m['param']}"
        replaced[target(key, bare)] = key
    if len(adapters) > 1:
        raise ZooError(f"adapter file {adapter_uri} holds several adapters ({', '.join(sorted(adapters))}); "
                       "save each as its own folder (one task each).")
    lora = {name: _module(settings, name, keys, adapter, base[name], adapter_uri, base_layer.pop(name, None))
            for name, keys in factors.items()}
    for name, key in base_layer.items():  # a base_layer without factors is a whole replacement
        replaced.setdefault(name, key)
    _check_replacements(replaced, adapter, base, adapter_uri)
    return AdapterPlan(lora=lora, replaced=replaced)


def _module(settings: LoraSettings, name: str, keys: dict[str, str], adapter: dict[str, TensorInfo],
            base: TensorInfo, uri: str, base_layer_key: str | None) -> LoraModule:
    if set(keys) != {"A", "B"}:
        have = ", ".join(keys.values())
        raise ZooError(f"adapter file {uri}: base tensor {name!r} has only {have}; LoRA needs both A and B.")
    a, b = adapter[keys["A"]], adapter[keys["B"]]
    module = name.removesuffix(".weight")
    rank, alpha = settings.rank_alpha(module)
    embedding = "lora_embedding" in keys["A"]
    if len(a.shape) != 2 or len(b.shape) != 2:
        raise ZooError(f"adapter file {uri}: {keys['A']!r} has shape {list(a.shape)}; only LoRA on linear and "
                       "embedding layers (2-D factors) is supported, not on convolutions.")
    transpose = embedding or bool(settings.fan_in_fan_out)
    shape = (b.shape[0], a.shape[1])[::-1] if transpose else (b.shape[0], a.shape[1])
    if a.shape[0] != rank or b.shape[1] != rank or shape != base.shape:
        raise ZooError(
            f"adapter file {uri}: the factors of {name!r} (A {list(a.shape)}, B {list(b.shape)}, r = {rank} by "
            f"the config) do not give the base tensor's shape {list(base.shape)}; the adapter was trained on "
            "another model."
        )
    for info in (a, b):
        if not dtype_to_torch(info.dtype).is_floating_point:
            raise ZooError(f"adapter file {uri}: tensor {info.name!r} has dtype {info.dtype}; LoRA factors are floats.")
    return LoraModule(keys["A"], keys["B"], float(alpha), transpose, base_layer_key)


def _check_replacements(replaced: dict[str, str], adapter: dict[str, TensorInfo], base: dict[str, TensorInfo],
                        uri: str) -> None:
    for name, key in replaced.items():
        if adapter[key].shape != base[name].shape:
            raise ZooError(
                f"adapter file {uri}: tensor {key!r} (shape {list(adapter[key].shape)}) replaces base tensor "
                f"{name!r} of shape {list(base[name].shape)}; the adapter was trained on another model (or "
                "resized its vocabulary)."
            )
