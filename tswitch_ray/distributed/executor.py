"""Run shard functions locally or on Ray, with bounded in-flight work and progress.

The driver only ever holds small results (statistics, part descriptors); the
tensors stay inside the tasks. Both executors call the very same shard
function, so the Ray path produces the same bytes as the local one.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from tswitch_ray.distributed.ray_reaper import Reaper, start_reaper
from tswitch_ray.errors import ServiceError, TSwitchError
from tswitch_ray.options import RunOptions, redact_uri

# How long map() waits for the tasks it cancelled (after an error) to end.
CANCEL_WAIT_S = 30.0


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, not minutes: ray.init retries an unreachable GCS for a long time."""
    import socket

    hostport = address.split("://", 1)[-1]
    if hostport == "auto" or ":" not in hostport:
        return
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except (OSError, ValueError) as exc:
        raise ConnectionError(f"nothing answers at {host}:{port} ({exc})") from exc


@dataclass
class WorkItem:
    """One call of a shard function: its arguments, bytes it will read and memory it needs."""

    key: int
    args: tuple
    read_bytes: int = 0
    memory_bytes: int = 0


@dataclass
class ExecutorStats:
    """What a run did, for the summary."""

    items: int = 0
    bytes_read: int = 0
    seconds: float = 0.0
    peak_rss_by_worker: dict[str, int] = field(default_factory=dict)
    # Items re-run after their worker or node died (RayExecutor); 0 locally.
    retries: int = 0


def peak_rss_bytes() -> int:
    """Peak resident set of this process (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker_id() -> str:
    return f"{os.uname().nodename}:{os.getpid()}"


def _system_failures(ray: Any) -> tuple[type[BaseException], ...]:
    """What ``ray.get`` raises when a task's worker, raylet or node died, or its result was lost with the node.

    Out-of-memory kills are among them: Ray's memory monitor kills a worker to
    save its node, and with Ray retries off (see :class:`RayExecutor`) the
    item is re-run here like any other dead worker's.
    """
    exc = ray.exceptions
    return (exc.WorkerCrashedError, exc.NodeDiedError, exc.LocalRayletDiedError, exc.ObjectLostError,
            exc.OutOfMemoryError)


def _call(fn: Callable, args: tuple) -> tuple[Any, str, int]:
    result = fn(*args)
    return result, worker_id(), peak_rss_bytes()


class LocalExecutor:
    """Runs every item in this process, in order: the single-process reference path."""

    name = "local"

    def __init__(self) -> None:
        self.stats = ExecutorStats()

    def map(self, fn: Callable, items: Sequence[WorkItem], progress: Callable[[int], None] | None = None) -> Iterator[tuple[int, Any]]:
        t0 = time.perf_counter()
        for item in items:
            result, wid, rss = _call(fn, item.args)
            self._account(item, wid, rss, progress)
            yield item.key, result
        self.stats.seconds += time.perf_counter() - t0

    def _account(self, item: WorkItem, wid: str, rss: int, progress: Callable[[int], None] | None) -> None:
        self.stats.items += 1
        self.stats.bytes_read += item.read_bytes
        self.stats.peak_rss_by_worker[wid] = max(rss, self.stats.peak_rss_by_worker.get(wid, 0))
        if progress:
            progress(item.read_bytes)

    def close(self) -> None:
        pass


class RayExecutor(LocalExecutor):
    """Runs items as Ray tasks.

    * ``memory`` of each task is its estimated working set, so Ray never packs
      more tasks on a node than its memory allows;
    * at most ``max_in_flight`` tasks are submitted at once, so the object
      store never fills with pending results;
    * ``max_retries`` re-runs a task whose worker or node died, at most that
      many times per item; each re-run is counted in ``stats.retries``.
      User errors are not retried and surface as ``TSwitchError``.

    Ray's own ``max_retries`` would re-run a dead task invisibly to the
    driver (Ray exposes no attempt number to count). So tasks are submitted
    with Ray ``max_retries=0`` and this executor resubmits an item whose
    ``ray.get`` reports a system failure (:func:`_system_failures`). With
    zero Ray retries Ray also cannot rebuild a lost return object by
    lineage; none is needed, as each result is fetched as soon as it is
    ready and shard functions are idempotent (a re-run writes the same part).
    """

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        num_cpus: int | None = None,
        num_gpus_per_task: float = 0.0,
        max_in_flight: int | None = None,
        max_retries: int = 3,
    ) -> None:
        super().__init__()
        import ray

        self._ray = ray
        self._owns_ray = False
        self._reaper: Reaper | None = None
        if not ray.is_initialized():
            try:
                if address:
                    _check_reachable(address)
                    ray.init(address=address, log_to_driver=False, include_dashboard=False)
                else:
                    # A local Ray is this process's: stopped with it, even when it is SIGKILLed (ray_reaper.py).
                    self._reaper = start_reaper()
                    ray.init(num_cpus=num_cpus, log_to_driver=False, include_dashboard=False)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                self._close_reaper()
                where = redact_uri(address) if address else "a new local instance"
                raise ServiceError(
                    f"Cannot connect to the Ray cluster at {where}: {exc}. "
                    "Check that `ray start --head` is running there and that the address (host:port of the GCS, "
                    "or 'auto') is right, or leave the Ray address unset to start a local Ray."
                ) from exc
            self._owns_ray = True
        self.num_gpus_per_task = num_gpus_per_task
        self.max_retries = max_retries
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.max_in_flight = max_in_flight or max(2, 2 * cpus)
        self._remote = ray.remote(_call)

    def map(self, fn: Callable, items: Sequence[WorkItem], progress: Callable[[int], None] | None = None) -> Iterator[tuple[int, Any]]:
        ray = self._ray
        t0 = time.perf_counter()
        fn_ref = ray.put(fn)
        failures = _system_failures(ray)
        pending: dict[Any, tuple[WorkItem, int]] = {}  # ref -> (item, retries so far)
        queue = [(item, 0) for item in reversed(items)]  # pop() takes the next item
        try:
            while queue or pending:
                while queue and len(pending) < self.max_in_flight:
                    item, retried = queue.pop()
                    pending[self._submit(fn_ref, item)] = (item, retried)
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    item, retried = pending.pop(ref)
                    try:
                        result, wid, rss = self._get(ref)
                    except failures:
                        if retried >= self.max_retries:
                            raise
                        self.stats.retries += 1
                        queue.append((item, retried + 1))  # first in line, before items never tried
                        continue
                    self._account(item, wid, rss, progress)
                    yield item.key, result
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
            if pending:
                # Cancelling is asynchronous: wait (bounded) until the cancelled tasks have ended, so that none
                # still writes while the caller cleans up after the error (e.g. removes a build's staging).
                ray.wait(list(pending), num_returns=len(pending), timeout=CANCEL_WAIT_S)
            self.stats.seconds += time.perf_counter() - t0

    def _submit(self, fn_ref: Any, item: WorkItem) -> Any:
        # Ray's retries off: map() retries and counts (see the class docstring).
        opts: dict[str, Any] = {"max_retries": 0, "num_cpus": 1}
        if item.memory_bytes:
            opts["memory"] = int(item.memory_bytes)
        if self.num_gpus_per_task:
            opts["num_gpus"] = self.num_gpus_per_task
        return self._remote.options(**opts).remote(fn_ref, item.args)

    def _get(self, ref: Any) -> Any:
        ray = self._ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            # Imported here: io/ imports torch, which the executor module itself need not.
            from tswitch_ray.io.faults import user_error_of

            # A worker's user error or storage fault surfaces as itself, translated by io/faults.py.
            user = user_error_of(exc)
            if isinstance(user, TSwitchError):
                raise user from None
            raise

    def close(self) -> None:
        if self._owns_ray:
            self._ray.shutdown()
        self._close_reaper()

    def _close_reaper(self) -> None:
        if self._reaper is not None:
            self._reaper.close()
            self._reaper = None


def make_executor(run: RunOptions) -> LocalExecutor:
    """The executor ``run`` asks for: "local" (single process, no Ray) or "ray" (``run.ray_address``, else a
    local Ray of ``run.num_workers`` CPUs; ``run.num_gpus`` per task, at most ``run.max_in_flight`` at once)."""
    if run.executor == "local":
        return LocalExecutor()
    return RayExecutor(address=run.ray_address, num_cpus=run.num_workers, num_gpus_per_task=run.num_gpus,
                       max_in_flight=run.max_in_flight)
