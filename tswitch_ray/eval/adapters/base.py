"""What every model family provides, and the shared plumbing: heads per task, strict loading, key mapping.

:class:`ModelAdapter` is what the evaluation runner needs from a checkpoint
family. :class:`AdapterBase` holds the per-task heads and loads a checkpoint
strictly (every parameter present with its shape, an error naming the source
and the first mismatching keys otherwise). :func:`select_prefixed` picks a
checkpoint's keys under its layout prefix; :func:`hf_key_map` maps a
transformers checkpoint's file keys onto the module's own keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

import torch
from torch import nn

from tswitch_ray.errors import ConfigError, ZooError
from tswitch_ray.eval.adapters.preprocess import Preprocess


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


def select_prefixed(state_dict: Mapping[str, torch.Tensor], prefixes: Sequence[str], drop: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """Keys under the first prefix any key has (``""`` = bare), prefix stripped; ``drop`` prefixes removed after."""
    for p in prefixes:
        if p == "" or any(k.startswith(p) for k in state_dict):
            out = {k[len(p) :]: v for k, v in state_dict.items() if k.startswith(p)}
            return {k: v for k, v in out.items() if not any(k.startswith(d) for d in drop)}
    return {}


def hf_key_map(model: nn.Module, source: str = "") -> dict[str, str]:
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
class AdapterBase:
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
        ckpt = select_prefixed(state_dict, prefixes, drop)
        own_prefixes = tuple(prefixes) + (("",) if "" not in prefixes else ())
        keymap: dict[str, str] = select_prefixed(hf_key_map(model, self.source), own_prefixes, drop)  # type: ignore[arg-type]
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
