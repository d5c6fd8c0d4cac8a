"""A rich progress bar over shards: bytes done, rate, ETA, current phase."""

from __future__ import annotations

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


class ShardProgress:
    """Context manager; ``advance(nbytes)`` after each shard, ``set_phase(name)`` between passes."""

    def __init__(self, total_bytes: int, enabled: bool = True, description: str = "build") -> None:
        self.enabled = enabled
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
        self._progress.update(self._task, description=f"{self._desc}: {phase}")

    def advance(self, nbytes: int) -> None:
        self._progress.advance(self._task, nbytes)
