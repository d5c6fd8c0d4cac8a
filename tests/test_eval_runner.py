"""End to end: a tiny real zoo → Ray build → Ray eval of every method → a real MLflow server, read back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import ray
import yaml
from typer.testing import CliRunner

from tswitch_ray.cli import app
from tswitch_ray.distributed.build import BuildConfig, run_build
from tswitch_ray.distributed.eval_runner import run_eval
from tswitch_ray.errors import ArtifactError, ConfigError, ServiceError
from tswitch_ray.eval.config import EvalConfig, MethodSpec, load_eval_config
from tswitch_ray.tracking import TrackingConfig

ALL_METHODS = [
    MethodSpec(method="base"),
    MethodSpec(method="individual"),
    MethodSpec(method="avg"),
    MethodSpec(method="ta", options={"scale": 0.3}),
    MethodSpec(method="ties"),
    MethodSpec(method="dare", options={"p": 0.5}),
    MethodSpec(method="pdiscard", options={"alpha": 0.5}),
    MethodSpec(method="emr"),
    MethodSpec(method="tswitch", alpha=0.6),
    MethodSpec(method="autoswitch", alpha=0.6, options={"k": 3, "examples_per_task": 8}),
    MethodSpec(method="wemoe", options={"tta_steps": 2, "batch_size": 8}),
    MethodSpec(method="e-wemoe", options={"tta_steps": 2, "batch_size": 8, "keep_fraction": 0.1}),
]


@pytest.fixture(scope="module")
def switches(tiny_demo_zoo, tmp_path_factory):
    out = tmp_path_factory.mktemp("switches") / "sw"
    run_build(BuildConfig(zoo=str(tiny_demo_zoo), out=str(out), alphas=[0.6, 0.9], executor="local",
                          show_progress=False))
    return out


def _config(zoo, switches, work, **kw) -> EvalConfig:
    kw.setdefault("methods", ALL_METHODS)
    kw.setdefault("tracking", TrackingConfig(enabled=False))
    return EvalConfig(name="e2e", zoo=str(zoo), artifacts=str(switches), work_dir=str(work), limit=24,
                      batch_size=16, **kw)


@pytest.mark.slow
def test_all_methods_on_ray_logged_to_mlflow_server(tiny_demo_zoo, switches, mlflow_server, tmp_path, ray_local):
    from mlflow.tracking import MlflowClient

    cfg = _config(tiny_demo_zoo, switches, tmp_path / "work", executor="ray", num_workers=2,
                  tracking=TrackingConfig(uri=mlflow_server, experiment="e2e"))
    result = run_eval(cfg, show_progress=False)
    assert ray.is_initialized()  # the eval attached to the session's Ray and left it running
    tasks = ["digits", "glyphs", "signs"]
    assert {(r["method"], r["task"]) for r in result.rows} == {(s.method, t) for s in ALL_METHODS for t in tasks}
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["n"] == 24 for r in result.rows)
    by = {s["method"]: s for s in result.summary}
    # Storage ordering follows from the definitions, whatever the accuracies are.
    assert by["individual"]["storage_bytes"] == 3 * by["ta"]["storage_bytes"]
    assert by["ta"]["storage_bytes"] < by["tswitch"]["storage_bytes"] < by["individual"]["storage_bytes"]
    assert by["autoswitch"]["throughput_ratio"] > 0
    # Individual = the fine-tuned checkpoints themselves: equal to scoring them by hand.
    from tswitch_ray.eval.evaluate import evaluate, load_demo

    demo = load_demo(str(Path(tiny_demo_zoo).parent))
    ref = evaluate(demo.adapter, demo.adapter.build(demo.state_dict("glyphs")), demo.eval_dataset("glyphs"),
                   "glyphs", limit=24)
    assert by["individual"]["per_task"]["glyphs"] == pytest.approx(ref["accuracy"])

    # The MLflow server holds the run: read the metrics back through the client.
    client = MlflowClient(tracking_uri=mlflow_server)
    parent = client.get_run(result.run_id)
    assert parent.data.params["zoo"] == str(tiny_demo_zoo)
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{result.run_id}'")
    assert len(children) == len(ALL_METHODS)
    logged = {c.data.params["label"]: c.data.metrics for c in children}
    for s in result.summary:
        assert logged[s["label"]]["avg_accuracy"] == pytest.approx(s["average"])
        assert logged[s["label"]]["storage_bytes"] == s["storage_bytes"]
        for t in tasks:
            assert logged[s["label"]][f"acc_{t}"] == pytest.approx(s["per_task"][t])
    auto = next(c for c in children if c.data.params["method"] == "autoswitch")
    assert auto.data.params["k"] == "3"
    # Methods scored from switches log the build's options: the fixture's build took the defaults.
    ts = next(c for c in children if c.data.params["method"] == "tswitch")
    assert [ts.data.params[f"artifacts_{k}"] for k in ("scope", "cut", "knob")] == ["tensor", "authors", "rms"]
    assert auto.data.params["artifacts_cut"] == "authors"
    assert "artifacts_cut" not in next(c for c in children if c.data.params["method"] == "ties").data.params
    names = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"results.csv", "results.md", "accuracy_vs_storage.png", "config.json"} <= names


def test_rerun_reuses_cached_cells(tiny_demo_zoo, switches, tmp_path):
    specs = [MethodSpec(method="individual"), MethodSpec(method="tswitch", alpha=0.9)]
    cfg = _config(tiny_demo_zoo, switches, tmp_path / "w", methods=specs, executor="local")
    first = run_eval(cfg, show_progress=False)
    cells = sorted((tmp_path / "w" / "cells").rglob("*.json"))
    assert len(cells) == 6
    stamps = [c.stat().st_mtime_ns for c in cells]
    (cells[0]).unlink()
    messages: list[str] = []
    again = run_eval(cfg, show_progress=False, say=messages.append)
    assert any("scoring 1 of 6" in m for m in messages)
    assert [c.stat().st_mtime_ns for c in sorted((tmp_path / "w" / "cells").rglob("*.json"))][1:] == stamps[1:]
    # the recomputed cell has a fresh wall time; everything measured must match
    def measured(summary):
        return [{k: v for k, v in row.items() if k != "seconds"} for row in summary]
    assert measured(again.summary) == measured(first.summary)


def test_unknown_method_and_task_are_clear_errors(tiny_demo_zoo, switches, tmp_path):
    with pytest.raises(ConfigError, match="unknown method 'magic'"):
        MethodSpec(method="magic")
    cfg_file = tmp_path / "eval.yaml"
    cfg_file.write_text(yaml.safe_dump({"zoo": str(tiny_demo_zoo), "methods": [{"method": "magic"}]}))
    res = CliRunner().invoke(app, ["eval", str(cfg_file), "--no-tracking"])
    assert res.exit_code == 2 and "unknown method 'magic'" in res.output
    cfg = _config(tiny_demo_zoo, switches, tmp_path / "w", tasks=["digits", "cars"], executor="local")
    with pytest.raises(ConfigError, match="unknown task.*cars"):
        run_eval(cfg, show_progress=False)
    assert not (tmp_path / "w").exists()


def test_artifacts_of_another_base_model_are_refused(tiny_demo_zoo, switches, tmp_path):
    from safetensors.torch import load_file, save_file

    other = tmp_path / "other"
    shutil.copytree(Path(tiny_demo_zoo).parent, other)
    base = load_file(other / "base.safetensors")
    name = next(iter(base))
    base[name] = base[name] + 1.0
    save_file(base, other / "base.safetensors")
    cfg = _config(other / "zoo.yaml", switches, tmp_path / "w", executor="local",
                  methods=[MethodSpec(method="tswitch", alpha=0.6)])
    with pytest.raises(ArtifactError, match="fingerprint"):
        run_eval(cfg, show_progress=False)
    assert not (tmp_path / "w").exists()


def test_unreachable_tracking_server_fails_before_any_work(tiny_demo_zoo, switches, tmp_path):
    cfg = _config(tiny_demo_zoo, switches, tmp_path / "w", executor="local",
                  tracking=TrackingConfig(uri="http://127.0.0.1:9", connect_timeout_s=2))
    with pytest.raises(ServiceError, match="127.0.0.1:9.*does not answer"):
        run_eval(cfg, show_progress=False)
    assert not (tmp_path / "w").exists()


def test_config_file_resolves_relative_paths_and_grid(tiny_demo_zoo, switches, tmp_path):
    cfg_file = tmp_path / "sweep.yaml"
    shutil.copytree(switches, tmp_path / "sw")
    cfg_file.write_text(yaml.safe_dump({
        "name": "g", "zoo": str(tiny_demo_zoo), "artifacts": "sw",
        "grid": [{"method": ["dare", "pdiscard"], "options.scale": [0.3, 0.5]}],
    }))
    cfg = load_eval_config(str(cfg_file))
    assert cfg.artifacts == str(tmp_path / "sw")
    specs = cfg.expanded_methods()
    assert [(s.method, s.options) for s in specs] == [
        ("dare", {"scale": 0.3}), ("dare", {"scale": 0.5}), ("pdiscard", {"scale": 0.3}), ("pdiscard", {"scale": 0.5})]


@pytest.mark.slow
def test_sweep_cli_runs_a_grid_and_refuses_a_config_without_one(tiny_demo_zoo, switches, tmp_path):
    import json

    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump({"zoo": str(tiny_demo_zoo), "methods": [{"method": "ta"}]}))
    res = CliRunner().invoke(app, ["sweep", str(plain), "--no-tracking"])
    assert res.exit_code == 2 and "needs a `grid:`" in res.output
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({
        "name": "g", "zoo": str(tiny_demo_zoo), "artifacts": str(switches),
        "methods": [{"method": "ta", "options": {"scale": 0.3}}],
        "grid": [{"method": ["pdiscard"], "options.alpha": [0.2, 0.8], "options.scale": [0.3]}],
    }))
    work = tmp_path / "sweep"
    res = CliRunner().invoke(app, ["sweep", str(grid), "--no-tracking", "--executor", "local", "--limit", "16",
                                   "--work-dir", str(work), "--quiet"])
    assert res.exit_code == 0, res.output
    rows = json.loads((work / "summary.json").read_text())
    assert sorted((r["method"], r["options"].get("alpha")) for r in rows) == [("pdiscard", 0.2), ("pdiscard", 0.8), ("ta", None)]
    assert all(len(r["per_task"]) == 3 for r in rows)


# ------------------------------------------------------------------ once per evaluation (issue 13 point 8)


def test_the_zoo_is_fingerprinted_once_per_eval(tiny_demo_zoo, switches, tmp_path, monkeypatch):
    """Several switch methods over two artifact sets, and a merge: one fingerprint computation in all.

    A Zoo computes its fingerprint on the first call and keeps it, so the computations are the Zoo
    objects it is asked on; the local executor scores in this process, where the wrapper is installed.
    """
    from tswitch_ray.zoo import Zoo

    asked: list[Zoo] = []
    original = Zoo.fingerprint

    def counted(self: Zoo) -> str:
        if not any(z is self for z in asked):
            asked.append(self)
        return original(self)

    monkeypatch.setattr(Zoo, "fingerprint", counted)
    copy = tmp_path / "sw-copy"
    shutil.copytree(switches, copy)
    specs = [MethodSpec(method="tswitch", alpha=0.6), MethodSpec(method="tswitch", alpha=0.9),
             MethodSpec(method="tswitch", alpha=0.9, artifacts=str(copy), label="T-Switch (copy)"),
             MethodSpec(method="autoswitch", alpha=0.6, options={"k": 3, "examples_per_task": 8}),
             MethodSpec(method="ta", options={"scale": 0.3})]
    result = run_eval(_config(tiny_demo_zoo, switches, tmp_path / "w", methods=specs, executor="local"),
                      show_progress=False)
    assert len(result.rows) == len(specs) * 3
    assert len(asked) == 1


def test_cells_check_artifacts_against_the_fingerprint_they_are_given(tiny_demo_zoo, switches, monkeypatch):
    from tswitch_ray.eval.weights import read_switches, reconstruct_switched
    from tswitch_ray.zoo import Zoo, load_zoo

    right = load_zoo(str(tiny_demo_zoo)).fingerprint()

    def never(self: Zoo) -> str:
        raise AssertionError("the zoo was fingerprinted although its fingerprint was given")

    monkeypatch.setattr(Zoo, "fingerprint", never)
    sd = reconstruct_switched(str(switches), str(tiny_demo_zoo), "digits", 0.6, zoo_fingerprint=right)
    assert sd
    for read in (lambda fp: reconstruct_switched(str(switches), str(tiny_demo_zoo), "digits", 0.6, zoo_fingerprint=fp),
                 lambda fp: read_switches(str(switches), str(tiny_demo_zoo), ["digits"], 0.6, zoo_fingerprint=fp)):
        with pytest.raises(ArtifactError, match="built for base model fingerprint"):
            read("0" * 64)


def test_autoswitch_is_one_cell_that_reads_switches_and_query_set_once(tiny_demo_zoo, switches, tmp_path,
                                                                       monkeypatch):
    import json

    from tswitch_ray.artifacts import ArtifactReader
    from tswitch_ray.eval import autoswitch_eval

    reads: list[str] = []
    extractions: list[list[str]] = []
    iter_switches, extract = ArtifactReader.iter_switches, autoswitch_eval.extract_query_set

    def counted_reads(self, task, alpha):
        reads.append(task)
        return iter_switches(self, task, alpha)

    def counted_extract(adapter, model, tasks, *args, **kwargs):
        extractions.append(list(tasks))
        return extract(adapter, model, tasks, *args, **kwargs)

    monkeypatch.setattr(ArtifactReader, "iter_switches", counted_reads)
    monkeypatch.setattr(autoswitch_eval, "extract_query_set", counted_extract)
    spec = MethodSpec(method="autoswitch", alpha=0.6, options={"k": 3, "examples_per_task": 8})
    messages: list[str] = []
    result = run_eval(_config(tiny_demo_zoo, switches, tmp_path / "w", methods=[spec], executor="local"),
                      show_progress=False, say=messages.append)
    tasks = ["digits", "glyphs", "signs"]
    assert sorted(reads) == tasks  # each task's switches once
    assert extractions == [tasks]  # the query set of every task, once
    assert any("scoring 1 of 1" in m for m in messages)
    cells = sorted(p.relative_to(tmp_path / "w" / "cells") for p in (tmp_path / "w" / "cells").rglob("*.json"))
    assert [c.name for c in cells] == ["__all__.json"]
    assert [r["task"] for r in result.rows] == tasks
    assert all(r["n"] == 24 and 0.0 <= r["accuracy"] <= 1.0 for r in result.rows)
    # one call's measurements, shared by every task's row; models_built is each task's own
    assert len({r["throughput_ratio"] for r in result.rows}) == 1 and result.rows[0]["throughput_ratio"] > 0
    assert len({r["query_bytes"] for r in result.rows}) == 1 and result.rows[0]["query_bytes"] > 0
    assert all(r["models_built"] >= 1 for r in result.rows)
    # The summary averages its rows' ratios: all rows of the one cell carry the same ratio, and their mean may
    # round to a neighbouring float.
    assert result.summary[0]["throughput_ratio"] == pytest.approx(result.rows[0]["throughput_ratio"], rel=1e-12)
    stored = json.loads((tmp_path / "w" / "cells" / cells[0]).read_text())["rows"]  # the envelope of eval_cells.py
    assert [r["task"] for r in stored] == tasks


def test_a_cell_of_all_tasks_is_rescored_when_the_tasks_change(tiny_demo_zoo, switches, tmp_path):
    """Auto-Switch routes over every task's switches: a cached cell of other tasks does not answer."""
    spec = MethodSpec(method="autoswitch", alpha=0.6, options={"k": 3, "examples_per_task": 8})
    cfg = _config(tiny_demo_zoo, switches, tmp_path / "w", methods=[spec], executor="local")
    run_eval(cfg, show_progress=False)
    messages: list[str] = []
    fewer = run_eval(cfg.model_copy(update={"tasks": ["digits", "glyphs"]}), show_progress=False,
                     say=messages.append)
    assert any("scoring 1 of 1 (method, task) cells (0 cached)" in m for m in messages)
    assert [r["task"] for r in fewer.rows] == ["digits", "glyphs"]
    messages.clear()
    run_eval(cfg.model_copy(update={"tasks": ["digits", "glyphs"]}), show_progress=False, say=messages.append)
    assert any("scoring 0 of 1" in m for m in messages)


def test_unwritable_work_dir_fails_before_any_work(tiny_demo_zoo, switches, tmp_path, monkeypatch):
    import tswitch_ray.distributed.merge as merge_module

    def no_merge(*args, **kwargs):
        raise AssertionError("a merge ran although the work dir cannot be written")

    monkeypatch.setattr(merge_module, "run_merge", no_merge)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cfg = _config(tiny_demo_zoo, switches, blocker / "work", executor="local",
                  methods=[MethodSpec(method="ta", options={"scale": 0.3})])
    with pytest.raises(ArtifactError, match="cannot write evaluation results"):
        run_eval(cfg, show_progress=False)


def test_a_merge_is_made_again_when_the_zoo_gains_a_task(tiny_demo_zoo, switches, tmp_path):
    """A merge depends on every task: one committed for a smaller zoo, and the cells scored on it, do not answer."""
    two = Path(tiny_demo_zoo).with_name("zoo-two-tasks.yaml")
    m = yaml.safe_load(Path(tiny_demo_zoo).read_text())
    m["tasks"] = m["tasks"][:2]
    two.write_text(yaml.safe_dump(m))
    spec = MethodSpec(method="ta", options={"scale": 0.3})
    work = tmp_path / "w"
    small = _config(two, switches, work, methods=[spec], executor="local")
    messages: list[str] = []
    run_eval(small, show_progress=False, say=messages.append)
    marker = work / "merges" / spec.key() / "merge.json"
    assert json.loads(marker.read_text())["tasks"] == ["digits", "glyphs"]
    messages.clear()
    grown = run_eval(_config(tiny_demo_zoo, switches, work, methods=[spec], executor="local"), show_progress=False,
                     say=messages.append)
    assert any(msg.startswith("merging") for msg in messages), messages
    assert any("scoring 3 of 3 (method, task) cells (0 cached)" in msg for msg in messages), messages
    assert json.loads(marker.read_text())["tasks"] == ["digits", "glyphs", "signs"]
    assert [r["task"] for r in grown.rows] == ["digits", "glyphs", "signs"]
    messages.clear()
    run_eval(_config(tiny_demo_zoo, switches, work, methods=[spec], executor="local"), show_progress=False,
             say=messages.append)
    assert not any(msg.startswith("merging") for msg in messages), messages  # unchanged: reused
