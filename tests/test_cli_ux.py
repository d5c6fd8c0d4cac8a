"""What users trip over on the CLI: α = 0, the storage line, library log noise (issue 14, point 9)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from tswitch_ray.cli import ALPHA_ZERO_WARNING, _bytes, app
from tswitch_ray.library_logs import RAY_AUTH_LOGGER, quiet_library_logs


@pytest.fixture
def small_zoo(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    base = {"enc.weight": torch.randn(64, 48), "enc.bias": torch.randn(64), "head.weight": torch.randn(10, 64)}
    save_file(base, str(tmp_path / "base.safetensors"))
    for t in ("alpha_task", "beta_task"):
        save_file({k: v + 0.01 * torch.randn_like(v) for k, v in base.items()}, str(tmp_path / f"{t}.safetensors"))
    (tmp_path / "zoo.yaml").write_text("name: small\nbase: base.safetensors\ntasks:\n"
                                       "  - {name: alpha_task, uri: alpha_task.safetensors}\n"
                                       "  - {name: beta_task, uri: beta_task.safetensors}\n")
    return tmp_path / "zoo.yaml"


def test_alpha_zero_is_said_to_be_lossy_in_help_and_warned_about(small_zoo: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["build", "--help"], env={"COLUMNS": "200"}, terminal_width=200)
    assert "α = 0 is not lossless: every changed element becomes θ0 ± knob" in " ".join(res.output.replace("│", " ").split())

    out = tmp_path / "switches"
    res = CliRunner().invoke(app, ["build", "--zoo", str(small_zoo), "--out", str(out), "--alpha", "0", "--alpha", "0.6",
                                   "--executor", "local", "-q"], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert " ".join(ALPHA_ZERO_WARNING.split()) in " ".join(res.stderr.split())
    assert "θ0 ± knob" in ALPHA_ZERO_WARNING and "not lossless" in ALPHA_ZERO_WARNING

    # the storage line: one row per α and the total, each with its own fp32 reference
    manifest = json.loads((out / "manifest.json").read_text())
    per_alpha = {a: sum(s["encoded_bytes"] for s in manifest["switches"] if s["alpha"] == a) for a in (0.0, 0.6)}
    assert min(per_alpha.values()) > 0 and sum(per_alpha.values()) == manifest["totals"]["encoded_bytes"]
    lines = [" ".join(ln.replace("│", " ").split()) for ln in res.stdout.splitlines()]
    rows = {ln.split(" ", 2)[1]: ln for ln in lines if ln.startswith("storage ")}
    assert set(rows) == {"α=0", "α=0.6", "total"}, lines
    fp32 = 2 * (64 * 48 + 64 + 10 * 64) * 4  # 2 tasks' fp32 task vectors, per α
    for a, key in ((0.0, "α=0"), (0.6, "α=0.6")):
        assert f"{_bytes(per_alpha[a])} = {100 * per_alpha[a] / fp32:.2f} % of {_bytes(fp32)} fp32" in rows[key], rows[key]
    total = sum(per_alpha.values())
    assert f"{_bytes(total)} = {100 * total / (2 * fp32):.2f} % of {_bytes(2 * fp32)}" in rows["total"], rows["total"]

    # no warning when α = 0 is not asked for
    res = CliRunner().invoke(app, ["build", "--zoo", str(small_zoo), "--out", str(tmp_path / "s2"), "--alpha", "0.6",
                                   "--executor", "local", "-q"])
    assert res.exit_code == 0 and "lossless" not in res.stderr


def test_library_notices_are_hidden_unless_verbose(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    for var in ("RAY_LOGGER_LEVEL", "MLFLOW_LOGGING_LEVEL"):
        monkeypatch.delenv(var, raising=False)
    quiet_library_logs(verbose=True)  # --verbose: nothing changes
    import os

    assert "RAY_LOGGER_LEVEL" not in os.environ and "MLFLOW_LOGGING_LEVEL" not in os.environ
    monkeypatch.setenv("MLFLOW_LOGGING_LEVEL", "DEBUG")  # a user's own choice is kept
    quiet_library_logs(verbose=False)
    assert os.environ["RAY_LOGGER_LEVEL"] == "warning" and os.environ["MLFLOW_LOGGING_LEVEL"] == "DEBUG"

    auth = logging.getLogger(RAY_AUTH_LOGGER)
    with caplog.at_level(logging.WARNING, logger=RAY_AUTH_LOGGER):
        auth.warning("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.")
        auth.warning("Token authentication is disabled for this Ray cluster. Anyone with network access ...")
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and msgs[0].startswith("Token authentication is disabled")  # the security warning stays
    quiet_library_logs(verbose=False)
    assert len(auth.filters) == 1  # idempotent
