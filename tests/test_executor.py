"""The Ray executor re-runs an item whose worker died, counts it in its stats, and never retries user errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import ray

from tswitch_ray.distributed.executor import LocalExecutor, RayExecutor, WorkItem
from tswitch_ray.errors import ConfigError


def _dying_worker(folder: Path, crashes: int):
    """A shard function whose worker process dies (as on a killed node) the first ``crashes`` times it runs a key."""

    def run(key: int) -> int:
        for n in range(crashes):
            mark = folder / f"{key}-{n}"
            if not mark.exists():
                mark.touch()
                os._exit(1)
        return key * key

    return run  # a closure: Ray ships it by value (the workers cannot import this test module)


def test_an_item_whose_worker_died_is_rerun_and_counted(ray_local, tmp_path):
    executor = RayExecutor(max_in_flight=2)
    items = [WorkItem(k, (k,)) for k in range(4)]
    got = dict(executor.map(_dying_worker(tmp_path, crashes=1), items))
    assert got == {k: k * k for k in range(4)}
    assert executor.stats.retries == 4 and executor.stats.items == 4
    executor.close()
    assert ray.is_initialized()  # attached to the session's Ray: closing did not shut it down


def test_retries_are_bounded(ray_local, tmp_path):
    executor = RayExecutor(max_in_flight=1, max_retries=2)
    with pytest.raises(ray.exceptions.WorkerCrashedError):
        list(executor.map(_dying_worker(tmp_path, crashes=3), [WorkItem(0, (0,))]))
    assert executor.stats.retries == 2


def _bad_input():
    def run(key: int) -> int:
        raise ConfigError(f"bad item {key}")

    return run


def test_user_errors_are_not_retried(ray_local):
    executor = RayExecutor()
    with pytest.raises(ConfigError, match="bad item 0"):
        list(executor.map(_bad_input(), [WorkItem(0, (0,))]))
    assert executor.stats.retries == 0


def test_the_local_executor_counts_no_retries():
    executor = LocalExecutor()
    assert dict(executor.map(lambda k: -k, [WorkItem(1, (1,)), WorkItem(2, (2,))])) == {1: -1, 2: -2}
    assert executor.stats.retries == 0 and executor.stats.items == 2
