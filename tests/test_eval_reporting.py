"""eval/reporting.py: the per-method summary, the results files, their commit order and the progress bar."""

from __future__ import annotations

import io
import json
import uuid

import fsspec
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from tswitch_ray.eval.config import MethodSpec
from tswitch_ray.eval.reporting import (
    RESULTS_TABLE,
    CellProgress,
    plot_accuracy_vs_storage,
    report_files,
    results_markdown,
    summarise,
    write_report,
)
from tswitch_ray.methods.storage import StorageModel

TASKS = ["cars", "dtd"]
SPECS = [MethodSpec(method="individual"), MethodSpec(method="tswitch", alpha=0.6),
         MethodSpec(method="autoswitch", alpha=0.6, options={"k": 3})]
MODEL = 1_000_000
SWITCHES = 150_000


def _sizes() -> StorageModel:
    return StorageModel(n_tasks=2, model_bytes=MODEL, float_numel=250_000, mlp_numel=100_000, dtype_bytes=4.0,
                        switch_bytes={0.6: SWITCHES})


def _rows() -> list[dict]:
    rows = []
    for s in SPECS:
        for i, t in enumerate(TASKS):
            row = {"label": s.display, "method": s.method, "alpha": s.alpha,
                   "options": json.dumps(s.options, sort_keys=True), "artifact_uri": None if s.alpha is None
                   else "s3://b/sw", "task": t, "accuracy": 0.5 + 0.25 * i, "n": 24, "seconds": 1.0 + i}
            if s.method == "autoswitch":
                row.update(throughput_ratio=0.4, models_built=2 + i, query_bytes=4096)
            rows.append(row)
    return rows


def test_summary_per_method_counts_storage_and_query_bytes():
    summary = summarise(SPECS, _rows(), _sizes())
    by = {s["method"]: s for s in summary}
    assert [s["label"] for s in summary] == [s.display for s in SPECS]
    assert by["individual"]["per_task"] == {"cars": 0.5, "dtd": 0.75}
    assert by["individual"]["average"] == pytest.approx(0.625)
    assert by["individual"]["storage_bytes"] == 2 * MODEL
    assert by["tswitch"]["storage_bytes"] == MODEL + SWITCHES
    assert by["autoswitch"]["storage_bytes"] == MODEL + SWITCHES + 4096  # the query set is stored too
    assert by["autoswitch"]["throughput_ratio"] == pytest.approx(0.4)
    assert by["tswitch"]["throughput_ratio"] is None
    assert by["tswitch"]["seconds"] == 2.0  # the slowest cell


def test_markdown_table_has_one_row_per_method_and_storage_vs_individual():
    summary = summarise(SPECS, _rows(), _sizes())
    md = results_markdown(summary, TASKS, 2 * MODEL)
    lines = md.splitlines()
    assert lines[0] == "| method | cars | dtd | avg | storage (MB) | storage vs individual |"
    assert len(lines) == 2 + len(SPECS)
    assert lines[2] == "| individual | 50.0 | 75.0 | **62.5** | 2.00 | 100.0 % |"
    assert lines[3] == "| tswitch α=0.6 | 50.0 | 75.0 | **62.5** | 1.15 | 57.5 % |"


def test_report_files_are_the_results_set_with_the_table_last():
    rows, summary = _rows(), summarise(SPECS, _rows(), _sizes())
    files = report_files("e", "s3://b/runs/e", rows, summary, TASKS, 2 * MODEL, '{"name": "e"}')
    assert list(files) == ["results.csv", "results.md", "summary.json", "accuracy_vs_storage.png", "config.json",
                           RESULTS_TABLE]
    table = pq.read_table(io.BytesIO(files[RESULTS_TABLE]))
    assert table.column_names == ["uri", "artifact_uri", "method", "label", "task", "alpha", "accuracy", "n",
                                  "storage_bytes", "options", "seconds", "eval_name"]
    assert table.num_rows == len(rows)
    assert set(table.column("uri").to_pylist()) == {"s3://b/runs/e"}
    assert table.column("artifact_uri").to_pylist()[-1] == "s3://b/sw"
    csv = pacsv.read_csv(io.BytesIO(files["results.csv"]))
    assert "uri" not in csv.column_names and csv.num_rows == len(rows)
    assert json.loads(files["summary.json"]) == json.loads(json.dumps(summary))
    assert files["results.md"].decode().startswith("# e\n\n| method |")
    assert files["accuracy_vs_storage.png"][:8] == b"\x89PNG\r\n\x1a\n"
    assert files["config.json"] == b'{"name": "e"}'


class _RecordingFS(MemoryFileSystem):
    """A real in-memory filesystem that notes, for each file written, whether a results table was there."""

    def __init__(self, root: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.table, self.writes = f"{root}/{RESULTS_TABLE}", []

    def pipe_file(self, path, value, **kwargs):
        self.writes.append((path.rsplit("/", 1)[-1], self.exists(self.table)))
        return super().pipe_file(path, value, **kwargs)


def test_write_report_removes_the_old_table_first_and_writes_the_new_one_last():
    root = f"/evalreport-{uuid.uuid4().hex}"
    fs = _RecordingFS(root, skip_instance_cache=True)
    try:
        fs.pipe_file(fs.table, b"old")
        fs.writes.clear()
        write_report(fs, root, {RESULTS_TABLE: b"new", "results.md": b"md", "summary.json": b"[]"})
        assert [name for name, _ in fs.writes] == ["results.md", "summary.json", RESULTS_TABLE]
        # from the first write on, no results table claims the folder holds a complete evaluation
        assert not any(table_there for _, table_there in fs.writes)
        assert fs.cat_file(fs.table) == b"new"
        assert fs.cat_file(f"{root}/results.md") == b"md"
    finally:
        fs.rm(root, recursive=True)


def test_write_report_on_a_local_folder(tmp_path):
    fs = fsspec.filesystem("file")
    write_report(fs, str(tmp_path), {RESULTS_TABLE: b"t", "results.md": b"m"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.md", RESULTS_TABLE]  # no temp files left


def test_plot_skips_methods_whose_storage_is_not_counted():
    summary = summarise(SPECS, _rows(), _sizes())
    summary.append({**summary[0], "label": "unknown", "storage_bytes": -1})
    png = plot_accuracy_vs_storage(summary, "t")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_progress_off_or_empty_shows_nothing_and_on_counts_cells(capsys):
    for total, enabled in ((3, False), (0, True)):
        with CellProgress(total, enabled) as advance:
            advance("m", "t")
    assert capsys.readouterr().out == ""
    with CellProgress(2, True) as advance:
        advance("m", "cars")
        advance("m", "dtd")
    out = capsys.readouterr().out
    assert "eval" in out and "2/2" in out and "m / dtd" in out


def test_column_labels_never_truncate_task_names_into_identical_columns():
    from tswitch_ray.eval.reporting import column_labels

    short = ["digits", "glyphs", "svhn"]
    assert column_labels(short) == {t: t for t in short}  # names that fit are kept
    long = ["classification_task_alpha", "classification_task_beta", "classification_task_b2", "classification_task_a",
            "cifar100_coarse", "cifar100_fine", "cifar10", "textures"]
    labels = column_labels(long)
    assert len(set(labels.values())) == len(long)
    assert all(len(v) <= 7 for v in labels.values())
    assert labels["cifar10"] == "cifar10" and labels["textures"] == "textur…"
    assert labels["classification_task_beta"].endswith("beta")  # what tells the names apart is shown
    # even names that differ only after 40 shared characters, and many of them
    many = [f"{'x' * 40}{i}" for i in range(12)]
    assert len(set(column_labels(many).values())) == 12


def test_eval_table_columns_are_distinct_for_long_common_prefix_tasks(capsys):
    """The CLI's results table: one distinct header per task, the full names in the legend."""
    from types import SimpleNamespace

    import tswitch_ray.cli as cli

    tasks = ["sentiment_movie_reviews", "sentiment_product_reviews", "sentiment_tweets"]
    rows = [{"task": t} for t in tasks]
    summary = [{"label": "Individual", "method": "individual", "per_task": {t: 0.5 + 0.1 * i for i, t in enumerate(tasks)},
                "average": 0.6, "storage_bytes": 3000}]
    result = SimpleNamespace(name="e", rows=rows, summary=summary, files={}, work_dir="w", seconds=1.0, run_id=None)
    cli._print_eval(result)
    text = capsys.readouterr().out
    from tswitch_ray.eval.reporting import column_labels

    labels = column_labels(tasks)
    header = next(ln for ln in text.splitlines() if "method" in ln)
    assert all(header.count(labels[t]) == 1 for t in tasks) and len(set(labels.values())) == 3
    assert all(t in " ".join(text.split()) for t in tasks)  # the legend names every task in full
