"""`registry query` run over and over while sets are committed (first commit, then a replacing one): every
answer lists either the old complete set or the new one, valid; never a half-committed set."""

from __future__ import annotations

import threading

from typer.testing import CliRunner

from tswitch_ray.artifacts.registry import Registry
from tswitch_ray.cli import app
from tswitch_ray.distributed.build import BuildConfig, run_build


def _build(zoo, out, alphas, overwrite=False) -> None:
    run_build(BuildConfig(zoo=str(zoo), out=str(out), alphas=alphas, executor="local", show_progress=False,
                          shard_bytes=2**20, overwrite=overwrite))


def _observe_while(work, root) -> list[tuple]:
    """Registry answers (alphas, valid, problem, switches) taken back to back while ``work()`` runs, and one after."""
    seen: list[tuple] = []
    errors: list[BaseException] = []

    def go() -> None:
        try:
            work()
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    t = threading.Thread(target=go)
    t.start()
    while True:
        running = t.is_alive()
        reg = Registry(str(root))
        for row in reg.query("select alphas, valid, problem, n_tasks from artifacts").to_pylist():
            n = reg.query("select count(*) as n from switches").to_pylist()[0]["n"]
            seen.append((tuple(row["alphas"] or ()), row["valid"], row["problem"], row["n_tasks"], n))
        reg.close()
        if not running:
            break
    t.join()
    assert not errors, errors
    return seen


def test_registry_never_sees_a_half_committed_set(zoo, tmp_path):
    root = tmp_path / "root"
    out = root / "sets" / "switches"
    first = _observe_while(lambda: _build(zoo, out, [0.5, 0.9]), root)
    assert first and set(first) == {((0.5, 0.9), True, None, 3, 6)}, set(first)
    second = _observe_while(lambda: _build(zoo, out, [0.7], overwrite=True), root)
    assert set(second) <= {((0.5, 0.9), True, None, 3, 6), ((0.7,), True, None, 3, 3)}, set(second)
    assert second[-1] == ((0.7,), True, None, 3, 3)


def test_registry_cli_verify_parts_marks_a_replaced_part_invalid(clean, tmp_path):
    import shutil

    root = tmp_path / "root"
    shutil.copytree(clean, root / "switches")
    parts = sorted((root / "switches").rglob("part-*.parquet"))
    parts[0].write_bytes(parts[0].read_bytes()[::-1])  # same size: only hashing the part finds it
    sql = "select valid, problem from artifacts"
    plain = CliRunner().invoke(app, ["registry", "query", sql, "--root", str(root), "--format", "csv"])
    assert plain.exit_code == 0 and "true" in plain.output.lower(), plain.output
    verified = CliRunner().invoke(app, ["registry", "query", sql, "--root", str(root), "--format", "csv",
                                        "--verify-parts"])
    assert verified.exit_code == 0, verified.output
    assert "false" in verified.output.lower() and parts[0].name in verified.output, verified.output
