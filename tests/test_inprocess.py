"""Executor "auto": a small build or merge runs in-process (said, overridable), a Ray to attach to is used,
and the in-process run writes the same bytes and the same errors as an explicit `--executor local`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tswitch_ray.distributed.inprocess import SMALL_JOB_BYTES, resolve_executor
from tswitch_ray.options import RunOptions

from test_build_reconstruct import make_state, write_zoo


def test_auto_picks_in_process_below_the_threshold_and_says_so(monkeypatch):
    import tswitch_ray.distributed.inprocess as inprocess

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # Whether this test process is connected to a Ray depends on the tests before it: decided here.
    monkeypatch.setattr(inprocess, "_ray_running", lambda: False)
    name, line = resolve_executor(RunOptions(executor="auto"), 600_000)
    assert name == "local"
    assert line == "small job (0.6 MB): running in-process; --executor ray to force Ray"
    assert resolve_executor(RunOptions(executor="auto"), SMALL_JOB_BYTES) == ("ray", None)
    assert resolve_executor(RunOptions(executor="auto", num_gpus=1), 10) == ("ray", None)
    monkeypatch.setattr(inprocess, "_ray_running", lambda: True)  # a Ray this process already runs is used
    assert resolve_executor(RunOptions(executor="auto"), 10) == ("ray", None)


def test_auto_attaches_to_a_given_ray_and_explicit_choices_stand(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve_executor(RunOptions(executor="auto", ray_address="127.0.0.1:6379"), 10) == ("ray", None)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert resolve_executor(RunOptions(executor="auto"), 10) == ("ray", None)
    assert resolve_executor(RunOptions(executor="local"), 10**12) == ("local", None)
    assert resolve_executor(RunOptions(executor="ray"), 10) == ("ray", None)


_CHILD = """
import json, sys
from typer.testing import CliRunner
from tswitch_ray.cli import app
r = CliRunner().invoke(app, sys.argv[1:])
ray = sys.modules.get("ray")
print(json.dumps({"code": r.exit_code, "output": r.output,
                  "ray_started": bool(ray is not None and ray.is_initialized())}))
"""


def _cli_child(*args: object) -> dict:
    """The CLI in a fresh process (no Ray of a test session to find), with whether it started Ray."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", _CHILD, *map(str, args)], capture_output=True, text=True,
                          env=env, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _files(root: Path) -> dict[str, object]:
    """Every file's bytes; JSON files (manifest.json, merge.json) without the commit's time and its digest."""
    out: dict[str, object] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix == ".json":
            doc = json.loads(p.read_text())
            for key in ("created_at", "manifest_sha256", "marker_sha256", "committed_at"):
                doc.pop(key, None)
            out[str(p.relative_to(root))] = doc
        elif p.is_file():
            out[str(p.relative_to(root))] = p.read_bytes()
    return out


def test_small_build_and_merge_run_in_process_with_the_same_bytes(tmp_path):
    zoo = write_zoo(tmp_path / "zoo", make_state(seed=3), "safetensors")
    auto = _cli_child("build", "--zoo", zoo, "--out", tmp_path / "auto" / "sw", "--alpha", "0.6")
    assert auto["code"] == 0, auto["output"]
    assert "running in-process; --executor ray to force Ray" in auto["output"]
    assert not auto["ray_started"]
    local = _cli_child("build", "--zoo", zoo, "--out", tmp_path / "local" / "sw", "--alpha", "0.6", "--executor", "local")
    assert local["code"] == 0 and "running in-process" not in local["output"]
    assert _files(tmp_path / "auto") == _files(tmp_path / "local")

    merged = _cli_child("merge", "--zoo", zoo, "--method", "task_arithmetic", "--out", tmp_path / "m-auto" / "m")
    assert merged["code"] == 0, merged["output"]
    assert "running in-process" in merged["output"] and not merged["ray_started"]
    ref = _cli_child("merge", "--zoo", zoo, "--method", "task_arithmetic", "--out", tmp_path / "m-local" / "m",
                     "--executor", "local")
    assert ref["code"] == 0
    assert _files(tmp_path / "m-auto") == _files(tmp_path / "m-local")


def test_in_process_errors_are_the_local_executors(tmp_path):
    """A corrupt task checkpoint: the same one-paragraph error and exit 2, auto or explicit local."""
    zoo = write_zoo(tmp_path / "zoo", make_state(seed=4), "safetensors")
    (tmp_path / "zoo" / "cars.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    auto = _cli_child("build", "--zoo", zoo, "--out", tmp_path / "a", "--quiet")
    local = _cli_child("build", "--zoo", zoo, "--out", tmp_path / "b", "--quiet", "--executor", "local")
    assert auto["code"] == local["code"] == 2
    assert "error:" in auto["output"] and "Traceback" not in auto["output"]
    assert auto["output"].replace(str(tmp_path / "a"), "OUT") == local["output"].replace(str(tmp_path / "b"), "OUT")
    assert not auto["ray_started"]


@pytest.mark.parametrize("executor", ["local", "ray", "auto"])
def test_executor_field_accepts_auto(executor):
    assert RunOptions(executor=executor).executor == executor
