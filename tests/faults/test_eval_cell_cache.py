"""The eval cell cache is bound to digests: a cell edited after it was written, or one scored from switch artifacts
that were rebuilt since, is scored anew instead of reused; intact cells are reused."""

from __future__ import annotations

import json

import pytest

from tswitch_ray.distributed.build import BuildConfig, run_build
from tswitch_ray.distributed.eval_runner import run_eval
from tswitch_ray.eval.config import EvalConfig, MethodSpec
from tswitch_ray.tracking import TrackingConfig


@pytest.fixture
def setup(tiny_demo_zoo, tmp_path):
    switches = tmp_path / "switches"
    run_build(BuildConfig(zoo=str(tiny_demo_zoo), out=str(switches), alphas=[0.6], executor="local",
                          show_progress=False))
    cfg = EvalConfig(name="cache", zoo=str(tiny_demo_zoo), artifacts=str(switches), work_dir=str(tmp_path / "w"),
                     limit=24, batch_size=16, executor="local", tracking=TrackingConfig(enabled=False),
                     methods=[MethodSpec(method="individual"), MethodSpec(method="tswitch", alpha=0.6)])
    return cfg, switches, tmp_path / "w" / "cells"


def _scores(result) -> list[tuple]:
    return sorted((r["label"], r["task"], r["accuracy"]) for r in result.rows)


def _scored(messages: list[str]) -> str:
    return next(m for m in messages if m.startswith("scoring"))


def test_an_edited_cell_is_scored_anew(setup):
    cfg, _, cells = setup
    first = run_eval(cfg, show_progress=False)
    victim = sorted(cells.rglob("*.json"))[0]
    body = json.loads(victim.read_text())
    body["rows"][0]["accuracy"] = 1.0  # a better score, written in by hand
    victim.write_text(json.dumps(body))
    messages: list[str] = []
    again = run_eval(cfg, show_progress=False, say=messages.append)
    assert "scoring 1 of 6" in _scored(messages)
    assert _scores(again) == _scores(first)
    messages.clear()
    run_eval(cfg, show_progress=False, say=messages.append)
    assert "scoring 0 of 6" in _scored(messages)


def test_cells_of_rebuilt_artifacts_are_scored_anew(setup, tiny_demo_zoo):
    cfg, switches, _ = setup
    run_eval(cfg, show_progress=False)
    # Rebuilt at the same URI with other options: another manifest (digest), other switches.
    run_build(BuildConfig(zoo=str(tiny_demo_zoo), out=str(switches), alphas=[0.6], knob="mean", overwrite=True,
                          executor="local", show_progress=False))
    messages: list[str] = []
    run_eval(cfg, show_progress=False, say=messages.append)
    assert "scoring 3 of 6" in _scored(messages)  # the T-Switch cells; the individual models' are reused
