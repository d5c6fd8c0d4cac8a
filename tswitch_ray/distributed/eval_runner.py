"""Distributed evaluation: Ray tasks per (method, task), one MLflow run per evaluation.

This module orchestrates; what the results look like (tables, plot, progress
bar, per-method summary) is ``eval/reporting.py``, how a cell is scored is
``eval/scoring.py``. Stages, each one function of :func:`run_eval`:

1. **Check** (:func:`_prepare`) everything that can fail cheaply before any
   work: methods and options, tasks present in the zoo and the data, the
   adapter built once (its kind, supported model types, every task's head), artifacts
   built from this zoo's base model (its fingerprint is computed here, once
   per evaluation, and handed to every cell in the :class:`EvalContext`), the
   tracking server answering, the work dir writable.
2. **Merge** (:func:`_merge_stage`) the state-dict methods (the registry
   entries whose ``merged_by_eval`` is true: TA, TIES, DARE, P-Discard, EMR,
   ...) with the streamed, sharded :func:`~tswitch_ray.distributed.merge.run_merge`,
   once per method, into ``work_dir/merges/<key>/``.
3. **Score** (:func:`_score_stage`): one Ray task per (method, task) runs the
   scorer the method's registry entry names: it rebuilds the weights (from the
   merge output, the zoo, or — T-Switch and Auto-Switch — from θ0 and the
   switch artifacts only) and runs the adapter over the task's eval split.
   Methods that ``score_all_tasks_at_once`` (Auto-Switch routes over every
   task's switches and query examples, WEMoE/E-WEMoE train their routers on
   all tasks) are one Ray task per method, which reads each task's switches
   and extracts the query set once.
4. **Gather** (:func:`_gather`) every cell, fresh or cached, into rows; each
   row carries the artifact URI its method was scored from.
5. **Report** (``eval/reporting.py``): ``results.parquet`` (queryable by
   ``tswitch registry``, written last), ``results.csv``, ``results.md``,
   ``summary.json``, ``accuracy_vs_storage.png``, ``config.json``; then
   **track** (:func:`_track`): an MLflow parent run with one nested run per
   method.

Commit lifecycle: each scored cell is one file,
``work_dir/cells/<method-key>/<task>.json`` (``__all__.json`` for a method
that scores all tasks at once), written whole by ``atomic_write`` and bound
to the digests of what it was scored from (``eval_cells.py``), so a rerun (or
a sweep that grows) recomputes only what is missing, was edited, or was
scored from other artifacts, merges, checkpoints or data. The results set is committed by
:func:`~tswitch_ray.eval.reporting.write_report` with ``results.parquet`` as
its marker, removed first and written last. The work dir is reused by design
(the cell cache), so an existing evaluation there is not refused.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec

from tswitch_ray.distributed.eval_cells import binding_digest, cached_rows, cell_bytes, source_digest
from tswitch_ray.distributed.executor import LocalExecutor, WorkItem, make_executor
from tswitch_ray.errors import ArtifactError, ConfigError
from tswitch_ray.eval.config import EvalConfig, MethodSpec, TaskData
from tswitch_ray.eval.reporting import (
    CellProgress,
    Row,
    report_files,
    summarise,
    write_report,
)
from tswitch_ray.io.atomic import atomic_write_fs, exists, read_bytes, remove_tree
from tswitch_ray.io.fs import open_fs
from tswitch_ray.io.sink import probe_writable
from tswitch_ray.methods import get_method_info
from tswitch_ray.options import RunContext, RunOptions
from tswitch_ray.tracking import Tracker
from tswitch_ray.zoo import Zoo

ALL = "__all__"


@dataclass(frozen=True)
class EvalContext(RunContext):
    """What a scoring task needs; small and picklable (URIs, not tensors)."""

    zoo: str
    zoo_fingerprint: str | None  # computed once on the driver where a method is scored from switches
    run: RunOptions
    adapter_spec: Mapping[str, Any] = field(hash=False)
    adapter_base: str
    data: tuple[tuple[str, str, str], ...]  # (task, eval uri, unlabeled uri)
    tasks: tuple[str, ...]
    artifacts: str | None
    batch_size: int
    limit: int | None
    torch_threads: int

    def eval_uri(self, task: str) -> str:
        return next(e for t, e, _ in self.data if t == task)

    def unlabeled_uri(self, task: str) -> str:
        return next(u for t, _, u in self.data if t == task)


@dataclass
class Cell:
    """One unit of scoring work: a method on one task (or on all, for Auto-Switch and WEMoE)."""

    spec: MethodSpec
    task: str  # or ALL
    weights_uri: str | None = None  # merge output for merged methods


@dataclass
class EvalResult:
    name: str
    work_dir: str
    rows: list[dict[str, Any]]  # one per (method label, task)
    summary: list[dict[str, Any]]  # one per method: average accuracy, storage
    seconds: float
    run_id: str | None = None
    files: dict[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------ scoring (runs inside Ray tasks)


def score_cell(ctx: EvalContext, spec: MethodSpec, task: str, weights_uri: str | None) -> list[dict[str, Any]]:
    """Score one cell with the scorer its method's registry entry names; one row per task it covered."""
    import torch

    from tswitch_ray.eval.adapters import adapter_from_spec
    from tswitch_ray.eval.scoring import CellJob, score

    torch.set_num_threads(max(1, ctx.torch_threads))
    adapter = adapter_from_spec(dict(ctx.adapter_spec), ctx.adapter_base, ctx.storage_options)
    return score(CellJob(ctx, spec, task, weights_uri), adapter)


def _cell_tasks(spec: MethodSpec, tasks: Sequence[str]) -> list[str]:
    """The cells of one method: one per task, or one for all (``scores_all_tasks_at_once``)."""
    return [ALL] if get_method_info(spec.method).scores_all_tasks_at_once else list(tasks)


def _artifact_uri(cfg: EvalConfig, spec: MethodSpec) -> str | None:
    """The switch artifacts a method is scored from: its own ``artifacts``, else the config's."""
    return (spec.artifacts or cfg.artifacts) if get_method_info(spec.method).needs_artifacts else None


# ------------------------------------------------------------------ stage 1: checks, before any work


@dataclass(frozen=True)
class EvalPlan:
    """What the checks established, for the stages after them (driver only)."""

    cfg: EvalConfig
    specs: list[MethodSpec]
    tasks: list[str]
    zoo: Zoo
    zoo_fingerprint: str | None  # None where no method is scored from switch artifacts
    adapter_spec: dict[str, Any]
    adapter_base: str
    data: dict[str, TaskData]
    work_dir: str
    fs: fsspec.AbstractFileSystem
    root: str  # work_dir as a path of fs

    @property
    def work_root(self) -> str:
        return self.work_dir.rstrip("/")

    def cell_file(self, spec: MethodSpec, task: str) -> str:
        return f"{self.work_root}/cells/{spec.key()}/{task}.json"

    def artifact_uris(self) -> list[str]:
        return sorted({uri for s in self.specs if (uri := _artifact_uri(self.cfg, s))})


def _prepare(cfg: EvalConfig) -> EvalPlan:
    """Stage 1 up to the tracking server: the methods, tasks, data and artifacts are checked; nothing written."""
    from tswitch_ray.zoo import load_zoo

    specs = cfg.expanded_methods()
    if not specs:
        raise ConfigError(f"eval config {cfg.name!r} lists no methods.")
    zoo = load_zoo(cfg.zoo, storage_options=cfg.run.storage_options)
    tasks = list(cfg.tasks or zoo.task_names)
    adapter_spec, adapter_base, data = _open_data(cfg)
    _check(cfg, specs, tasks, zoo.task_names, data)
    _check_adapter(cfg, adapter_spec, adapter_base)
    fingerprint = _check_artifacts(cfg, specs, tasks, zoo)
    work_dir = cfg.work_dir or str(Path("runs") / cfg.name)
    fs, root = open_fs(work_dir, cfg.run.storage_options)
    return EvalPlan(cfg, specs, tasks, zoo, fingerprint, adapter_spec, adapter_base, data, work_dir, fs, root)


def _open_data(cfg: EvalConfig) -> tuple[dict[str, Any], str, dict[str, TaskData]]:
    """Adapter spec, its base URI and the task data: from the config, else from the zoo's demo.json."""
    adapter, data = cfg.adapter, cfg.data
    zoo_dir = cfg.zoo.rsplit("/", 1)[0] if "/" in cfg.zoo else "."
    if adapter is None or data is None:
        demo_uri = f"{zoo_dir}/demo.json"
        if not exists(demo_uri, cfg.run.storage_options):
            raise ConfigError(
                f"the eval config gives no `adapter`/`data` and {demo_uri} does not exist to take them from; "
                "add `adapter:` (an adapter spec) and `data:` (each task's eval split) to the config."
            )
        info = json.loads(read_bytes(demo_uri, cfg.run.storage_options))
        adapter = adapter if adapter is not None else info["adapter"]
        if data is None:
            data = {t: TaskData(eval=f"{zoo_dir}/{v['eval']}", unlabeled=f"{zoo_dir}/{v.get('train', v['eval'])}")
                    for t, v in info["tasks"].items()}
    return adapter, zoo_dir, data


def _check(cfg: EvalConfig, specs: Sequence[MethodSpec], tasks: Sequence[str], zoo_tasks: Sequence[str],
           data: Mapping[str, TaskData]) -> None:
    """Every method spec valid and scorable, every task in the zoo and in the data."""
    from tswitch_ray.eval.scoring import scorer_for

    for s in specs:
        s.check()
        scorer_for(get_method_info(s.method))
    missing = [t for t in tasks if t not in zoo_tasks]
    if missing:
        raise ConfigError(f"eval config {cfg.name!r}: unknown task(s) {', '.join(missing)}; "
                          f"the zoo {cfg.zoo} has {', '.join(zoo_tasks)}.")
    no_data = [t for t in tasks if t not in data]
    if no_data:
        raise ConfigError(f"eval config {cfg.name!r}: no eval data for task(s) {', '.join(no_data)}.")


def _check_adapter(cfg: EvalConfig, spec: Mapping[str, Any], base: str) -> None:
    """The adapter is built once here, so an unknown kind, an unsupported model type or a task folder
    without its head is refused before any merge runs (the scoring tasks build their own)."""
    from tswitch_ray.errors import TSwitchError
    from tswitch_ray.eval.adapters import adapter_from_spec

    try:
        adapter_from_spec(dict(spec), base, cfg.run.storage_options)
    except TSwitchError as exc:
        raise type(exc)(f"eval config {cfg.name!r}, adapter: {exc}") from exc


def _check_artifacts(cfg: EvalConfig, specs: Sequence[MethodSpec], tasks: Sequence[str], zoo: Zoo) -> str | None:
    """Each artifact set a method is scored from: built from this zoo's base, with its α and every task.

    Returns the zoo's fingerprint, computed here once for the whole evaluation (None: no method needs
    artifacts); every artifact set is opened once however many methods use it.
    """
    from tswitch_ray.artifacts import ArtifactReader
    from tswitch_ray.switch_sets import check_built_from, match_alpha

    fingerprint: str | None = None
    readers: dict[str, ArtifactReader] = {}
    for s in specs:
        if not get_method_info(s.method).needs_artifacts:
            continue
        uri = _artifact_uri(cfg, s)
        if not uri:
            raise ConfigError(f"method {s.display!r} needs switch artifacts: set `artifacts:` in the eval config "
                              "(where `tswitch build` wrote them).")
        if uri not in readers:
            fingerprint = fingerprint or zoo.fingerprint()
            reader = readers[uri] = ArtifactReader(uri, storage_options=cfg.run.storage_options)
            check_built_from(reader, zoo, fingerprint)
            absent = [t for t in tasks if t not in reader.tasks]
            if absent:
                raise ArtifactError(f"{uri}: no switches for task(s) {', '.join(absent)}.")
        match_alpha(readers[uri].alphas, s.alpha, uri)
    return fingerprint


def _open_work_dir(plan: EvalPlan) -> None:
    """The sink's start for the work dir: writable (probed), before any merge or scoring."""
    probe_writable(plan.fs, plan.root, plan.work_dir, "evaluation results")
    plan.fs.makedirs(plan.root, exist_ok=True)


# ------------------------------------------------------------------ driver


def run_eval(cfg: EvalConfig, show_progress: bool | None = None, say: Callable[[str], None] | None = None
             ) -> EvalResult:
    """Run the evaluation ``cfg`` end to end; see the module docstring for the stages.

    ``show_progress`` defaults to ``cfg.run.show_progress``."""
    from tswitch_ray.eval.weights import storage_model

    say = say or (lambda msg: None)
    show_progress = cfg.run.show_progress if show_progress is None else show_progress
    t0 = time.perf_counter()
    plan = _prepare(cfg)
    tracker = Tracker(cfg.tracking, results_uri=plan.work_dir)  # fails fast on an unreachable server, before any work
    _open_work_dir(plan)
    executor = make_executor(cfg.run)
    try:
        merge_dirs = _merge_stage(plan, show_progress, say)
        bindings = _cell_bindings(plan, merge_dirs)
        _score_stage(plan, executor, merge_dirs, bindings, show_progress, say)
    finally:
        executor.close()
    sizes = storage_model(plan.zoo, plan.artifact_uris(), cfg.run.storage_options)
    rows = _gather(plan, bindings)
    summary = summarise(plan.specs, rows, sizes)
    result = EvalResult(cfg.name, plan.work_dir, rows, summary, time.perf_counter() - t0)
    files = report_files(cfg.name, plan.work_dir, rows, summary, plan.tasks, sizes.bytes_for("individual"),
                         cfg.model_dump_json(indent=2))
    write_report(plan.fs, plan.root, files)
    result.files = {name: f"{plan.work_root}/{name}" for name in files}
    result.run_id = _track(plan, tracker, result, files)
    return result


# ------------------------------------------------------------------ stage 2: merges


def _merge_stage(plan: EvalPlan, show_progress: bool, say: Callable[[str], None]) -> dict[str, str]:
    """Merge every method the registry marks ``merged_by_eval``, once (a committed merge is reused);
    the merge output folder of each, by method key."""
    from tswitch_ray.distributed.merge import MERGE_FORMAT, MERGE_MARKER, MergeConfig, merge_sink, run_merge
    from tswitch_ray.distributed.merge_reuse import merge_is_current

    cfg = plan.cfg
    merge_dirs: dict[str, str] = {}
    for s in plan.specs:
        if not get_method_info(s.method).merged_by_eval:
            continue
        out = f"{plan.work_root}/merges/{s.key()}"
        merge_dirs[s.key()] = out
        # A merge committed earlier (outputs checked) is reused while its tasks and checkpoints are the zoo's;
        # one made before the zoo gained, lost or changed a task is made again (this folder is the eval's own).
        merge = MergeConfig(zoo=cfg.zoo, method=s.method, out=out, options=s.options, overwrite=True,
                            run=cfg.run.model_copy(update={"show_progress": show_progress}))
        if merge_is_current(out, MERGE_MARKER, MERGE_FORMAT, merge_sink(merge, plan.zoo, "-").identity,
                            plan.zoo.files_identity(), cfg.run.storage_options) is not None:
            continue
        say(f"merging {s.display}")
        # Cells scored on an earlier merge in this folder do not answer for the new one.
        remove_tree(f"{plan.work_root}/cells/{s.key()}", cfg.run.storage_options)
        run_merge(merge, zoo=plan.zoo)
    return merge_dirs


# ------------------------------------------------------------------ stage 3: scoring


def _context(plan: EvalPlan) -> EvalContext:
    """The frozen context every scoring task of this evaluation shares."""
    cfg, data, tasks = plan.cfg, plan.data, plan.tasks
    return EvalContext(
        zoo=cfg.zoo, zoo_fingerprint=plan.zoo_fingerprint,
        run=cfg.run, adapter_spec=plan.adapter_spec, adapter_base=plan.adapter_base,
        data=tuple((t, data[t].eval, data[t].unlabeled or data[t].eval) for t in tasks),
        tasks=tuple(tasks), artifacts=cfg.artifacts, batch_size=cfg.batch_size, limit=cfg.limit,
        torch_threads=1 if cfg.run.executor != "local" else (os.cpu_count() or 1),
    )


def _cell_bindings(plan: EvalPlan, merge_dirs: Mapping[str, str]) -> dict[tuple[str, str], str]:
    """The digest each cell is bound to, by (method key, task): what its scores depend on (eval_cells.py).

    A cell of all tasks depends on all of them (routing, router training); a cell of one task only on its own
    data, so a sweep that adds tasks reuses the cells it has.
    """
    from tswitch_ray.artifacts.schema import MANIFEST_NAME
    from tswitch_ray.distributed.merge import MERGE_MARKER

    cfg, opts = plan.cfg, plan.cfg.run.storage_options
    common = {"zoo_files": plan.zoo.files_identity(), "limit": cfg.limit, "batch_size": cfg.batch_size,
              "adapter": plan.adapter_spec, "adapter_base": plan.adapter_base}
    out: dict[tuple[str, str], str] = {}
    for s in plan.specs:
        source = (source_digest(_artifact_uri(cfg, s), MANIFEST_NAME, opts)
                  or source_digest(merge_dirs.get(s.key()), MERGE_MARKER, opts))
        for task in _cell_tasks(s, plan.tasks):
            tasks = plan.tasks if task == ALL else [task]
            data = {t: [plan.data[t].eval, plan.data[t].unlabeled] for t in tasks}
            out[(s.key(), task)] = binding_digest({**common, "method": s.key(), "task": task, "tasks": tasks,
                                                   "data": data, "source": source})
    return out


def _is_cached(plan: EvalPlan, spec: MethodSpec, task: str, bindings: Mapping[tuple[str, str], str]) -> bool:
    """A cell file is there, intact, and bound to what this evaluation would score it from (eval_cells.py)."""
    return cached_rows(plan.fs, plan.cell_file(spec, task), bindings[(spec.key(), task)]) is not None


def _score_stage(plan: EvalPlan, executor: LocalExecutor, merge_dirs: Mapping[str, str],
                 bindings: Mapping[tuple[str, str], str], show_progress: bool, say: Callable[[str], None]) -> None:
    """Score every cell not cached yet, one task each on ``executor``; each cell file is written as it lands."""
    cells = [Cell(s, task, merge_dirs.get(s.key()))
             for s in plan.specs for task in _cell_tasks(s, plan.tasks) if not _is_cached(plan, s, task, bindings)]
    n_all = sum(len(_cell_tasks(s, plan.tasks)) for s in plan.specs)
    say(f"scoring {len(cells)} of {n_all} (method, task) cells ({n_all - len(cells)} cached)")
    ctx = _context(plan)
    items = [WorkItem(key=i, args=(ctx, c.spec, c.task, c.weights_uri), memory_bytes=0)
             for i, c in enumerate(cells)]
    with CellProgress(len(items), show_progress) as advance:
        for i, rows in executor.map(score_cell, items, None):
            c = cells[i]
            atomic_write_fs(plan.fs, plan.cell_file(c.spec, c.task),
                            cell_bytes(rows, bindings[(c.spec.key(), c.task)]))
            advance(c.spec.display, c.task)


# ------------------------------------------------------------------ stage 4: gathering


def _gather(plan: EvalPlan, bindings: Mapping[tuple[str, str], str]) -> list[Row]:
    """Every cell's rows, fresh or cached, in spec then task order, labelled with their method spec."""
    rows: list[Row] = []
    for s in plan.specs:
        for task in _cell_tasks(s, plan.tasks):
            path = plan.cell_file(s, task)
            cell = cached_rows(plan.fs, path, bindings[(s.key(), task)])
            if cell is None:
                raise ArtifactError(f"{path}: the eval cell was changed or removed while the evaluation ran; "
                                    "run the evaluation again to score it anew.")
            for r in cell:
                if r["task"] in plan.tasks:
                    rows.append({"label": s.display, "method": s.method, "alpha": s.alpha,
                                 "options": json.dumps(s.options, sort_keys=True),
                                 "artifact_uri": _artifact_uri(plan.cfg, s), **r})
    return rows


# ------------------------------------------------------------------ stage 5: tracking


def _track(plan: EvalPlan, tracker: Tracker, result: EvalResult, files: Mapping[str, bytes]) -> str | None:
    """Log the evaluation as an MLflow parent run with one nested run per method, the results ``files``
    attached to the parent; the parent's run id."""
    cfg, tasks = plan.cfg, plan.tasks
    with tracker.evaluation(cfg.name, {"zoo": cfg.zoo, "tasks": tasks, "artifacts": cfg.artifacts,
                                       "n_methods": len(plan.specs), "executor": cfg.run.executor}):
        builds: dict[str, dict[str, Any]] = {}
        for s, summ in zip(plan.specs, result.summary):
            params = {**_method_params(s, cfg.zoo), **_build_params(plan, s, builds)}
            tracker.log_method(s.display, params, _method_metrics(summ, tasks))
        tracker.log_summary({"wall_seconds": result.seconds}, files)
        return tracker.parent_run_id


def _method_params(spec: MethodSpec, zoo: str) -> dict[str, Any]:
    """A method's MLflow params: what it is, and the options its registry entry logs (defaults filled in)."""
    params = {"method": spec.method, "options": spec.options, "alpha": spec.alpha, "label": spec.display, "zoo": zoo}
    info = get_method_info(spec.method)
    defaults = info.defaults(for_eval=True)
    params.update({name: spec.options.get(name, defaults[name]) for name in info.logged_options})
    return params


def _build_params(plan: EvalPlan, spec: MethodSpec, seen: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The build options of the switch artifacts a method is scored from, as MLflow params (none for the others);
    ``seen`` caches them per artifact set."""
    uri = _artifact_uri(plan.cfg, spec)
    if not uri:
        return {}
    if uri not in seen:
        from tswitch_ray.artifacts import ArtifactReader

        r = ArtifactReader(uri, storage_options=plan.cfg.run.storage_options)
        seen[uri] = {"artifacts_scope": r.scope, "artifacts_cut": r.cut, "artifacts_knob": r.knob_mode}
    return seen[uri]


def _method_metrics(summ: Mapping[str, Any], tasks: Sequence[str]) -> dict[str, Any]:
    """A method's MLflow metrics: accuracy per task and on average, storage, wall time, throughput ratio."""
    metrics = {f"acc_{t}": summ["per_task"].get(t) for t in tasks}
    metrics.update({"avg_accuracy": summ["average"], "storage_bytes": summ["storage_bytes"],
                    "wall_seconds": summ["seconds"]})
    if summ.get("throughput_ratio") is not None:
        metrics["throughput_ratio"] = summ["throughput_ratio"]
    return metrics
