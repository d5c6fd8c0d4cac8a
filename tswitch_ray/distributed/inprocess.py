"""Executor ``"auto"``: small jobs run in this process, larger ones on Ray, a running Ray is always used.

Starting a local Ray costs 6-25 s on this project's machines, most of the wall
time of a job on a zoo of a few MB. ``"auto"`` (the CLI's default for
``build`` and ``merge``) therefore picks, in this order:

1. Ray, when there is one to attach to: ``run.ray_address``, the
   ``RAY_ADDRESS`` environment variable, or a Ray already initialised in
   this process;
2. in-process (:class:`~tswitch_ray.distributed.executor.LocalExecutor`,
   the same shard functions, hence the same bytes and the same errors),
   when the job reads less than :data:`SMALL_JOB_BYTES` and asks for no GPU;
3. a local Ray otherwise.

The choice is said on stderr (unless progress is off), with how to override it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from tswitch_ray.options import RunOptions

# Below this many bytes read (every checkpoint of the zoo once) a job runs in-process.
SMALL_JOB_BYTES = 256 * 2**20


def _ray_running() -> bool:
    if "ray" not in sys.modules:  # never import Ray just to ask
        return False
    import ray

    return bool(ray.is_initialized())


def resolve_executor(run: RunOptions, job_bytes: int) -> tuple[str, str | None]:
    """The executor ``"auto"`` resolves to for a job reading ``job_bytes``, and the line that says so (or None)."""
    if run.executor != "auto":
        return run.executor, None
    if run.ray_address or os.environ.get("RAY_ADDRESS") or _ray_running():
        return "ray", None
    if job_bytes < SMALL_JOB_BYTES and not run.uses_gpu:
        return "local", (f"small job ({job_bytes / 1e6:.1f} MB): running in-process; "
                         "--executor ray to force Ray")
    return "ray", None


def resolved_run(run: RunOptions, job_bytes: int, say: Callable[[str], None] | None = None) -> RunOptions:
    """``run`` with executor "auto" resolved for a job reading ``job_bytes`` (see the module docstring), for
    :func:`~tswitch_ray.distributed.executor.make_executor`; ``say`` gets the choice's line (default: stderr)."""
    name, line = resolve_executor(run, job_bytes)
    if line and run.show_progress:
        (say or (lambda msg: print(msg, file=sys.stderr, flush=True)))(line)
    return run if name == run.executor else run.model_copy(update={"executor": name})
