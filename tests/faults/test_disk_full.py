"""The output's disk fills up mid-build (a real tmpfs, smaller than the artifact set): one `error:` naming the file
and "no space left", exit 2, no manifest and no temporary file; with room again, the rerun reuses the parts written
before and ends with the clean run's bytes. (Mid-reconstruct: tests/test_faults_translation.py::
test_reconstruct_into_a_full_disk.)"""

from __future__ import annotations

import re
import subprocess

import pytest

from faults.kit import CLI, EVENT_S, assert_clear_error, build_args, parts_of, remount, tmpfs


@pytest.mark.slow
def test_disk_full_mid_build_then_rerun_with_room(zoo, clean, tmp_path):
    total = sum(p.stat().st_size for p in clean.rglob("*") if p.is_file())
    with tmpfs(tmp_path / "disk", f"{total // 3 // 4096 * 4096}") as disk:  # a third of the set fits
        out = disk / "switches"
        cmd = [*CLI, *build_args(zoo, out, "--executor", "local")]
        full = subprocess.run(cmd, capture_output=True, text=True, timeout=EVENT_S)
        assert_clear_error(full, str(out), "no space left", "Nothing was committed")
        assert not (out / "manifest.json").exists()
        assert not [p for p in out.rglob("*") if ".tmp-" in p.name or ".new-" in p.name]
        staged = list(out.rglob("part-*.parquet.sha256"))
        assert staged  # it failed mid-build, not before
        remount(disk, f"size={4 * total}")
        rerun = subprocess.run([c for c in cmd if c != "--quiet"], capture_output=True, text=True, timeout=EVENT_S)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        # "tasks computed / reused  T / 0 (parts C / R)": the (task, shard) parts staged before the disk filled are reused
        assert re.search(rf"\(parts \d+ / {len(staged)}\)", " ".join(rerun.stdout.split())), rerun.stdout
        assert parts_of(out) == parts_of(clean)
