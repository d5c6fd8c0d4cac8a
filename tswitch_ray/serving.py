"""Serving many tasks from one base: θ0 resident, any task's weights θ0 + λ·Mt⊙St from its switches.

docs/MATH.md "Reconstruction" (paper 000 eq. 7). A :class:`SwitchServer`
reads θ0 once (onto the device: CUDA when present) and each task's packed
switches once, on first use (they are ~4 % of a checkpoint's bytes, kept
encoded). Then

* :meth:`SwitchServer.apply` returns a task's full state dict, and
* :meth:`SwitchServer.switch_to` writes a task's weights into the parameters
  of a live ``nn.Module`` in place (no new module, no state-dict copy);

each decodes the task's switches (compiled, :func:`~tswitch_ray.artifacts.encoding.decode_positions`)
and applies them to θ0 tensor by tensor (:func:`~tswitch_ray.switch.reconstruct.reconstruct_into`),
the same bytes as ``tswitch reconstruct`` writes.

    server = SwitchServer("switches/", device="cpu")
    model.load_state_dict(server.apply("cars"))   # or, in place:
    server.switch_to(model, "cars")               # rename= maps zoo names to the module's
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tswitch_ray.artifacts import ArtifactReader
from tswitch_ray.artifacts.encoding import EncodedSwitch, decode_positions
from tswitch_ray.device import pick_device
from tswitch_ray.errors import ArtifactError, ConfigError
from tswitch_ray.switch import reconstruct_into


@dataclass(frozen=True)
class StoredSwitch:
    """One tensor's switch as stored (encoded), with its knob and where it came from (for errors)."""

    enc: EncodedSwitch
    shape: tuple[int, ...]
    knob: float
    where: str


def read_task_switches(reader: ArtifactReader, task: str, alpha: float) -> dict[str, StoredSwitch]:
    """Every switch of ``task`` at ``alpha``, encoded, in one pass over the set's parts (checked as the reader does)."""
    return {name: StoredSwitch(enc, shape, knob, where)
            for name, enc, shape, knob, where in reader.iter_encoded(task, alpha)}


def apply_switch(theta_0: torch.Tensor, sw: StoredSwitch, out: torch.Tensor | None = None) -> torch.Tensor:
    """θ0 + λ·M⊙S of one tensor (paper 000 eq. 7) from its stored switch, into ``out`` if given."""
    if tuple(theta_0.shape) != sw.shape:
        raise ArtifactError(f"{sw.where}: the switch has shape {sw.shape} but the base tensor has "
                            f"{tuple(theta_0.shape)}; the artifacts were built for another base model.")
    try:  # the payload is checked, then decoded block by block while it is applied
        return reconstruct_into(theta_0, decode_positions(sw.enc), sw.knob, out=out)
    except ArtifactError as exc:
        raise ArtifactError(f"{sw.where}: {exc}") from exc


def reconstructed(base: Iterator[tuple[str, torch.Tensor]], switches: Mapping[str, StoredSwitch],
                  switched: set[str], missing: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, θ0 + λ·M⊙S) for each (name, θ0) of ``base``; tensors outside ``switched`` pass as θ0.

    A tensor in ``switched`` without a switch raises ``ArtifactError`` (``missing`` is its message, with
    ``{name}`` for the tensor).
    """
    for name, theta_0 in base:
        if name not in switched:
            yield name, theta_0
            continue
        if name not in switches:
            raise ArtifactError(missing.format(name=name))
        yield name, apply_switch(theta_0, switches[name])


class SwitchServer:
    """θ0 resident on ``device`` (default: CUDA when present), tasks swapped in from their switches.

    ``artifacts``: a committed switch set; ``zoo``: the zoo it was built from
    (default: the one its manifest records; its base fingerprint must match).
    ``max_cached_tasks`` bounds how many tasks' encoded switches stay in memory.
    """

    def __init__(self, artifacts: str, zoo: str | None = None, *, device: str | torch.device | None = None,
                 storage_options: dict[str, Any] | None = None, max_cached_tasks: int = 64) -> None:
        from tswitch_ray.switch_sets import open_switches

        self.reader, zoo_obj = open_switches(artifacts, zoo, storage_options)
        self.device = pick_device(str(device) if device is not None else None)
        self.base: dict[str, torch.Tensor] = {name: zoo_obj.base.read(name).to(self.device)
                                              for name in zoo_obj.base.infos()}
        self._switched = set(self.reader.manifest["tensors"])
        self._cache: dict[tuple[str, float], dict[str, StoredSwitch]] = {}
        self._max_cached = max(1, int(max_cached_tasks))

    @property
    def tasks(self) -> list[str]:
        return self.reader.tasks

    @property
    def alphas(self) -> list[float]:
        return self.reader.alphas

    def _alpha(self, alpha: float | None) -> float:
        from tswitch_ray.switch_sets import match_alpha

        if alpha is None:
            if len(self.alphas) != 1:
                raise ConfigError(f"{self.reader.uri}: built for α in {self.alphas}; name one.")
            return self.alphas[0]
        return match_alpha(self.alphas, alpha, self.reader.uri)

    def switches(self, task: str, alpha: float | None = None) -> dict[str, StoredSwitch]:
        """``task``'s encoded switches at ``alpha``, read from storage on first use only."""
        key = (task, self._alpha(alpha))
        if key not in self._cache:
            if len(self._cache) >= self._max_cached:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = read_task_switches(self.reader, *key)
        return self._cache[key]

    def _missing(self, task: str, alpha: float | None) -> str:
        return f"{self.reader.uri}: no switch for task {task!r}, alpha {self._alpha(alpha)}, tensor {{name!r}}."

    def apply(self, task: str, alpha: float | None = None) -> dict[str, torch.Tensor]:
        """``task``'s full state dict θ0 + λ·Mt⊙St at ``alpha``, on the device; unswitched tensors are θ0's own."""
        sw = self.switches(task, alpha)
        return dict(reconstructed(iter(self.base.items()), sw, self._switched, self._missing(task, alpha)))

    def switch_to(self, module: nn.Module, task: str | None, alpha: float | None = None,
                  rename: Callable[[str], str | None] | None = None) -> None:
        """Write ``task``'s weights (θ0 when ``task`` is None) into ``module``'s parameters and buffers in place.

        Each base tensor ``name`` goes to the module entry ``rename(name)`` (default: ``name``; None skips the
        tensor); every entry named must exist, with the base tensor's shape. Entries of another dtype or
        device are converted on the copy.
        """
        targets = {**dict(module.named_parameters()), **dict(module.named_buffers())}
        pairs = [(name, (rename or str)(name)) for name in self.base]
        pairs = [(name, entry) for name, entry in pairs if entry is not None]
        lacking = [entry for _, entry in pairs if entry not in targets]
        if lacking:
            raise ConfigError(f"switch_to: the module has no entry {lacking[0]!r} (and {len(lacking) - 1} more) for "
                              "the base tensors; pass a rename that maps base names to the module's names.")
        sw = self.switches(task, alpha) if task is not None else {}
        with torch.no_grad():
            for name, entry in pairs:
                self._write(targets[entry], name, entry, task, alpha, sw)

    def _write(self, dst: torch.Tensor, name: str, entry: str, task: str | None, alpha: float | None,
               sw: Mapping[str, StoredSwitch]) -> None:
        theta_0 = self.base[name]
        if dst.shape != theta_0.shape:
            raise ConfigError(f"switch_to: module entry {entry!r} has shape {tuple(dst.shape)}, "
                              f"the base tensor {name!r} {tuple(theta_0.shape)}.")
        if task is None or name not in self._switched:
            dst.copy_(theta_0)
        elif name not in sw:
            raise ArtifactError(self._missing(task, alpha).format(name=name))
        elif dst.dtype == theta_0.dtype and dst.device == theta_0.device and dst.is_contiguous():
            apply_switch(theta_0, sw[name], out=dst)
        else:
            dst.copy_(apply_switch(theta_0, sw[name]))
