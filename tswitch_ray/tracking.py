"""MLflow tracking: one parent run per evaluation, one nested run per method.

The tracking URI defaults to a local store: a folder (``./mlruns``) holding a
SQLite database ``mlflow.db`` and an ``artifacts/`` folder (MLflow 3 retired
the plain file store). Any MLflow URI works too (``http://host:5000``,
``sqlite:///...``, ``databricks``). A remote server is checked *before* any work starts, so an
unreachable server fails in seconds instead of after hours of evaluation.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, field_serializer

from tswitch_ray.errors import ServiceError
from tswitch_ray.options import redact_uri

DEFAULT_EXPERIMENT = "tswitch"


class TrackingConfig(BaseModel):
    """Where results are logged. ``uri=None`` means ``$MLFLOW_TRACKING_URI`` or ``./mlruns``."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    uri: str | None = None
    experiment: str = DEFAULT_EXPERIMENT
    connect_timeout_s: float = 10.0

    @field_serializer("uri")
    def _redact_uri(self, value: str | None) -> str | None:
        # A server URI may carry basic-auth credentials (https://user:password@host); dumps (config.json) never do.
        return None if value is None else redact_uri(value)

    def local_dir(self) -> Path | None:
        """The folder of a local store (a plain path), else None."""
        uri = self.uri or os.environ.get("MLFLOW_TRACKING_URI") or "./mlruns"
        if ":" in uri.split("/", 1)[0] or uri.startswith("databricks"):
            return Path(uri[len("file://"):]).resolve() if uri.startswith("file://") else None
        return Path(uri).resolve()

    def resolved_uri(self) -> str:
        local = self.local_dir()
        if local is not None:
            return f"sqlite:///{local / 'mlflow.db'}"
        return self.uri or os.environ["MLFLOW_TRACKING_URI"]


def _is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def check_tracking(cfg: TrackingConfig) -> str:
    """Resolve the tracking URI and, for a server, prove it answers; ``ServiceError`` otherwise."""
    uri = cfg.resolved_uri()
    if not cfg.enabled or not _is_remote(uri):
        return uri
    import requests

    try:
        resp = requests.get(f"{uri.rstrip('/')}/health", timeout=cfg.connect_timeout_s)
        resp.raise_for_status()
    except requests.RequestException as exc:
        raise ServiceError(
            f"The MLflow tracking server at {redact_uri(uri)} does not answer ({type(exc).__name__}: "
            f"{redact_uri(str(exc))}). Nothing was evaluated. Start it, fix the tracking URI (the config's "
            "`tracking.uri`, or MLFLOW_TRACKING_URI), or turn tracking off (`tracking.enabled: false`)."
        ) from exc
    return uri


def _param(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text[:6000]  # MLflow's limit on a param value


class Tracker:
    """A thin wrapper so the runner never imports mlflow when tracking is off."""

    def __init__(self, cfg: TrackingConfig) -> None:
        self.cfg = cfg
        self.uri = check_tracking(cfg)
        self.parent_run_id: str | None = None
        if cfg.enabled:
            import mlflow

            self._mlflow = mlflow
            local = cfg.local_dir()
            try:
                mlflow.set_tracking_uri(self.uri)
                if local is not None:
                    local.mkdir(parents=True, exist_ok=True)
                    if mlflow.get_experiment_by_name(cfg.experiment) is None:
                        mlflow.create_experiment(cfg.experiment, artifact_location=(local / "artifacts").as_uri())
                mlflow.set_experiment(cfg.experiment)
            except Exception as exc:  # noqa: BLE001 - mlflow raises many types; all mean "cannot track here"
                raise ServiceError(f"Cannot use the MLflow tracking store {redact_uri(self.uri)}: "
                                   f"{redact_uri(str(exc))}") from exc

    @contextmanager
    def evaluation(self, name: str, params: Mapping[str, Any]) -> Iterator[Tracker]:
        if not self.cfg.enabled:
            yield self
            return
        with self._mlflow.start_run(run_name=name) as run:
            self.parent_run_id = run.info.run_id
            self._mlflow.log_params({k: _param(v) for k, v in params.items()})
            yield self

    def log_method(self, label: str, params: Mapping[str, Any], metrics: Mapping[str, float]) -> str | None:
        """A nested run for one method: its params (method, options, α, k) and metrics."""
        if not self.cfg.enabled:
            return None
        with self._mlflow.start_run(run_name=label, nested=True) as run:
            self._mlflow.log_params({k: _param(v) for k, v in params.items()})
            self._mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)})
            return run.info.run_id

    def log_summary(self, metrics: Mapping[str, float], files: Mapping[str, bytes]) -> None:
        """Metrics and files (results CSV/Markdown, plot, config) on the parent run."""
        if not self.cfg.enabled:
            return
        self._mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)})
        with tempfile.TemporaryDirectory() as tmp:
            for name, data in files.items():
                (Path(tmp) / name).write_bytes(data)
            self._mlflow.log_artifacts(tmp)
