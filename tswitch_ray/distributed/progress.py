"""A rich progress bar over shards (bytes done, rate, ETA, current phase) and the wall time of each phase."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType

from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)


@dataclass
class PhaseTimer:
    """Wall seconds of each phase of a run, in the order the phases began (the run summary's breakdown).

    ``start(name)`` ends the running phase and begins ``name``; a phase that
    runs again adds to its earlier time.
    """

    seconds: dict[str, float] = field(default_factory=dict)
    clock: Callable[[], float] = field(default=time.perf_counter, repr=False)
    _running: str | None = None
    _since: float = 0.0

    def start(self, name: str) -> None:
        now = self.clock()
        self._end(now)
        self._running, self._since = name, now
        self.seconds.setdefault(name, 0.0)

    def stop(self) -> None:
        self._end(self.clock())
        self._running = None

    def _end(self, now: float) -> None:
        if self._running is not None:
            self.seconds[self._running] += now - self._since


class ShardProgress:
    """Context manager; ``advance(nbytes)`` after each shard, ``set_phase(name)`` between passes.

    With a ``timer``, ``set_phase`` also starts that phase's clock.
    """

    def __init__(self, total_bytes: int, enabled: bool = True, description: str = "build",
                 timer: PhaseTimer | None = None) -> None:
        self.enabled = enabled
        self.timer = timer
        self._desc = description
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            disable=not enabled,
            transient=False,
        )
        self._task = self._progress.add_task(description, total=max(total_bytes, 1))

    def __enter__(self) -> "ShardProgress":
        self._progress.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._progress.stop()

    def set_phase(self, phase: str) -> None:
        if self.timer is not None:
            self.timer.start(phase)
        self._progress.update(self._task, description=f"{self._desc}: {phase}")

    def advance(self, nbytes: int) -> None:
        self._progress.advance(self._task, nbytes)
