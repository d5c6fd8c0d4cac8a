"""Distributed evaluation: Ray tasks per (method, task), one MLflow run per evaluation.

Stages:

1. **Check** everything that can fail cheaply before any work: methods and
   options, tasks present in the zoo and the data, artifacts built from this
   zoo's base model, the tracking server answering.
2. **Merge** the state-dict methods (the registry entries whose
   ``merged_by_eval`` is true: TA, TIES, DARE, P-Discard, EMR, ...) with the
   streamed, sharded :func:`~tswitch_ray.distributed.merge.run_merge`, once
   per method, into ``work_dir/merges/<key>/``.
3. **Score**: one Ray task per (method, task) runs the scorer the method's
   registry entry names (``eval/scoring.py``): it rebuilds the weights (from
   the merge output, the zoo, or — T-Switch and Auto-Switch — from θ0 and the
   switch artifacts only) and runs the adapter over the task's eval split.
   Methods that ``score_all_tasks_at_once`` (WEMoE/E-WEMoE train their routers
   on all tasks) are one Ray task per method.
4. **Report**: ``results.parquet`` (queryable by ``tswitch registry``),
   ``results.csv``, ``results.md``, ``accuracy_vs_storage.png``, the config,
   and an MLflow parent run with one nested run per method.

Each scored cell is cached as ``work_dir/cells/<method-key>/<task>.json``, so
a rerun (or a sweep that grows) recomputes only what is missing.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tswitch_ray.distributed.executor import WorkItem, make_executor
from tswitch_ray.errors import ArtifactError, ConfigError
from tswitch_ray.eval.config import EvalConfig, MethodSpec, TaskData
from tswitch_ray.io.atomic import atomic_write_fs, exists, read_bytes
from tswitch_ray.io.fs import open_fs
from tswitch_ray.methods import get_method_info
from tswitch_ray.options import RunOptions
from tswitch_ray.tracking import Tracker

ALL = "__all__"


@dataclass(frozen=True)
class EvalContext:
    """What a scoring task needs; small and picklable (URIs, not tensors)."""

    zoo: str
    run: RunOptions
    adapter_spec: Mapping[str, Any] = field(hash=False)
    adapter_base: str
    data: tuple[tuple[str, str, str], ...]  # (task, eval uri, unlabeled uri)
    tasks: tuple[str, ...]
    artifacts: str | None
    batch_size: int
    limit: int | None
    torch_threads: int

    @property
    def storage_options(self) -> dict[str, Any]:
        return self.run.storage_options

    def eval_uri(self, task: str) -> str:
        return next(e for t, e, _ in self.data if t == task)

    def unlabeled_uri(self, task: str) -> str:
        return next(u for t, _, u in self.data if t == task)


@dataclass
class Cell:
    """One unit of scoring work: a method on one task (or on all, for WEMoE)."""

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


# ------------------------------------------------------------------ driver


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
    from tswitch_ray.reconstruct import match_alpha, open_switches

    checked: set[str] = set()
    for s in specs:
        if not get_method_info(s.method).needs_artifacts:
            continue
        uri = _artifact_uri(cfg, s)
        if not uri:
            raise ConfigError(f"method {s.display!r} needs switch artifacts: set `artifacts:` in the eval config "
                              "(the --out of `tswitch build`).")
        reader, _ = open_switches(uri, cfg.zoo, cfg.run.storage_options)  # fingerprint check against this zoo
        match_alpha(reader.alphas, s.alpha, uri)
        absent = [t for t in tasks if t not in reader.tasks]
        if absent:
            raise ArtifactError(f"{uri}: no switches for task(s) {', '.join(absent)}.")
        checked.add(uri)


def _cells_dir(work_dir: str, spec: MethodSpec) -> str:
    return f"{work_dir}/cells/{spec.key()}"


def _cell_file(work_dir: str, spec: MethodSpec, task: str) -> str:
    return f"{_cells_dir(work_dir, spec)}/{task}.json"


def run_eval(cfg: EvalConfig, show_progress: bool = True, say: Callable[[str], None] | None = None) -> EvalResult:
    """Run the evaluation ``cfg`` end to end; see the module docstring for the stages."""
    from tswitch_ray.distributed.merge import MERGE_MARKER, MergeConfig, run_merge
    from tswitch_ray.eval.weights import storage_model
    from tswitch_ray.zoo import load_zoo

    say = say or (lambda msg: None)
    t0 = time.perf_counter()
    specs = cfg.expanded_methods()
    if not specs:
        raise ConfigError(f"eval config {cfg.name!r} lists no methods.")
    zoo = load_zoo(cfg.zoo, storage_options=cfg.run.storage_options)
    tasks = list(cfg.tasks or zoo.task_names)
    adapter_spec, adapter_base, data = _open_data(cfg)
    _check(cfg, specs, tasks, zoo.task_names, data)
    tracker = Tracker(cfg.tracking)  # fails fast on an unreachable server, before any work
    work_dir = cfg.work_dir or str(Path("runs") / cfg.name)
    fs, root = open_fs(work_dir, cfg.run.storage_options)
    fs.makedirs(root, exist_ok=True)
    work_root = work_dir.rstrip("/")

    executor = make_executor(cfg.run)
    try:
        # Stage 2: merges, once per method, streamed and sharded.
        merge_dirs: dict[str, str] = {}
        for s in specs:
            if not get_method_info(s.method).merged_by_eval:
                continue
            out = f"{work_root}/merges/{s.key()}"
            merge_dirs[s.key()] = out
            if fs.exists(f"{out}/{MERGE_MARKER}"):  # committed by an earlier run
                continue
            say(f"merging {s.display}")
            run_merge(MergeConfig(zoo=cfg.zoo, method=s.method, out=out, options=s.options,
                                  run=cfg.run.model_copy(update={"show_progress": show_progress})))

        # Stage 3: one task per (method, task) not already cached.
        ctx = EvalContext(
            zoo=cfg.zoo, run=cfg.run, adapter_spec=adapter_spec, adapter_base=adapter_base,
            data=tuple((t, data[t].eval, data[t].unlabeled or data[t].eval) for t in tasks),
            tasks=tuple(tasks), artifacts=cfg.artifacts, batch_size=cfg.batch_size, limit=cfg.limit,
            torch_threads=1 if cfg.run.executor == "ray" else (os.cpu_count() or 1),
        )
        cells: list[Cell] = []
        for s in specs:
            for task in _cell_tasks(s, tasks):
                if not fs.exists(_cell_file(work_root, s, task)):
                    cells.append(Cell(s, task, merge_dirs.get(s.key())))
        n_all = sum(len(_cell_tasks(s, tasks)) for s in specs)
        say(f"scoring {len(cells)} of {n_all} (method, task) cells ({n_all - len(cells)} cached)")
        items = [WorkItem(key=i, args=(ctx, c.spec, c.task, c.weights_uri),
                          memory_bytes=0) for i, c in enumerate(cells)]
        with _progress(len(items), show_progress) as advance:
            for i, rows in executor.map(score_cell, items, None):
                c = cells[i]
                atomic_write_fs(fs, _cell_file(work_root, c.spec, c.task), json.dumps(rows).encode())
                advance(c.spec.display, c.task)
    finally:
        executor.close()

    # Stage 4: gather every cell (fresh or cached) and report.
    sm = storage_model(zoo, sorted({uri for s in specs if (uri := _artifact_uri(cfg, s))}), cfg.run.storage_options)
    rows: list[dict[str, Any]] = []
    for s in specs:
        for task in _cell_tasks(s, tasks):
            for r in json.loads(fs.cat_file(_cell_file(work_root, s, task))):
                if r["task"] in tasks:
                    rows.append({"label": s.display, "method": s.method, "alpha": s.alpha,
                                 "options": json.dumps(s.options, sort_keys=True),
                                 "artifact_uri": _artifact_uri(cfg, s), **r})
    summary = _summarise(specs, rows, tasks, sm, adapter_spec)
    seconds = time.perf_counter() - t0
    result = EvalResult(cfg.name, work_dir, rows, summary, seconds)
    files = _report_files(cfg, result, tasks, sm)
    # results.parquet last: it is what the registry finds an evaluation by.
    for name in sorted(files, key=lambda n: n == "results.parquet"):
        atomic_write_fs(fs, f"{root}/{name}", files[name])
    result.files = {name: f"{work_root}/{name}" for name in files}
    with tracker.evaluation(cfg.name, {"zoo": cfg.zoo, "tasks": tasks, "artifacts": cfg.artifacts,
                                       "n_methods": len(specs), "executor": cfg.run.executor}):
        for s, summ in zip(specs, summary):
            params = {"method": s.method, "options": s.options, "alpha": s.alpha, "label": s.display,
                      "zoo": cfg.zoo}
            info = get_method_info(s.method)
            defaults = info.defaults(for_eval=True)
            params.update({name: s.options.get(name, defaults[name]) for name in info.logged_options})
            metrics = {f"acc_{t}": summ["per_task"].get(t) for t in tasks}
            metrics.update({"avg_accuracy": summ["average"], "storage_bytes": summ["storage_bytes"],
                            "wall_seconds": summ["seconds"]})
            if summ.get("throughput_ratio") is not None:
                metrics["throughput_ratio"] = summ["throughput_ratio"]
            tracker.log_method(s.display, params, metrics)
        tracker.log_summary({"wall_seconds": seconds}, files)
        result.run_id = tracker.parent_run_id
    return result


def _summarise(specs: Sequence[MethodSpec], rows: Sequence[dict[str, Any]], tasks: Sequence[str], sm: Any,
               adapter_spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    out = []
    for s in specs:
        mine = [r for r in rows if r["label"] == s.display]
        per_task = {r["task"]: r["accuracy"] for r in mine}
        query_bytes = max((int(r.get("query_bytes") or 0) for r in mine), default=0)
        ratios = [r["throughput_ratio"] for r in mine if r.get("throughput_ratio") is not None]
        out.append({
            "label": s.display, "method": s.method, "alpha": s.alpha, "options": s.options,
            "per_task": per_task,
            "average": sum(per_task.values()) / len(per_task) if per_task else float("nan"),
            "storage_bytes": sm.bytes_for(s.method, s.alpha, s.options, query_bytes),
            "seconds": max((r["seconds"] for r in mine), default=0.0),
            "throughput_ratio": (sum(ratios) / len(ratios)) if ratios else None,
        })
    return out


def results_markdown(summary: Sequence[Mapping[str, Any]], tasks: Sequence[str], individual_bytes: int) -> str:
    head = "| method | " + " | ".join(tasks) + " | avg | storage (MB) | storage vs individual |"
    sep = "|" + "---|" * (len(tasks) + 4)
    lines = [head, sep]
    for s in summary:
        accs = " | ".join(f"{100 * s['per_task'][t]:.1f}" if t in s["per_task"] else "–" for t in tasks)
        sb = s["storage_bytes"]
        store = f"{sb / 1e6:.2f}" if sb >= 0 else "–"
        rel = f"{100 * sb / individual_bytes:.1f} %" if sb >= 0 and individual_bytes else "–"
        lines.append(f"| {s['label']} | {accs} | **{100 * s['average']:.1f}** | {store} | {rel} |")
    return "\n".join(lines) + "\n"


# Label offsets (points) tried in order until a label overlaps no earlier label.
_LABEL_OFFSETS = ((5, 3, "left"), (5, -10, "left"), (-5, 3, "right"), (-5, -10, "right"), (5, 12, "left"), (5, -19, "left"))


def plot_accuracy_vs_storage(summary: Sequence[Mapping[str, Any]], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    points = [(s["storage_bytes"] / 1e6, 100 * s["average"], s["label"]) for s in summary if s["storage_bytes"] >= 0]
    for x, y, _ in points:
        ax.scatter(x, y, s=40)
    ax.set_xscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.tick_params(axis="x", which="minor", labelsize=7)
    fig.tight_layout()
    renderer = fig.canvas.get_renderer()
    placed = []
    for x, y, label in sorted(points, key=lambda p: (-p[1], p[0])):
        for dx, dy, ha in _LABEL_OFFSETS:
            text = ax.annotate(label, (x, y), fontsize=7, xytext=(dx, dy), textcoords="offset points", ha=ha)
            box = text.get_window_extent(renderer)
            if not any(box.overlaps(other) for other in placed):
                break
            text.remove()
        else:  # every offset collides: keep the first rather than drop the label
            text = ax.annotate(label, (x, y), fontsize=7, xytext=_LABEL_OFFSETS[0][:2], textcoords="offset points")
            box = text.get_window_extent(renderer)
        placed.append(box)
    ax.set_xlabel("storage for all tasks (MB, log scale)")
    ax.set_ylabel("average accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _report_files(cfg: EvalConfig, result: EvalResult, tasks: Sequence[str], sm: Any) -> dict[str, bytes]:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    storage = {s["label"]: s["storage_bytes"] for s in result.summary}
    table = pa.Table.from_pylist([
        {"uri": result.work_dir, "artifact_uri": r["artifact_uri"],
         "method": r["method"], "label": r["label"], "task": r["task"], "alpha": r["alpha"],
         "accuracy": float(r["accuracy"]), "n": int(r["n"]), "storage_bytes": int(storage[r["label"]]),
         "options": r["options"], "seconds": float(r["seconds"]), "eval_name": cfg.name}
        for r in result.rows
    ])
    pbuf, cbuf = io.BytesIO(), io.BytesIO()
    pq.write_table(table, pbuf, compression="zstd")
    pacsv.write_csv(table.drop_columns(["uri"]), cbuf)
    md = f"# {cfg.name}\n\n" + results_markdown(result.summary, tasks, sm.bytes_for("individual")) + \
        f"\nAccuracy in %; {len(tasks)} tasks; storage counts every byte needed to serve all tasks.\n"
    return {
        "results.parquet": pbuf.getvalue(),
        "results.csv": cbuf.getvalue(),
        "results.md": md.encode(),
        "summary.json": json.dumps([{**s, "options": s["options"]} for s in result.summary], indent=2,
                                   default=str).encode(),
        "accuracy_vs_storage.png": plot_accuracy_vs_storage(result.summary, cfg.name),
        "config.json": cfg.model_dump_json(indent=2).encode(),
    }


class _progress:
    """A rich progress bar over (method, task) cells."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled = total, enabled and total > 0

    def __enter__(self) -> Callable[[str, str], None]:
        if not self.enabled:
            return lambda label, task: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        self._p = Progress(TextColumn("eval"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                           TimeRemainingColumn(), TextColumn("{task.description}"), transient=False)
        self._p.__enter__()
        tid = self._p.add_task("", total=self.total)

        def advance(label: str, task: str) -> None:
            self._p.update(tid, advance=1, description=f"{label} / {task}")

        return advance

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self._p.__exit__(*exc)

