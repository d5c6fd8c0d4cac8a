"""duckdb registry over committed artifact sets and evaluation results (local disk and S3)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from tswitch_ray.artifacts import ArtifactWriter, Registry, encode_switch, write_table_atomic
from tswitch_ray.errors import ConfigError

TASKS = ["cars", "dtd", "svhn"]
SHAPES = {"w": (64, 32), "b": (64,)}


def _commit_set(uri: str, alpha: float, seed: int, storage_options: dict | None = None) -> int:
    """Commit a one-alpha switch set of random masks; return its payload bytes (summed here from the codec)."""
    rng = np.random.default_rng(seed)
    w = ArtifactWriter(uri, f"rk-{seed}", storage_options=storage_options)
    rows, payload = [], 0
    for task in TASKS:
        for name, shape in SHAPES.items():
            mask = rng.random(shape) >= alpha
            enc = encode_switch(mask.reshape(-1), rng.random(mask.size) < 0.5)
            payload += enc.nbytes
            rows.append({"task": task, "tensor": name, "alpha": alpha, "scope": "tensor", "knob_mode": "rms",
                         "shape": list(shape), "dtype": "F32", "kept": int(mask.sum()), "knob": 1e-3,
                         "encoded": enc})
    w.write(0, rows)
    w.complete({"zoo": {"name": "toy", "fingerprint": "fp"}, "tasks": TASKS, "alphas": [alpha], "scope": "tensor",
              "knob_mode": "rms", "name": f"a{alpha}"})
    return payload


def _results(uri: str, artifact_uri: str | None, method: str, accs: list[float], storage_options=None) -> None:
    write_table_atomic(uri, pa.table({
        "artifact_uri": [artifact_uri] * len(TASKS),
        "method": [method] * len(TASKS),
        "task": TASKS,
        "alpha": [0.0] * len(TASKS),
        "accuracy": accs,
        "storage_bytes": [0] * len(TASKS),
        "seed": [7] * len(TASKS),  # extra columns are kept
    }), storage_options=storage_options)


SMALLEST_GOOD = """
    SELECT a.uri, a.name, a.encoded_bytes, avg(r.accuracy) AS avg_acc
    FROM artifacts a JOIN results r ON r.artifact_uri = a.uri
    GROUP BY a.uri, a.name, a.encoded_bytes
    HAVING avg(r.accuracy) >= 0.9
    ORDER BY a.encoded_bytes
    LIMIT 1
"""


def test_registry_local(tmp_path: Path) -> None:
    root = tmp_path / "root"
    sizes = {}
    # Higher alpha keeps fewer elements: smaller sets. Accuracy (made up) drops with alpha.
    accs = {0.5: [0.95, 0.93, 0.97], 0.7: [0.92, 0.88, 0.95], 0.9: [0.85, 0.80, 0.90]}
    for i, alpha in enumerate((0.5, 0.7, 0.9)):
        uri = str(root / "builds" / f"set{i}")
        sizes[alpha] = _commit_set(uri, alpha, seed=i)
        # Written with a trailing slash: the registry normalises URIs before joining.
        _results(str(root / "evals" / f"e{i}" / "results.parquet"), uri + "/", "tswitch", accs[alpha])
    pending = ArtifactWriter(str(root / "builds" / "pending"), "rk-x")  # staged, never committed: not listed
    empty = np.zeros(4, bool)
    pending.write(0, [{"task": "cars", "tensor": "b", "alpha": 0.5, "scope": "tensor", "knob_mode": "rms",
                            "shape": [4], "dtype": "F32", "kept": 0, "encoded": encode_switch(empty, empty)}])
    (root / "junk").mkdir()
    (root / "junk" / "manifest.json").write_text("{broken")

    reg = Registry(str(root))
    arts = reg.query("SELECT name, n_tasks, tasks, alphas, encoded_bytes, fp32_bytes, ratio, scope FROM artifacts ORDER BY name")
    assert arts.column("name").to_pylist() == ["a0.5", "a0.7", "a0.9"]
    assert arts.column("n_tasks").to_pylist() == [3, 3, 3]
    assert arts.column("tasks").to_pylist()[0] == TASKS
    assert arts.column("encoded_bytes").to_pylist() == [sizes[0.5], sizes[0.7], sizes[0.9]]
    numel = sum(int(np.prod(s)) for s in SHAPES.values())
    assert arts.column("fp32_bytes").to_pylist() == [4 * numel * len(TASKS)] * 3
    assert len(reg.problems) == 1 and "junk" in reg.problems[0][0]

    sw = reg.query("SELECT task, alpha, kept_fraction, numel FROM switches WHERE alpha = 0.9 ORDER BY task")
    assert sw.column("task").to_pylist() == TASKS
    assert all(abs(f - 0.1) < 0.05 for f in sw.column("kept_fraction").to_pylist())

    best = reg.query(SMALLEST_GOOD)
    expected = min((a for a in accs if np.mean(accs[a]) >= 0.9), key=lambda a: sizes[a])
    assert expected == 0.7
    assert best.num_rows == 1 and best.column("name")[0].as_py() == f"a{expected}"
    assert best.column("avg_acc")[0].as_py() == pytest.approx(np.mean(accs[0.7]))

    res = reg.query("SELECT * FROM results")
    assert res.num_rows == 9 and "seed" in res.column_names
    assert set(res.column("uri").to_pylist()) == {str(root / "evals" / f"e{i}") for i in range(3)}


def test_registry_empty_root_has_empty_views(tmp_path: Path) -> None:
    reg = Registry(str(tmp_path / "nothing-here"))
    for view in ("artifacts", "switches", "results"):
        assert reg.query(f"SELECT count(*) AS n FROM {view}").column("n")[0].as_py() == 0
    cols = reg.query("SELECT * FROM results").column_names
    assert {"uri", "method", "task", "alpha", "accuracy", "storage_bytes"} <= set(cols)


def test_registry_ignores_uncommitted_and_refreshes(tmp_path: Path) -> None:
    uri = str(tmp_path / "set")
    w = ArtifactWriter(uri, "rk-0")
    mask = np.zeros(8, bool)
    w.write(0, [{"task": t, "tensor": "b", "alpha": 0.5, "scope": "tensor", "knob_mode": "rms", "shape": [8],
                      "dtype": "F32", "kept": 0, "knob": 0.0, "encoded": encode_switch(mask, mask)} for t in TASKS])
    reg = Registry(str(tmp_path))
    assert reg.query("SELECT * FROM artifacts").num_rows == 0
    w.complete({"zoo": {"name": "toy", "fingerprint": "fp"}, "tasks": TASKS, "alphas": [0.5], "scope": "tensor",
              "knob_mode": "rms"})
    reg.refresh()
    assert reg.query("SELECT uri FROM artifacts").column("uri").to_pylist() == [uri]


def test_bad_sql_is_config_error(tmp_path: Path) -> None:
    reg = Registry(str(tmp_path))
    with pytest.raises(ConfigError, match="syntax error"):
        reg.query("SELEC * FROM artifacts")
    with pytest.raises(ConfigError, match="no_such_view"):
        reg.query("SELECT * FROM no_such_view")


@pytest.mark.s3
def test_registry_s3(s3_bucket) -> None:
    bucket, opts = s3_bucket
    small = _commit_set(f"{bucket}/b/small", 0.9, seed=1, storage_options=opts)
    _commit_set(f"{bucket}/b/big", 0.5, seed=2, storage_options=opts)
    _results(f"{bucket}/e/1/results.parquet", f"{bucket}/b/small", "tswitch", [0.91, 0.92, 0.93], opts)
    _results(f"{bucket}/e/2/results.parquet", f"{bucket}/b/big", "tswitch", [0.95, 0.96, 0.97], opts)
    reg = Registry(bucket, storage_options=opts)
    best = reg.query(SMALLEST_GOOD)
    assert best.column("uri").to_pylist() == [f"{bucket}/b/small"]
    assert best.column("encoded_bytes").to_pylist() == [small]


def test_registry_query_formats_on_the_cli(tmp_path: Path) -> None:
    """`registry query --format json|csv|markdown|table`: machine formats parse; a wide table stays readable."""
    import csv
    import io
    import json

    from typer.testing import CliRunner

    from tswitch_ray.cli import app

    root = tmp_path / "root"
    sizes = {a: _commit_set(str(root / f"set{i}"), a, seed=i) for i, a in enumerate((0.5, 0.9))}
    sql = "SELECT name, n_tasks, encoded_bytes, ratio FROM artifacts ORDER BY name"
    run = CliRunner().invoke

    res = run(app, ["registry", "query", sql, "--root", str(root), "--format", "json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert [(r["name"], r["n_tasks"], r["encoded_bytes"]) for r in rows] == [("a0.5", 3, sizes[0.5]), ("a0.9", 3, sizes[0.9])]

    res = run(app, ["registry", "query", sql, "--root", str(root), "--format", "csv"])
    assert [r["name"] for r in csv.DictReader(io.StringIO(res.stdout))] == ["a0.5", "a0.9"]

    res = run(app, ["registry", "query", sql, "--root", str(root), "--format", "markdown"])
    lines = res.stdout.splitlines()
    assert lines[0] == "| name | n_tasks | encoded_bytes | ratio |" and lines[1] == "|---|---|---|---|"
    assert lines[2].startswith(f"| a0.5 | 3 | {sizes[0.5]} | ") and len(lines) == 4

    # every column of `artifacts` is far wider than 80 characters: one block per row, every value on one line
    res = run(app, ["registry", "query", "SELECT * FROM artifacts ORDER BY name", "--root", str(root)], terminal_width=80)
    assert res.exit_code == 0, res.output
    assert "row 1 of 2" in res.stdout and "row 2 of 2" in res.stdout
    assert max(len(ln) for ln in res.stdout.splitlines()) <= 80
    block = res.stdout.split("row 2 of 2")[1]
    assert any(ln.split()[:2] == ["encoded_bytes", str(sizes[0.9])] for ln in block.splitlines())
    # a narrow result is an ordinary table
    res = run(app, ["registry", "query", "SELECT name FROM artifacts ORDER BY name", "--root", str(root)], terminal_width=80)
    assert "row 1" not in res.stdout and "a0.5" in res.stdout and "┃ name" in res.stdout

    res = run(app, ["registry", "query", sql, "--root", str(root), "--format", "xml"])
    assert res.exit_code == 2 and "markdown" in res.output and "Traceback" not in res.output
