"""The method registry: every merge, eval-time method and reference row, by name.

A method is one module of this package that calls :func:`register` when it is
imported (``tswitch_ray.methods`` imports every module of the package, so
adding a file is enough). Its :class:`MethodInfo` says everything the rest of
the product needs to know about it — nothing outside this package keeps a list
of method names:

* ``tswitch merge`` lists the merges (``kind`` one-model or per-task) with their
  summaries, validates ``-O`` against ``options`` and builds the method with
  ``factory``;
* an eval config's ``method:`` is resolved by :func:`get_method_info`, its
  ``options:`` validated against the options model, ``alpha`` / ``artifacts``
  required where ``needs_alpha`` / ``needs_artifacts`` say so;
* the eval runner merges the methods whose ``merged_by_eval`` is true, scores
  every cell with the scorer named by ``scorer`` (``eval/scoring.py``), one
  cell per task or, where ``scores_all_tasks_at_once``, one for all tasks;
* the results table counts each method's storage with ``storage``.

Names are matched case-insensitively, with ``-`` and ``_`` alike, aliases
included.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError, model_validator

from tswitch_ray.errors import ConfigError

if TYPE_CHECKING:
    from tswitch_ray.methods.base import MergeMethod


class MethodKind(str, Enum):
    """What a method produces, which decides how it is run and scored."""

    ONE_MODEL = "one-model merge"  # one state dict serves every task
    PER_TASK = "per-task merge"  # one state dict per task
    EVAL_TIME = "eval-time method"  # its weights depend on the inputs: only scored by an eval
    REFERENCE = "reference row"  # a zoo checkpoint as it is (base, individual)

    @property
    def is_merge(self) -> bool:
        return self in (MethodKind.ONE_MODEL, MethodKind.PER_TASK)


def _not_a_bool(value: Any) -> Any:
    # pydantic's lax mode reads true as 1; an option that is a number is never given as a flag.
    if isinstance(value, bool):
        raise ValueError("Input should be a number, not a boolean")
    return value


#: A number option: ints, floats and numeric strings (``-O k=20``) pass, booleans do not.
Number = Annotated[float, BeforeValidator(_not_a_bool)]
#: An integer option, booleans refused like :data:`Number`.
Integer = Annotated[int, BeforeValidator(_not_a_bool)]


class MethodOptions(BaseModel):
    """Base of every method's options: unknown options are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class NoOptions(MethodOptions):
    """The options of a method that has none."""


class EvalTimeOptions(MethodOptions):
    """Options of an eval-time method, given in an eval config: ``null`` means the default."""

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            return {k: v for k, v in data.items() if v is not None}
        return data


#: ``storage(sizes, alpha, options, query_bytes) -> bytes`` to serve every task (-1: unknown).
StorageCost = Callable[["StorageModel", "float | None", MethodOptions, int], int]


def unknown_storage(sizes: StorageModel, alpha: float | None, options: MethodOptions, query_bytes: int) -> int:
    """The storage cost of a method that declares none: unknown (-1, drawn as '–')."""
    return -1


@dataclass(frozen=True)
class MethodInfo:
    """Everything the product knows about one method (see the module docstring)."""

    name: str  # canonical: what results tables, merge keys and MLflow params show
    kind: MethodKind
    summary: str  # one line, for `tswitch merge --help`
    scorer: str  # key of the eval scorer in eval/scoring.py
    options: type[MethodOptions] = NoOptions
    aliases: tuple[str, ...] = ()
    factory: Callable[..., MergeMethod] | None = None  # merges: called with the validated options as keywords
    storage: StorageCost = unknown_storage
    needs_alpha: bool = False  # an eval config must give `alpha` (the α its switches were built for)
    needs_artifacts: bool = False  # scored from switch artifacts (`tswitch build`), never merged by the eval
    scores_all_tasks_at_once: bool = False  # one scoring task covers every task (training or routing spans them)
    eval_options: type[MethodOptions] | None = None  # what an eval config may set, where it is not `options`
    logged_options: tuple[str, ...] = ()  # options logged as MLflow params of their own, default filled in

    def __post_init__(self) -> None:
        if self.kind.is_merge and self.factory is None:
            raise ValueError(f"method {self.name!r}: a {self.kind.value} needs a factory.")
        if not self.kind.is_merge and self.factory is not None:
            raise ValueError(f"method {self.name!r}: a {self.kind.value} is not built as a MergeMethod.")
        for model in (self.options, self.eval_options or self.options):
            model()  # every option has a default: `tswitch merge --method X` and `{method: X}` need none
        unknown = set(self.logged_options) - set(self.defaults(for_eval=True))
        if unknown:
            raise ValueError(f"method {self.name!r}: logged_options {sorted(unknown)} are not options of it.")

    @property
    def merged_by_eval(self) -> bool:
        """Whether an eval merges this method (into ``work_dir/merges/``) before scoring it."""
        return self.kind.is_merge and not self.needs_artifacts

    def defaults(self, *, for_eval: bool = False) -> dict[str, Any]:
        model = (self.eval_options or self.options) if for_eval else self.options
        return {name: field.default for name, field in model.model_fields.items()}


_METHODS: dict[str, MethodInfo] = {}


def _normal(name: str) -> str:
    return str(name).strip().lower().replace("-", "_")


def _index() -> dict[str, MethodInfo]:
    index: dict[str, MethodInfo] = {}
    for info in _METHODS.values():
        for key in (info.name, *info.aliases):
            index[_normal(key)] = info
    return index


def register(info: MethodInfo) -> MethodInfo:
    """Add ``info`` to the registry; its name and aliases must be new (after normalising)."""
    taken = _index()
    clash = sorted({taken[_normal(k)].name for k in (info.name, *info.aliases) if _normal(k) in taken})
    if clash:
        raise ValueError(f"method {info.name!r}: its name or an alias is already registered by {', '.join(clash)}.")
    _METHODS[info.name] = info
    return info


_KIND_ORDER = {kind: i for i, kind in enumerate((MethodKind.REFERENCE, MethodKind.ONE_MODEL,
                                                  MethodKind.PER_TASK, MethodKind.EVAL_TIME))}


def registered(kind: MethodKind | None = None) -> list[MethodInfo]:
    """Every registered method (or those of ``kind``), references first, then merges, then eval-time."""
    infos = [i for i in _METHODS.values() if kind is None or i.kind is kind]
    return sorted(infos, key=lambda i: (_KIND_ORDER[i.kind], i.name))


def get_method_info(name: str) -> MethodInfo:
    """The method called ``name`` or one of its aliases; ``ConfigError`` listing the names if none is."""
    info = _index().get(_normal(name))
    if info is None:
        known = ", ".join(i.name for i in registered())
        raise ConfigError(f"unknown method {name!r}; choose one of {known}.")
    return info


def _describe(defaults: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in defaults.items()) or "none"


def validate_options(name: str, options: Mapping[str, Any], *, for_eval: bool = False) -> MethodOptions:
    """``options`` checked against method ``name``'s options model (``for_eval``: what an eval config
    may set); ``ConfigError`` naming each bad option, its value and what it should be."""
    info = get_method_info(name)
    model = (info.eval_options or info.options) if for_eval else info.options
    unknown = sorted(set(options) - set(model.model_fields))
    if unknown:
        where = " in an eval config" if for_eval and info.eval_options is not None else ""
        raise ConfigError(f"method {info.name!r} has no option(s) {', '.join(unknown)}{where}; "
                          f"its options are: {_describe(info.defaults(for_eval=for_eval))}.")
    try:
        return model.model_validate(dict(options))
    except ValidationError as exc:
        problems = "; ".join(
            f"option {'.'.join(str(p) for p in e['loc']) or '?'!r}: {e['msg'].removeprefix('Value error, ')} "
            f"(got {e['input']!r})"
            for e in exc.errors()
        )
        raise ConfigError(f"method {info.name!r}: {problems}.") from None


def get_method(name: str, **options: Any) -> MergeMethod:
    """The merge ``name`` (or an alias) built with ``options``; ``ConfigError`` on an unknown name,
    a method that is not a state-dict merge, or a bad option."""
    info = get_method_info(name)
    if info.factory is None:
        merges = ", ".join(i.name for i in registered() if i.kind.is_merge)
        raise ConfigError(f"method {info.name!r} is not a state-dict merge ({info.kind.value}): an eval config "
                          f"scores it, nothing merges it into weights; the merge methods are: {merges}.")
    return info.factory(**validate_options(info.name, options).model_dump())


@dataclass
class StorageModel:
    """Sizes, from headers and manifests only, that every method's storage is counted from."""

    n_tasks: int
    model_bytes: int  # one checkpoint as stored (base dtype)
    float_numel: int  # elements of the tensors that carry task vectors
    mlp_numel: int  # of which in transformer MLPs (WEMoE's experts)
    dtype_bytes: float  # mean bytes per element of the float tensors
    switch_bytes: dict[float, int] = field(default_factory=dict)  # encoded switches, all tasks, per α

    def bytes_for(self, method: str, alpha: float | None = None, options: Mapping[str, Any] | None = None,
                  query_bytes: int = 0) -> int:
        """Bytes to store what serves all tasks (base included where a method needs it); -1: unknown."""
        info = get_method_info(method)
        opts = validate_options(info.name, options or {}, for_eval=True)
        return info.storage(self, alpha, opts, query_bytes)
