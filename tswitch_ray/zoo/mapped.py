"""A checkpoint reader seen through its key rules: the zoo's (canonical) names in, the file's names out.

Every layer above the zoo (build, merge, eval) reads tensors by the zoo's
names; :class:`MappedReader` translates them to the names the checkpoint
stores (:mod:`tswitch_ray.zoo.keymap`). Rules not given in the manifest are
detected from the headers on first use, the same way in every process (the
driver and each worker open their own zoo), so no process maps differently.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from tswitch_ray.errors import ZooError
from tswitch_ray.io.checkpoints import CheckpointReader, TensorInfo
from tswitch_ray.zoo.keymap import KeyRules, canonical_names, detect_prefix

Pairs = tuple[tuple[str, str], ...]


class MappedReader:
    """``inner`` under ``rules`` (``None``: detect a prefix against ``reference``'s names)."""

    def __init__(self, inner: CheckpointReader, rules: KeyRules | None, reference: CheckpointReader | None = None) -> None:
        self.inner = inner
        self.uri = inner.uri
        self.rules = rules
        self.reference = reference
        self._pairs: Pairs | None = None
        self._names: dict[str, str] | None = None  # canonical -> stored
        self._infos: dict[str, TensorInfo] | None = None

    # -- the mapping --------------------------------------------------------
    @property
    def detected(self) -> bool:
        """Whether the rules were detected (not written in the manifest) and map anything."""
        return self.rules is None and bool(self.pairs())

    def pairs(self) -> Pairs:
        """The rules in effect, ``(stored prefix, zoo prefix)``; empty: names are kept."""
        if self._pairs is None:
            if self.rules is not None:
                self._pairs = tuple(p for p in self.rules.pairs() if p[0] != p[1])
            elif self.reference is None:
                self._pairs = ()
            else:
                found = detect_prefix(list(self.reference.infos()), list(self.inner.infos()))
                self._pairs = (found,) if found else ()
        return self._pairs

    def names(self) -> dict[str, str]:
        """``{zoo name: stored name}`` for every tensor of the checkpoint, in stored order."""
        if self._names is None:
            stored = list(self.inner.infos())
            try:
                self._names = canonical_names(self.pairs(), stored)
            except ValueError as e:
                raise ZooError(f"checkpoint {self.uri}: its key rules are not one-to-one: {e}.") from None
        return self._names

    def stored_name(self, name: str) -> str:
        try:
            return self.names()[name]
        except KeyError:
            raise ZooError(f"checkpoint {self.uri} has no tensor {name!r}"
                           + (f" (under its key rules {list(self.pairs())})" if self.pairs() else "") + ".") from None

    # -- the reader protocol ------------------------------------------------
    def infos(self) -> dict[str, TensorInfo]:
        if self._infos is None:
            inner = self.inner.infos()
            if not self.pairs():
                self._infos = inner
            else:
                self._infos = {c: dataclasses.replace(inner[s], name=c) for c, s in self.names().items()}
        return self._infos

    def read(self, name: str) -> torch.Tensor:
        return self.inner.read(self.stored_name(name) if self.pairs() else name)

    def read_range(self, name: str, start: int, end: int) -> bytes:
        return self.inner.read_range(self.stored_name(name) if self.pairs() else name, start, end)

    def read_ranges(self, requests: Sequence[tuple[str, int, int]]) -> list[bytes]:
        if not self.pairs():
            return self.inner.read_ranges(requests)
        return self.inner.read_ranges([(self.stored_name(n), a, b) for n, a, b in requests])

    def __getattr__(self, attr: str) -> Any:
        # Anything else a reader offers (e.g. a reader kind's own methods) is the inner reader's; only
        # called for attributes this class lacks, and never for its own state (unpickling sets that first).
        if attr.startswith("_") or attr in ("inner", "rules", "reference", "uri"):
            raise AttributeError(attr)
        return getattr(self.inner, attr)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_infos"] = None  # rebuilt from the inner reader's (cheap) header cache
        return state

    def __repr__(self) -> str:
        return f"MappedReader({self.inner!r}, {list(self.pairs()) if self._pairs is not None else 'unresolved'})"
