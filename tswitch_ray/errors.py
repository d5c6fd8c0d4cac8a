"""User-facing errors.

Every error a user can cause (bad input, bad config, unreachable service) is a
``TSwitchError`` whose message is one paragraph naming the file, tensor and
cause. The CLI prints it without a traceback and exits with code 2; any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class TSwitchError(Exception):
    """Base class of all user errors."""

    exit_code = 2


class ZooError(TSwitchError):
    """A zoo manifest or checkpoint is missing, malformed or inconsistent."""


class ArtifactError(TSwitchError):
    """Artifacts are missing, uncommitted, corrupt or built for another base."""


class ConfigError(TSwitchError):
    """An option or config file is invalid."""


class ServiceError(TSwitchError):
    """Ray, the object store or the tracking server cannot be reached."""


class StorageError(TSwitchError):
    """A file system or object store refused or failed a read or write: no space, denied, a symlink loop,
    an unknown URI scheme (see tswitch_ray/io/faults.py, the one place that makes these)."""
