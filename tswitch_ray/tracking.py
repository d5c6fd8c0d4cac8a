"""MLflow tracking: one parent run per evaluation, one nested run per method.

The tracking URI defaults to a local store: a folder (``./mlruns``) holding a
SQLite database ``mlflow.db`` and an ``artifacts/`` folder (MLflow 3 retired
the plain file store). Any MLflow URI works too (``http://host:5000``,
``sqlite:///...``, ``databricks``). A remote server is checked *before* any work starts, so an
unreachable server fails in seconds instead of after hours of evaluation.
"""

from __future__ import annotations

import contextlib
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


# MLflow retries a failing request 7 times with a backoff factor of 2 and waits 120 s for an answer: a
# server that dies mid-eval kept `tswitch eval` retrying for ~260 s. These bounds give a total deadline of
# (retries + 1) x timeout + the backoff sleeps (urllib3: 0, 1x, 2x, ... the factor, each + up to 1 s jitter).
HTTP_MAX_RETRIES = 2
HTTP_BACKOFF_FACTOR = 1
HTTP_TIMEOUT_S = 10
HTTP_DEADLINE_S = (HTTP_MAX_RETRIES + 1) * HTTP_TIMEOUT_S + sum(
    (HTTP_BACKOFF_FACTOR * 2 ** (i - 1) if i else 0) + 1 for i in range(HTTP_MAX_RETRIES))
_HTTP_BOUNDS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": HTTP_MAX_RETRIES,
                "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": HTTP_BACKOFF_FACTOR,
                "MLFLOW_HTTP_REQUEST_TIMEOUT": HTTP_TIMEOUT_S}


@contextmanager
def _bounded_http() -> Iterator[None]:
    """MLflow's HTTP retry bounds for the block (MLflow reads them per request), unless the user set them."""
    added = [k for k in _HTTP_BOUNDS if k not in os.environ]
    for k in added:
        os.environ[k] = str(_HTTP_BOUNDS[k])
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _param(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text[:6000]  # MLflow's limit on a param value


class Tracker:
    """A thin wrapper so the runner never imports mlflow when tracking is off."""

    def __init__(self, cfg: TrackingConfig, results_uri: str | None = None) -> None:
        """``results_uri``: where the evaluation writes its results, named by the error when tracking fails."""
        self.cfg = cfg
        self.results_uri = results_uri
        self.uri = check_tracking(cfg)
        self.parent_run_id: str | None = None
        if cfg.enabled:
            import mlflow

            self._mlflow = mlflow
            local = cfg.local_dir()
            try:
                with _bounded_http():
                    self._open_experiment(local)
            except Exception as exc:  # noqa: BLE001 - mlflow raises many types; all mean "cannot track here"
                raise ServiceError(f"Cannot use the MLflow tracking store {redact_uri(self.uri)}: "
                                   f"{redact_uri(str(exc))}") from exc

    def _open_experiment(self, local: Path | None) -> None:
        mlflow, cfg = self._mlflow, self.cfg
        mlflow.set_tracking_uri(self.uri)
        if local is not None:
            local.mkdir(parents=True, exist_ok=True)
            if mlflow.get_experiment_by_name(cfg.experiment) is None:
                mlflow.create_experiment(cfg.experiment, artifact_location=(local / "artifacts").as_uri())
        mlflow.set_experiment(cfg.experiment)

    @contextmanager
    def _tracking_call(self) -> Iterator[None]:
        """MLflow calls with a bounded deadline; a failure is a ``ServiceError`` saying where the results are."""
        try:
            with _bounded_http():
                yield
        except ServiceError:
            raise
        except Exception as exc:  # noqa: BLE001 - mlflow raises many types; all mean "the store failed"
            where = (f"The results are already written to {self.results_uri}; only the MLflow logging is missing."
                     if self.results_uri else "Results written before this point are kept.")
            raise ServiceError(
                f"The MLflow tracking store {self.uri} failed ({type(exc).__name__}: {_first_line(exc)}); "
                f"gave up after {HTTP_MAX_RETRIES} retries (deadline about {HTTP_DEADLINE_S} s per request). "
                f"{where} Restart the server and rerun (finished cells are reused), or turn tracking off (`tracking.enabled: false`; `--no-tracking` on the command line)."
            ) from None

    @contextmanager
    def evaluation(self, name: str, params: Mapping[str, Any]) -> Iterator[Tracker]:
        if not self.cfg.enabled:
            yield self
            return
        with self._tracking_call():
            run = self._mlflow.start_run(run_name=name)
            self.parent_run_id = run.info.run_id
            self._mlflow.log_params({k: _param(v) for k, v in params.items()})
        try:
            yield self
        except BaseException:
            with self._tracking_call(), contextlib.suppress(Exception):
                self._mlflow.end_run("FAILED")
            raise
        with self._tracking_call():
            self._mlflow.end_run()

    def log_method(self, label: str, params: Mapping[str, Any], metrics: Mapping[str, float]) -> str | None:
        """A nested run for one method: its params (method, options, α, k) and metrics."""
        if not self.cfg.enabled:
            return None
        with self._tracking_call(), self._mlflow.start_run(run_name=label, nested=True) as run:
            self._mlflow.log_params({k: _param(v) for k, v in params.items()})
            self._mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)})
            return run.info.run_id

    def log_summary(self, metrics: Mapping[str, float], files: Mapping[str, bytes]) -> None:
        """Metrics and files (results CSV/Markdown, plot, config) on the parent run."""
        if not self.cfg.enabled:
            return
        with self._tracking_call():
            self._mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)})
            with tempfile.TemporaryDirectory() as tmp:
                for name, data in files.items():
                    (Path(tmp) / name).write_bytes(data)
                self._mlflow.log_artifacts(tmp)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else "no message"
