"""The evaluation config (`tswitch eval CONFIG`, `tswitch sweep CONFIG`), validated with pydantic.

A config names a zoo, how to score it (an adapter spec and each task's eval
split) and the methods to compare. When ``adapter``/``data`` are left out and
the zoo's folder has a ``demo.json`` (the demo zoo, or any zoo written the same
way), they are taken from there.

```yaml
name: main-table
zoo: .tswitch/demo/zoo.yaml
artifacts: .tswitch/demo/switches      # T-Switch / Auto-Switch read switches from here
methods:
  - {method: individual}
  - {method: ta, options: {scale: 0.3}}
  - {method: tswitch, alpha: 0.6}
  - {method: autoswitch, alpha: 0.6, options: {k: 10, examples_per_task: 100}}
grid:                                  # sweeps only: the product of these is added to methods
  - {method: [dare], options.p: [0.1, 0.5, 0.9]}   # pdiscard's ratio is options.alpha
tracking: {uri: http://127.0.0.1:5000, experiment: tswitch}
run: {executor: ray, num_workers: 4}   # optional, how it runs (RunOptions); CLI flags override it
```
"""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tswitch_ray.errors import ConfigError
from tswitch_ray.io.atomic import exists, read_bytes
from tswitch_ray.io.fs import resolve_uri as io_resolve_uri
from tswitch_ray.methods import MethodOptions, get_method_info, validate_options
from tswitch_ray.options import WithRunOptions, lift_run_fields
from tswitch_ray.tracking import TrackingConfig


class TaskData(BaseModel):
    model_config = ConfigDict(extra="forbid")

    eval: str
    unlabeled: str | None = None  # Auto-Switch query sets and WEMoE test-time adaptation; default: eval


class MethodSpec(BaseModel):
    """One method to score. ``label`` names its row in tables (default: method + α + options)."""

    model_config = ConfigDict(extra="forbid")

    method: str
    alpha: float | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    artifacts: str | None = None  # overrides the config's artifacts (e.g. a build with --knob mean)
    label: str | None = None

    @field_validator("method")
    @classmethod
    def _known(cls, v: str) -> str:
        return get_method_info(v).name  # the registered name, whatever alias or spelling was given

    def check(self) -> None:
        """What the method's registry entry requires: `alpha` where it needs one, valid options."""
        if get_method_info(self.method).needs_alpha and self.alpha is None:
            raise ConfigError(f"method {self.method!r} needs `alpha` (one of the α the switches were built for).")
        if self.alpha is not None and not 0.0 <= self.alpha < 1.0:
            raise ConfigError(f"method {self.method!r}: alpha must be in [0, 1), got {self.alpha}.")
        self.validated_options()

    def validated_options(self) -> MethodOptions:
        """``options`` as the method's options model (defaults filled in); ``options`` itself stays as
        given, so cache keys and merge outputs do not change with how a value was spelled."""
        return validate_options(self.method, self.options, for_eval=True)

    @property
    def display(self) -> str:
        if self.label:
            return self.label
        parts = [self.method]
        if self.alpha is not None:
            parts.append(f"α={self.alpha:g}")
        parts += [f"{k}={v}" for k, v in sorted(self.options.items())]
        if self.artifacts:
            parts.append(f"[{self.artifacts.rstrip('/').rsplit('/', 1)[-1]}]")
        return " ".join(parts)

    def key(self) -> str:
        """Stable id of what this spec computes (for caching results and merges)."""
        payload = json.dumps(self.model_dump(exclude={"label"}), sort_keys=True, default=str)
        return f"{self.method}-{hashlib.sha256(payload.encode()).hexdigest()[:12]}"


class EvalConfig(WithRunOptions):
    """An evaluation: the zoo, how to score it, the methods; how it runs is ``run`` (:class:`RunOptions`).

    A YAML may give the run options under ``run:`` or, as before, flat
    (``executor:``, ``storage_options:``, ...); both land in ``run``.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = "eval"
    zoo: str
    adapter: dict[str, Any] | None = None
    data: dict[str, TaskData] | None = None
    tasks: list[str] | None = None
    artifacts: str | None = None
    methods: list[MethodSpec] = Field(default_factory=list)
    grid: list[dict[str, list[Any]]] = Field(default_factory=list)
    work_dir: str | None = None
    batch_size: int = 256
    limit: int | None = None
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    def expanded_methods(self) -> list[MethodSpec]:
        """``methods`` followed by every point of every ``grid`` entry, without duplicates."""
        specs = list(self.methods)
        for entry in self.grid:
            keys = list(entry)
            for values in itertools.product(*(entry[k] for k in keys)):
                raw: dict[str, Any] = {"options": {}}
                for k, v in zip(keys, values):
                    if k.startswith("options."):
                        raw["options"][k.split(".", 1)[1]] = v
                    else:
                        raw[k] = v
                try:
                    specs.append(MethodSpec.model_validate(raw))
                except ValidationError as exc:
                    raise ConfigError(f"eval config grid entry {entry}: {exc}") from exc
        seen: set[str] = set()
        unique = []
        for s in specs:
            if s.key() not in seen:
                seen.add(s.key())
                unique.append(s)
        return unique


def resolve_uri(base_dir: str, uri: str) -> str:
    """Relative paths resolve from the config file's folder, like the zoo manifest; local ones spelled as pathlib does."""
    return io_resolve_uri(base_dir, uri, tidy_local=True)


# Sections an override merges into, key by key, instead of replacing them.
_MERGED_SECTIONS = ("run", "tracking")


def _with_overrides(uri: str, raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with ``overrides`` applied (``None`` values skipped): the ``run`` and ``tracking`` sections are
    merged key by key, so an override names only what it changes. Flat run fields (``executor``, ...) in either
    are moved under ``run`` first."""
    try:
        raw, overrides = dict(lift_run_fields(raw)), dict(lift_run_fields(overrides))
    except ValueError as exc:
        raise ConfigError(f"{uri}: {exc}") from None
    for k, v in overrides.items():
        if v is None:
            continue
        if k in _MERGED_SECTIONS and isinstance(v, dict):
            base = raw[k] if isinstance(raw.get(k), dict) else {}
            raw[k] = {**base, **{kk: vv for kk, vv in v.items() if vv is not None}}
        else:
            raw[k] = v
    return raw


def load_eval_config(uri: str, overrides: dict[str, Any] | None = None,
                     storage_options: dict[str, Any] | None = None) -> EvalConfig:
    """Read and validate a YAML eval config; relative paths resolve from its folder."""
    if not exists(uri, storage_options):
        raise ConfigError(f"{uri}: eval config not found.")
    try:
        raw = yaml.safe_load(read_bytes(uri, storage_options))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{uri}: not valid YAML ({exc}).") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{uri}: an eval config must be a YAML mapping.")
    raw = _with_overrides(uri, raw, overrides or {})
    base_dir = uri.rsplit("/", 1)[0] if "/" in uri else "."
    if "://" not in uri:
        base_dir = str(Path(uri).resolve().parent)
    for key in ("zoo", "artifacts", "work_dir"):
        if isinstance(raw.get(key), str):
            raw[key] = resolve_uri(base_dir, raw[key])
    for m in raw.get("methods") or []:
        if isinstance(m, dict) and isinstance(m.get("artifacts"), str):
            m["artifacts"] = resolve_uri(base_dir, m["artifacts"])
    tracking = raw.get("tracking")
    if isinstance(tracking, dict) and isinstance(tracking.get("uri"), str) and ":" not in tracking["uri"].split("/")[0]:
        tracking["uri"] = resolve_uri(base_dir, tracking["uri"])  # a plain path: a local store, relative to here
    for entry in raw.get("grid") or []:
        if isinstance(entry, dict) and isinstance(entry.get("artifacts"), list):
            entry["artifacts"] = [resolve_uri(base_dir, a) for a in entry["artifacts"]]
    for d in (raw.get("data") or {}).values():
        if isinstance(d, dict):
            for k in ("eval", "unlabeled"):
                if isinstance(d.get(k), str):
                    d[k] = resolve_uri(base_dir, d[k])
    try:
        return EvalConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{uri}: invalid eval config:\n{exc}") from exc
