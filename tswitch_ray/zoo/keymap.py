"""Key layouts: how one checkpoint's tensor names map onto the zoo's names (the base's).

The same weights are saved under different names by different classes: a
``BertModel`` writes ``encoder.layer.0...``, a ``BertForSequenceClassification``
``bert.encoder.layer.0...`` plus its ``classifier.*``; task_vectors'
``ImageEncoder`` pickles carry ``model.visual.*`` where open_clip has
``visual.*``. A checkpoint's names are mapped to *canonical* names (the base's
after its own rules) by prefix rules; the mapping must be one-to-one, so a
reconstructed task can be written back under its own names.

Everything here is pure: names in, names out. Reading checkpoints is the
zoo's job (:mod:`tswitch_ray.zoo.zoo`).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field

# Module names a classification / language-model head is usually saved under.
_HEAD_WORDS = frozenset({"classifier", "head", "heads", "lm_head", "score", "fc", "logits", "pre_logits"})
_LAYER_RE = re.compile(r"^(.*?\.\d+)\.")


class KeyRules(BaseModel):
    """Name rules of one checkpoint (a zoo manifest's ``prefix`` / ``rename`` fields).

    ``prefix``: a prefix this checkpoint's names carry and the zoo's do not
    (stripped on reading, put back on writing); names without it are kept.
    ``rename``: ``{stored prefix: zoo prefix}``, e.g. ``{"model.visual.": "visual."}``;
    ``""`` as the stored prefix adds a prefix to every name. Of all rules the
    longest matching stored prefix applies, once.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    prefix: str = ""
    rename: dict[str, str] = Field(default_factory=dict)

    def pairs(self) -> tuple[tuple[str, str], ...]:
        """``(stored prefix, zoo prefix)`` rules, longest stored prefix first."""
        rules = dict(self.rename)
        if self.prefix:
            rules.setdefault(self.prefix, "")
        return tuple(sorted(rules.items(), key=lambda kv: (-len(kv[0]), kv[0])))

    @property
    def is_identity(self) -> bool:
        return all(a == b for a, b in self.pairs())


def map_name(pairs: Sequence[tuple[str, str]], name: str) -> str:
    """``name`` after the first (longest) rule whose stored prefix it starts with."""
    for old, new in pairs:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def unmap_name(pairs: Sequence[tuple[str, str]], name: str) -> str:
    """The stored name a zoo name ``name`` most likely had: the inverse of :func:`map_name` under ``pairs``.

    Tries the rules by longest zoo prefix; the first stored name that maps
    back to ``name`` wins, else ``name`` itself. A checkpoint whose names are
    not recovered this way has them recorded (the build's ``names`` map).
    """
    for old, new in sorted(pairs, key=lambda p: (-len(p[1]), p[1])):
        if name.startswith(new):
            stored = old + name[len(new):]
            if map_name(pairs, stored) == name:
                return stored
    return name


def canonical_names(pairs: Sequence[tuple[str, str]], stored: Iterable[str]) -> dict[str, str]:
    """``{canonical name: stored name}`` in stored order; ``ValueError`` if two names map to one."""
    out: dict[str, str] = {}
    for s in stored:
        c = map_name(pairs, s)
        if c in out:
            raise ValueError(f"tensors {out[c]!r} and {s!r} both map to {c!r} under the rules {list(pairs)}")
        out[c] = s
    return out


def detect_prefix(base: Sequence[str], task: Sequence[str]) -> tuple[str, str] | None:
    """The one prefix rule ``(stored, zoo)`` that maps ``task``'s names onto ``base``'s, if there is one.

    Only tried when the names barely overlap (fewer than half of ``base``'s
    are in ``task``). A candidate strips a prefix ``P`` the task's names carry
    (``bert.`` of a ``BertFor...`` against a ``BertModel``) or adds one the
    base's carry (``model.``); it is *pure* when every task name it touches
    lands on a base name (the task's other names, e.g. a head, are left for
    the zoo's checks). The pure candidate matching most base names wins, and
    only if it matches at least half of them.
    """
    bset, tset = set(base), set(task)
    if not base or 2 * len(bset & tset) >= len(bset):
        return None
    candidates: set[tuple[str, str]] = set()
    for t in task:
        if t not in bset:
            candidates |= {(p, "") for p in _dotted_prefixes(t) if t[len(p):] in bset}
    for b in base:
        if b not in tset:
            candidates |= {("", p) for p in _dotted_prefixes(b) if b[len(p):] in tset}
    best: tuple[int, tuple[str, str]] | None = None
    for old, new in sorted(candidates):
        touched = [t for t in task if t.startswith(old)]
        mapped = {new + t[len(old):] for t in touched}
        if not mapped <= bset:
            continue
        if best is None or len(mapped) > best[0]:
            best = (len(mapped), (old, new))
    if best is None or 2 * best[0] < len(bset):
        return None
    return best[1]


def _dotted_prefixes(name: str) -> list[str]:
    """``a.b.c`` -> ``["a.", "a.b."]``."""
    parts = name.split(".")
    return [".".join(parts[:i]) + "." for i in range(1, len(parts))]


def matches_any(name: str, globs: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, g) for g in globs)


def _module(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else name


def looks_like_head(name: str, order: Sequence[str]) -> bool:
    """Whether ``name`` is probably a task head: a head-like module word, or the last module in ``order``."""
    if any(part in _HEAD_WORDS for part in name.split(".")[:-1] or [name]):
        return True
    if not order:
        return False
    last = _LAYER_RE.match(order[-1])
    last_module = last.group(1) if last else _module(order[-1])
    return name.startswith(last_module + ".") or name == last_module


def head_patterns(names: Iterable[str]) -> list[str]:
    """The ``task_specific:`` globs that cover ``names`` module by module: ``classifier.weight`` -> ``classifier.*``."""
    return sorted({f"{_module(n)}.*" if "." in n else n for n in names})


def suggest_task_specific(problems: Mapping[str, Sequence[str]]) -> list[str] | None:
    """Globs to suggest when every mismatching tensor looks like a head.

    ``problems``: ``{tensor name: names of its checkpoint in stored order}``
    for every tensor whose shape differs or that only a task has. ``None``
    when any of them does not look like a head (then a pattern would hide a
    real mismatch).
    """
    if not problems or not all(looks_like_head(n, order) for n, order in problems.items()):
        return None
    return head_patterns(problems)
