"""Stop the local Ray a driver started when the driver dies, SIGKILL included.

Ray ties most of a local head to the driver that started it (GCS, raylet,
monitor and dashboard get ``PR_SET_PDEATHSIG``; workers follow their raylet),
but not the raylet's two agents (``ray::DashboardAgent``,
``ray::RuntimeEnvAgent``): they see the raylet die within a second, then try
to report it to a GCS that died too and give up only after a timeout that Ray
hard-codes to 60 s (``publish_error_to_driver``), measured here as 61 s with
Ray 2.60, also with a shorter ``gcs_rpc_server_reconnect_timeout_s``. A driver killed in a loop would
pile them up.

:func:`start_reaper` starts, before ``ray.init``, a small watcher process in a
session of its own (a signal to the driver's process group does not reach
it). It holds the read end of a pipe whose only write end the driver holds:
when the driver exits, however it exits, the kernel closes that end and the
watcher's read returns at once. Until then the watcher records, once a second,
the Ray processes below the driver (the agents start a moment after
``ray.init`` returns); then it stops those still running (SIGTERM, SIGKILL
after :data:`GRACE_S`) and exits. :meth:`Reaper.close` (after
``ray.shutdown()``) first writes one byte, which tells the watcher that the
driver lives on and it is to exit stopping nothing: the same process may run
other Rays (a ``ray.cluster_utils.Cluster``, a later executor's) that are not
this watcher's to stop while their driver lives.

This file runs as a script (``python ray_reaper.py DRIVER_PID FD``): it
imports only the standard library and psutil, not the package (torch).
A process forked from the driver without exec (not Ray's: Ray execs its
processes, which closes the pipe) keeps the watcher waiting until it exits too.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

# How often the watcher looks for new Ray processes below the driver.
SCAN_S = 1.0
# How long a process gets to exit after SIGTERM before it is killed.
GRACE_S = 2.0
# What the driver writes on a normal close; EOF without it means the driver died.
DONE = b"q"


@dataclass
class Reaper:
    """The driver's side: the pipe's write end and the watcher process."""

    write_fd: int
    process: subprocess.Popen

    def close(self, timeout_s: float = 10.0) -> None:
        """End the watcher without stopping anything (the driver lives on; call after ``ray.shutdown()``)."""
        if self.write_fd >= 0:
            os.write(self.write_fd, DONE)
            os.close(self.write_fd)
            self.write_fd = -1
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass  # it ends by itself once the leftovers are stopped; never block the driver on it


def start_reaper() -> Reaper:
    """Start the watcher of this process (see the module docstring)."""
    read_fd, write_fd = os.pipe()  # both not inheritable: no child but the watcher (pass_fds) gets one
    try:
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(os.getpid()), str(read_fd)],
                                pass_fds=(read_fd,), start_new_session=True, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except BaseException:
        os.close(write_fd)
        raise
    finally:
        os.close(read_fd)
    return Reaper(write_fd, proc)


def _is_ray(proc: Any) -> bool:
    name = proc.name()
    return name.startswith("ray::") or name in ("raylet", "gcs_server") or any("/ray/" in a for a in proc.cmdline())


def _ray_below(driver: Any, me: int) -> dict[int, Any]:
    import psutil

    found: dict[int, Any] = {}
    for child in driver.children(recursive=True):
        try:
            if child.pid != me and _is_ray(child):
                found[child.pid] = child
        except psutil.Error:
            continue  # exited while being looked at
    return found


def _stop(procs: list[Any]) -> None:
    import psutil

    alive = [p for p in procs if p.is_running()]  # is_running compares the start time: a reused pid is not ours
    for p in alive:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, left = psutil.wait_procs(alive, timeout=GRACE_S)
    for p in left:
        try:
            p.kill()
        except psutil.Error:
            pass


def _watch(driver_pid: int, read_fd: int) -> None:
    import psutil

    seen: dict[int, Any] = {}
    try:
        driver = psutil.Process(driver_pid)
    except psutil.NoSuchProcess:
        return
    while True:
        ready, _, _ = select.select([read_fd], [], [], SCAN_S)
        if ready:
            if os.read(read_fd, 1) == DONE:
                return  # a normal close: the driver lives, and so may other Rays below it
            break  # EOF: the driver died
        try:
            seen.update(_ray_below(driver, os.getpid()))
        except psutil.NoSuchProcess:
            break
    for p in list(seen.values()):
        try:
            seen.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.Error:
            continue
    _stop(list(seen.values()))


if __name__ == "__main__":
    _watch(int(sys.argv[1]), int(sys.argv[2]))
