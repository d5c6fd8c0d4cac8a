"""What the libraries underneath print on their own: hidden from users unless they ask (``--verbose``).

Ray's driver logs "Started a local Ray instance" (INFO) and, on every local
start, a notice that token authentication is enabled (a WARNING from
``ray._private.authentication``); MLflow logs its database migrations at
INFO ("Creating initial MLflow database tables..."). None of it is about the
user's job. Both libraries read their level from the environment when they
are imported (``RAY_LOGGER_LEVEL``, ``MLFLOW_LOGGING_LEVEL``), so the
defaults are set there — never over a value the user set — and the one
token notice is dropped by a filter on its own logger. Ray's other warnings,
including the one that token authentication is *disabled*, still show.
"""

from __future__ import annotations

import logging
import os
import sys

RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
RAY_AUTH_NOTICE = "Token authentication is enabled for this Ray cluster"


class _DropNotice(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def quiet_library_logs(verbose: bool) -> None:
    """Hide Ray's start-up chatter and MLflow's INFO lines (``verbose``: leave every library as it is)."""
    if verbose:
        return
    os.environ.setdefault("RAY_LOGGER_LEVEL", "warning")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    auth = logging.getLogger(RAY_AUTH_LOGGER)
    if not any(isinstance(f, _DropNotice) for f in auth.filters):
        auth.addFilter(_DropNotice(RAY_AUTH_NOTICE))
    if "mlflow" in sys.modules:  # imported already: its level was read from the environment
        logging.getLogger("mlflow").setLevel(logging.WARNING)
