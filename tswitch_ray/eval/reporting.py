"""What an evaluation shows: the per-method summary, the results files, the plot and the progress bar.

The eval runner (``distributed/eval_runner.py``) gathers one row per
(method label, task) and hands them here:

* :func:`summarise` folds the rows into one summary per method (average
  accuracy, storage, wall time, throughput ratio);
* :func:`report_files` renders ``results.parquet`` (what ``tswitch registry``
  reads), ``results.csv``, ``results.md``, ``summary.json``,
  ``accuracy_vs_storage.png`` and ``config.json``;
* :func:`write_report` commits them (see there for the order);
* :class:`CellProgress` is the rich progress bar over the scored cells.

Nothing here runs a model or opens a zoo: rows and sizes in, bytes out.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import fsspec

from tswitch_ray.eval.config import MethodSpec
from tswitch_ray.io.atomic import atomic_write_fs, exists_fs
from tswitch_ray.methods.storage import StorageModel

Row = dict[str, Any]

#: The file ``tswitch registry`` finds an evaluation by; written last (:func:`write_report`).
RESULTS_TABLE = "results.parquet"


# ------------------------------------------------------------------ the per-method summary


def summarise(specs: Sequence[MethodSpec], rows: Sequence[Row], sizes: StorageModel) -> list[Row]:
    """One summary per method spec, in spec order: ``label``, ``method``, ``alpha``, ``options``,
    ``per_task`` accuracies, their ``average``, ``storage_bytes`` (-1: not counted), the slowest
    cell's ``seconds`` and the mean ``throughput_ratio`` (None for methods that report none)."""
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
            "storage_bytes": sizes.bytes_for(s.method, s.alpha, s.options, query_bytes),
            "seconds": max((r["seconds"] for r in mine), default=0.0),
            "throughput_ratio": (sum(ratios) / len(ratios)) if ratios else None,
        })
    return out


# ------------------------------------------------------------------ tables


def column_labels(tasks: Sequence[str], width: int = 7) -> dict[str, str]:
    """A short, distinct column label per task (at most ``width`` characters; a name that fits is kept).

    Plain truncation turns ``cifar100_coarse`` / ``cifar100_fine`` into two
    ``cifar10…`` columns; names that collide are shortened around what tells
    them apart (the part after their common prefix), and any that still
    collide are numbered. Callers print the full names as a legend.
    """
    import os.path

    labels = {t: t if len(t) <= width else t[: width - 1] + "…" for t in tasks}
    for group in _collisions(labels):
        common = len(os.path.commonprefix(group))
        keep = max(1, min(common, width // 3))  # a little of the shared stem, for context
        for t in group:
            rest = t[common:]
            labels[t] = (t[:keep] + "…" + rest)[:width] if keep + 1 + len(rest) <= width else t[:keep] + "…" + rest[: width - keep - 2] + "…"
    for group in _collisions(labels):
        for i, t in enumerate(group, 1):
            tag = f"#{i}"
            labels[t] = labels[t][: width - len(tag)] + tag
    return labels


def _collisions(labels: Mapping[str, str]) -> list[list[str]]:
    by_label: dict[str, list[str]] = {}
    for t, label in labels.items():
        by_label.setdefault(label, []).append(t)
    return [g for g in by_label.values() if len(g) > 1]


def results_markdown(summary: Sequence[Mapping[str, Any]], tasks: Sequence[str], individual_bytes: int) -> str:
    """The summary as a markdown table: accuracy (%) per task, the average, storage in MB and vs Individual."""
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


def results_table(name: str, work_dir: str, rows: Sequence[Row], summary: Sequence[Mapping[str, Any]]) -> Any:
    """The rows as the Arrow table of ``results.parquet`` (the schema docs/ARTIFACTS.md documents)."""
    import pyarrow as pa

    storage = {s["label"]: s["storage_bytes"] for s in summary}
    return pa.Table.from_pylist([
        {"uri": work_dir, "artifact_uri": r["artifact_uri"],
         "method": r["method"], "label": r["label"], "task": r["task"], "alpha": r["alpha"],
         "accuracy": float(r["accuracy"]), "n": int(r["n"]), "storage_bytes": int(storage[r["label"]]),
         "options": r["options"], "seconds": float(r["seconds"]), "eval_name": name}
        for r in rows
    ])


def report_files(name: str, work_dir: str, rows: Sequence[Row], summary: Sequence[Mapping[str, Any]],
                 tasks: Sequence[str], individual_bytes: int, config_json: str) -> dict[str, bytes]:
    """Every results file of an evaluation, by file name, with :data:`RESULTS_TABLE` last."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    table = results_table(name, work_dir, rows, summary)
    pbuf, cbuf = io.BytesIO(), io.BytesIO()
    pq.write_table(table, pbuf, compression="zstd")
    pacsv.write_csv(table.drop_columns(["uri"]), cbuf)
    md = f"# {name}\n\n" + results_markdown(summary, tasks, individual_bytes) + \
        f"\nAccuracy in %; {len(tasks)} tasks; storage counts every byte needed to serve all tasks.\n"
    return {
        "results.csv": cbuf.getvalue(),
        "results.md": md.encode(),
        "summary.json": json.dumps(list(summary), indent=2, default=str).encode(),
        "accuracy_vs_storage.png": plot_accuracy_vs_storage(summary, name),
        "config.json": config_json.encode(),
        RESULTS_TABLE: pbuf.getvalue(),
    }


def write_report(fs: fsspec.AbstractFileSystem, root: str, files: Mapping[str, bytes]) -> None:
    """Commit the results files into the folder ``root`` of ``fs``, :data:`RESULTS_TABLE` last.

    The sink rule of ``io/sink.py`` with ``results.parquet`` as the marker:
    ``tswitch registry`` finds an evaluation by that file alone, so it goes
    first (a rerun's old table is removed before anything is rewritten) and
    comes back last, after every other file is in place. Each file is one
    :func:`~tswitch_ray.io.atomic.atomic_write_fs`, so a reader never sees a
    half-written one. No staging folder as in ``FolderSink``: the files are
    rendered whole in memory, so staging would only add a copy of each, and
    the registry reads ``results.parquet``, not a JSON marker.
    """
    marker = f"{root}/{RESULTS_TABLE}"
    if exists_fs(fs, marker):
        fs.rm_file(marker)
    for name in sorted(files, key=lambda n: n == RESULTS_TABLE):
        atomic_write_fs(fs, f"{root}/{name}", files[name])


# ------------------------------------------------------------------ the plot

# Label offsets (points) tried in order until a label overlaps no earlier label.
_LABEL_OFFSETS = ((5, 3, "left"), (5, -10, "left"), (-5, 3, "right"), (-5, -10, "right"), (5, 12, "left"), (5, -19, "left"))


def plot_accuracy_vs_storage(summary: Sequence[Mapping[str, Any]], title: str) -> bytes:
    """Average accuracy against storage (log scale) of every method whose storage is counted; PNG bytes."""
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
    _place_labels(ax, fig.canvas.get_renderer(), points)
    ax.set_xlabel("storage for all tasks (MB, log scale)")
    ax.set_ylabel("average accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _place_labels(ax: Any, renderer: Any, points: Sequence[tuple[float, float, str]]) -> None:
    """Annotate each point at the first offset whose label overlaps no label placed before it."""
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


# ------------------------------------------------------------------ progress


class CellProgress:
    """A rich progress bar over scored cells; as a context manager it gives ``advance(label, task)``."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled = total, enabled and total > 0

    def __enter__(self) -> Callable[[str, str], None]:
        if not self.enabled:
            return lambda label, task: None
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._p = Progress(TextColumn("eval"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                           TimeRemainingColumn(), TextColumn("{task.description}"), transient=False)
        self._p.__enter__()
        tid = self._p.add_task("", total=self.total)

        def advance(label: str, task: str) -> None:
            self._p.update(tid, advance=1, description=f"{label} / {task}")

        return advance

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self._p.__exit__(*exc)
