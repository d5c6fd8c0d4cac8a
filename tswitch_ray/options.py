"""How a job runs: executor, Ray, workers, GPUs and storage — one typed model for every verb.

``build``, ``merge``, ``eval``, ``sweep`` and ``demo`` take the same
:class:`RunOptions`; the CLI fills it from one option group. Credentials in the
storage options (s3fs ``key``/``secret``/``token``, botocore's
``aws_secret_access_key``, anything that looks like a password or token) are
redacted here, in one place: every dump of a ``RunOptions`` (``model_dump``,
``model_dump_json``, ``repr``) shows ``"***"`` for them, so configs, work
folders, results and MLflow params written from a dump never hold a secret.
The real values travel to Ray tasks inside the pickled object, never as text.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_serializer

REDACTED = "***"

# Key names (any nesting level, case-insensitive) whose values are credentials.
_SECRET_KEY = re.compile(
    r"(^|_)(key|secret|token|password|passwd|credentials?|session|signature|auth|authorization|sas|"
    r"account_key|connection_string|private)($|_)",
    re.IGNORECASE,
)
# Keys that contain a secret-looking word but name no secret.
_NOT_SECRET = frozenset({"key_prefix", "use_listings_cache", "region_name"})


def is_secret_key(name: str) -> bool:
    """Whether a storage-option key names a credential (``key``, ``aws_secret_access_key``, ``token``, ...)."""
    return name.lower() not in _NOT_SECRET and bool(_SECRET_KEY.search(name))


def redacted(options: Any) -> Any:
    """A copy of ``options`` with every credential value replaced by ``"***"`` (nested dicts and lists too)."""
    if isinstance(options, Mapping):
        return {k: (REDACTED if is_secret_key(str(k)) and v not in (None, "") else redacted(v))
                for k, v in options.items()}
    if isinstance(options, (list, tuple)):
        return type(options)(redacted(v) for v in options)
    return options


class RunOptions(BaseModel):
    """Where and how a job runs. Frozen: a job never changes how it runs half-way."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    executor: Literal["ray", "local"] = "ray"
    ray_address: str | None = None
    num_workers: int | None = Field(default=None, ge=1)
    num_gpus: float = Field(default=0.0, ge=0.0)
    max_in_flight: int | None = Field(default=None, ge=1)
    storage_options: dict[str, Any] = Field(default_factory=dict, repr=False)
    show_progress: bool = True

    @field_serializer("storage_options")
    def _redact_storage_options(self, value: dict[str, Any]) -> dict[str, Any]:
        return redacted(value)

    def __repr_args__(self):  # type: ignore[no-untyped-def]
        yield from super().__repr_args__()
        yield "storage_options", redacted(self.storage_options)

    @property
    def uses_gpu(self) -> bool:
        return self.num_gpus > 0
