"""Two builds to one --out: the one that commits first wins; the other stops at its next part, removes its staging
and says so (exit 2); nothing of it is visible. Exclusive creation of the manifest decides a tie."""

from __future__ import annotations

import subprocess

import pytest
from events import ShardGate

from faults.kit import CLI, EVENT_S, GATED_CLI, assert_clear_error, build_args, manifest_of, parts_of, wait_for
from tswitch_ray.io.fs import open_fs
from tswitch_ray.io.sink import create_exclusive_fs


@pytest.mark.slow
def test_the_build_that_loses_the_commit_race_stops_early_and_leaves_nothing(zoo, clean, tmp_path):
    out = tmp_path / "switches"
    # The loser: other options (α 0.7), so another run key. Its first shard runs, the others are held.
    gate = ShardGate(tmp_path / "gate", free=1)
    loser_cmd = ["build", "--zoo", str(zoo), "--out", str(out), "--alpha", "0.7", "--shard-mb", "1", "--quiet",
                 "--executor", "local"]
    loser = subprocess.Popen([*GATED_CLI, gate.root, "1", *loser_cmd], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        wait_for(loser, lambda: list(out.rglob("part-*.parquet.sha256")), "the loser's first staged part")
        wait_for(loser, lambda: len(gate.started()) > 1, "the loser's next shard to start")
        loser_dirs = {p.name for p in (out / "parts").iterdir()}  # one folder per task key
        assert loser_dirs
        # The winner commits while the loser is mid-build.
        winner = subprocess.run([*CLI, *build_args(zoo, out, "--executor", "local")], capture_output=True,
                                text=True, timeout=EVENT_S)
        assert winner.returncode == 0, winner.stderr[-3000:]
        gate.open()
        stdout, stderr = loser.communicate(timeout=EVENT_S)
    finally:
        gate.abort()
        loser.kill()
    flat = assert_clear_error(subprocess.CompletedProcess(loser.args, loser.returncode, stdout, stderr),
                              str(out), "while this one ran", "lost the race", "--overwrite")
    # It stopped at the part after the winner's commit instead of encoding all of them.
    n_shards = manifest_of(clean)["extra"]["shards"]
    assert len(gate.started()) == 2 < n_shards, flat
    # Nothing of the loser is left; the winner's set is the clean one.
    assert sorted(p.name for p in (out / "parts").iterdir()) == sorted(p.name for p in (clean / "parts").iterdir())
    assert parts_of(out) == parts_of(clean)
    assert manifest_of(out) == {**manifest_of(clean), "zoo": manifest_of(out)["zoo"]}
    # A rerun of the loser that means to replace the set completes.
    again = subprocess.run([*CLI, *loser_cmd, "--overwrite"], capture_output=True, text=True, timeout=EVENT_S)
    assert again.returncode == 0, again.stderr[-3000:]
    assert manifest_of(out)["alphas"] == [0.7]
    assert {p.name for p in (out / "parts").iterdir()} == loser_dirs


def test_exclusive_creation_lets_exactly_one_writer_win(tmp_path):
    fs, root = open_fs(str(tmp_path))
    path = f"{root}/manifest.json"
    assert create_exclusive_fs(fs, path, b"first")
    assert not create_exclusive_fs(fs, path, b"second")
    assert (tmp_path / "manifest.json").read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]  # no temporary file left by either
