"""Waiting for events, not for wall-clock time: a bounded wait, and a gate for shard functions.

Not a test module: tests and conftest import it (pytest puts tests/ on
``sys.path``), the gated CLI (tests/gated_cli.py) too. Ray workers do not have
it on their path, so :func:`gated` registers this module to travel by value
with the functions it wraps.
"""

from __future__ import annotations

import functools
import json
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any


def wait_until(condition: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.02) -> Any:
    """``condition()``'s first truthy value, polled every ``interval_s``; TimeoutError naming ``what`` past ``timeout_s``.

    The deadline bounds a wait for an event (a file appearing, a server
    answering, a process ending); the interval is not a wait for anything.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:.0f} s for {what}")
        time.sleep(interval_s)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie, dead but not yet reaped, does not)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class ShardGate:
    """Holds calls of a shard function, in whichever process runs them, until the test opens or aborts the gate.

    Each call first records that it started (``started()``: its shard id, pid
    and Ray node id). The first ``free`` calls to start then run at once
    (first by start, not by shard id: Ray does not start tasks in submission
    order); every other call waits for ``open()`` (then runs) or ``abort()``
    (then raises without running). The gate lives in a folder, so it works
    across processes and Ray nodes on this machine. A held call that sees
    neither within ``hold_s`` raises too: a gate never runs anything late.
    """

    def __init__(self, root: str | Path, free: int = 0, hold_s: float = 900.0) -> None:
        self.root = str(root)
        self.free = free
        self.hold_s = hold_s
        Path(self.root, "started").mkdir(parents=True, exist_ok=True)

    def open(self) -> None:
        Path(self.root, "open").touch()

    def abort(self) -> None:
        Path(self.root, "abort").touch()

    def started(self) -> list[dict[str, Any]]:
        """One record per call that has started, in no particular order."""
        return [json.loads(p.read_text()) for p in Path(self.root, "started").glob("*.json")]

    def wrap(self, fn: Callable, key: Callable[..., Any] | None = None) -> Callable:
        """``fn(ctx, shard, *rest)``, gated; picklable to Ray workers that cannot import this module.

        ``key(shard, *rest)`` names a call in :meth:`started` (default: ``shard.shard_id``; see :func:`arg_key`).
        """
        _travel_by_value()
        return functools.partial(_gated_call, self, fn, key)


def arg_key(n: int) -> Callable[..., Any]:
    """A ``key`` for :meth:`ShardGate.wrap`: the call's ``n``-th argument after ``ctx`` (0 is the shard's)."""
    return functools.partial(_nth, n)


def _nth(n: int, *args: Any) -> Any:
    return args[n]


def _gated_call(gate: ShardGate, fn: Callable, key: Callable[..., Any] | None, ctx: Any, shard: Any,
                *rest: Any) -> Any:
    _record_start(gate, key(shard, *rest) if key is not None else shard.shard_id)
    if not _claim_free_pass(gate):
        root = Path(gate.root)
        wait_until(lambda: (root / "open").exists() or (root / "abort").exists(), gate.hold_s,
                   f"the gate {gate.root} to open")
        if (root / "abort").exists():
            raise RuntimeError(f"the test aborted the gate {gate.root}")
    return fn(ctx, shard, *rest)


def _claim_free_pass(gate: ShardGate) -> bool:
    """Take one of the gate's ``free`` passes, if one is left (O_EXCL: one taker per pass, across processes)."""
    for n in range(gate.free):
        try:
            os.close(os.open(Path(gate.root, f"pass-{n}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return True
        except FileExistsError:
            continue
    return False


def _record_start(gate: ShardGate, shard_id: Any) -> None:
    node = None
    try:
        import ray

        if ray.is_initialized():
            node = ray.get_runtime_context().get_node_id()
    except ImportError:
        pass
    record = {"shard": shard_id, "pid": os.getpid(), "node": node}
    final = Path(gate.root, "started", f"{shard_id}-{uuid.uuid4().hex}.json")
    tmp = final.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, final)  # a reader sees a whole record or none


def _travel_by_value() -> None:
    import sys

    try:
        from ray import cloudpickle
    except ImportError:  # no Ray: only this process runs the gated function
        return
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
