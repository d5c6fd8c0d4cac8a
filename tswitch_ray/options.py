"""How a job runs: executor, Ray, workers, GPUs and storage — one typed model for every verb.

``build``, ``merge``, ``eval``, ``sweep`` and ``demo`` take the same
:class:`RunOptions`; their configs hold it as ``run`` (:class:`WithRunOptions`),
and the CLI fills it from one option group. Credentials in the storage options
(s3fs ``key``/``secret``/``token``, botocore's ``aws_secret_access_key``,
anything that looks like a password or token, and the password of a
``scheme://user:password@host`` URI) are redacted here, in one place: every
dump of a ``RunOptions`` (``model_dump``, ``model_dump_json``, ``repr``, and so
the dump of any config that holds one) shows ``"***"`` for them, so configs,
work folders, results and MLflow params written from a dump never hold a
secret. The real values travel to Ray tasks inside the pickled object, never as
text; code that needs them reads the attribute (``run.storage_options``).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_serializer, model_validator

REDACTED = "***"

# Key names (any nesting level, case-insensitive) whose values are credentials.
_SECRET_KEY = re.compile(
    r"(^|_)(key|secret|token|password|passwd|credentials?|session|signature|auth|authorization|sas|"
    r"account_key|connection_string|private)($|_)",
    re.IGNORECASE,
)
# Keys that contain a secret-looking word but name no secret.
_NOT_SECRET = frozenset({"key_prefix", "use_listings_cache", "region_name"})
# The password of a URI's user info: scheme://user:PASSWORD@host.
_URI_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/@:\s]*:)[^/@\s]+(?P<at>@)")


def is_secret_key(name: str) -> bool:
    """Whether a storage-option key names a credential (``key``, ``aws_secret_access_key``, ``token``, ...)."""
    return name.lower() not in _NOT_SECRET and bool(_SECRET_KEY.search(name))


def redact_uri(uri: str) -> str:
    """``uri`` with the password of its user info replaced by ``"***"`` (``s3://u:pw@host`` -> ``s3://u:***@host``)."""
    return _URI_PASSWORD.sub(rf"\g<head>{REDACTED}\g<at>", uri)


def redacted(options: Any) -> Any:
    """A copy of ``options`` with every credential value replaced by ``"***"`` (nested dicts and lists too)."""
    if isinstance(options, Mapping):
        return {k: (REDACTED if is_secret_key(str(k)) and v not in (None, "") else redacted(v))
                for k, v in options.items()}
    if isinstance(options, (list, tuple)):
        return type(options)(redacted(v) for v in options)
    if isinstance(options, str):
        return redact_uri(options)
    return options


class RunOptions(BaseModel):
    """Where and how a job runs. Frozen: a job never changes how it runs half-way."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    # "auto": in-process for small jobs, else Ray (tswitch_ray/distributed/inprocess.py; the CLI's build/merge default).
    executor: Literal["ray", "local", "auto"] = "ray"
    ray_address: str | None = None
    # CPUs of the local Ray started when no ``ray_address`` is given (default: all).
    num_workers: int | None = Field(default=None, ge=1)
    # GPUs per task (fractions allowed); tasks compute on CUDA when > 0.
    num_gpus: float = Field(default=0.0, ge=0.0)
    # Tasks submitted at once (default: twice the cluster's CPUs).
    max_in_flight: int | None = Field(default=None, ge=1)
    # fsspec options of every URI the job reads or writes (s3fs: key, secret, client_kwargs, ...).
    storage_options: dict[str, Any] = Field(default_factory=dict, repr=False)
    show_progress: bool = True

    @field_serializer("storage_options")
    def _redact_storage_options(self, value: dict[str, Any]) -> dict[str, Any]:
        return redacted(value)

    @field_serializer("ray_address")
    def _redact_ray_address(self, value: str | None) -> str | None:
        return None if value is None else redact_uri(value)

    def __repr_args__(self):  # type: ignore[no-untyped-def]
        for name, value in super().__repr_args__():
            yield name, (redact_uri(value) if name == "ray_address" and value else value)
        yield "storage_options", redacted(self.storage_options)

    @property
    def uses_gpu(self) -> bool:
        return self.num_gpus > 0

    @property
    def cache_key(self) -> str:
        """A stable digest of every field, real credentials included (they decide which filesystem opens).

        It keys per-process caches (a zoo's parsed headers per worker); it is a
        hash, never the values, and it is never written anywhere.
        """
        payload = json.dumps({name: getattr(self, name) for name in type(self).model_fields},
                             sort_keys=True, default=repr)
        return hashlib.sha256(payload.encode()).hexdigest()

    def __hash__(self) -> int:  # frozen, but a dict field: pydantic's default hash would fail
        return hash(self.cache_key)

    def explicit(self) -> dict[str, Any]:
        """The fields that were given (not defaulted), with their real values: what an override carries."""
        return {name: getattr(self, name) for name in self.model_fields_set}


RUN_FIELDS = tuple(RunOptions.model_fields)


def lift_run_fields(data: Any) -> Any:
    """Move flat run fields (``executor=``, ``storage_options=``, ...) of a config's input into its ``run``.

    Configs took these flat before ``run`` existed, and the Python API and
    YAML files still may; a field given both flat and under ``run`` is an error,
    not a silent choice.
    """
    if not isinstance(data, Mapping):
        return data
    flat = {k: data[k] for k in RUN_FIELDS if k in data}
    if not flat:
        return data
    rest = {k: v for k, v in data.items() if k not in flat}
    run = rest.get("run")
    if isinstance(run, RunOptions):
        given, run = run.model_fields_set, dict(run)  # every field with its real value (a dump would redact)
    elif run is None:
        given, run = set(), {}
    elif isinstance(run, Mapping):
        given = set(run)
    else:
        return data  # let validation name the bad `run`
    both = sorted(set(flat) & given)
    if both:
        raise ValueError(f"{', '.join(both)} given both at the top level and under `run`; give each once, "
                         "under `run`.")
    rest["run"] = {**run, **flat}
    return rest


class WithRunOptions(BaseModel):
    """A config that runs a job: its :class:`RunOptions` as ``run``, flat legacy fields lifted into it."""

    model_config = ConfigDict(hide_input_in_errors=True)  # inputs may hold credentials: errors name fields only

    run: RunOptions = Field(default_factory=RunOptions)

    @model_validator(mode="before")
    @classmethod
    def _lift_run_fields(cls, data: Any) -> Any:
        return lift_run_fields(data)


class RunContext:
    """Mixin of the frozen task contexts sent to Ray (build shards, merge shards, eval cells): how they run.

    A context carries ``run: RunOptions`` as a field of its own dataclass;
    the storage options and the device choice are read from it, never copied.
    """

    run: RunOptions

    @property
    def storage_options(self) -> dict[str, Any]:
        return self.run.storage_options

    @property
    def use_cuda(self) -> bool:
        return self.run.uses_gpu
