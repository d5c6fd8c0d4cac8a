"""A real pretrained model end to end: the silero-vad wheel's network, fine-tuned here, through build → merge → eval.

The base is the voice-activity model that the ``silero-vad`` package ships as
safetensors (nothing is downloaded); the four tasks are real package data
(sklearn digits, scikit-image textures and photos, matplotlib's fonts) read
as signals. The module fixture runs the console script exactly as
docs/RESULTS.md does: ``zoo real``, ``build``, ``merge``, ``eval`` with a
local MLflow store.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("silero_vad")

from tswitch_ray.eval.adapters.silero import (
    SileroVAD,
    SileroVADAdapter,
    checkpoint_to_module_key,
    packaged_weights_path,
    signals_from_images,
)
from tswitch_ray.io.safetensors import read_safetensors

TSWITCH = Path(sys.executable).parent / "tswitch"
METHODS = [
    {"method": "base", "label": "Base"},
    {"method": "individual", "label": "Individual"},
    {"method": "ta", "options": {"scale": 0.3}, "label": "TA"},
    {"method": "ties", "options": {"k": 20.0, "scale": 0.3}, "label": "TIES"},
    {"method": "emr", "label": "EMR"},
    {"method": "tswitch", "alpha": 0.6, "label": "T-Switch"},
    {"method": "autoswitch", "alpha": 0.6, "options": {"k": 10, "examples_per_task": 50}, "label": "Auto-Switch"},
    {"method": "wemoe", "options": {"router_init_std": 0.01, "tta_steps": 40}, "label": "WEMoE"},
]


def _run(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(TSWITCH), *args], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"tswitch {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("real-model")
    zoo = root / "zoo" / "zoo.yaml"
    procs = {"zoo": _run("zoo", "real", "--out", str(root / "zoo"))}
    procs["build"] = _run("build", "--zoo", str(zoo), "--out", str(root / "switches"), "--alpha", "0.6", "--workers", "2")
    procs["merge"] = _run("merge", "--zoo", str(zoo), "--method", "ties", "--out", str(root / "merged"),
                          "-O", "k=20", "-O", "scale=0.3", "--workers", "2")
    cfg = {"name": "real-test", "zoo": str(zoo), "artifacts": str(root / "switches"), "work_dir": str(root / "eval"),
           "tracking": {"uri": str(root / "mlruns"), "experiment": "real-test"}, "methods": METHODS}
    (root / "eval.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True))
    procs["eval"] = _run("eval", str(root / "eval.yaml"), "--workers", "2")
    return {"root": root, "procs": procs}


@pytest.mark.slow
def test_finetuned_tasks_beat_the_pretrained_base_on_their_own_data(real_run):
    report = json.loads((real_run["root"] / "zoo" / "zoo_report.json").read_text())
    assert set(report["tasks"]) == {"digits", "textures", "scenes", "glyphs"}
    for task, r in report["tasks"].items():
        assert r["finetuned_accuracy"] >= r["base_accuracy"] + 0.03, (task, r)
    # the zoo's base is the wheel's file, unchanged
    base, _ = read_safetensors(str(real_run["root"] / "zoo" / "base.safetensors"))
    shipped, _ = read_safetensors(packaged_weights_path())
    assert base.keys() == shipped.keys() and all(torch.equal(base[k], shipped[k]) for k in base)


@pytest.mark.slow
def test_every_method_scores_sanely_and_is_logged_to_mlflow(real_run):
    from mlflow.tracking import MlflowClient

    root = real_run["root"]
    summary = {s["label"]: s for s in json.loads((root / "eval" / "summary.json").read_text())}
    assert set(summary) == {m["label"] for m in METHODS}
    report = json.loads((root / "zoo" / "zoo_report.json").read_text())
    chance = float(np.mean([1.0 / r["n_classes"] for r in report["tasks"].values()]))
    for label, s in summary.items():
        assert set(s["per_task"]) == set(report["tasks"]), label
        assert all(0.0 <= a <= 1.0 for a in s["per_task"].values()), label
        assert s["average"] > chance, (label, s["average"], chance)
    for task, r in report["tasks"].items():  # the eval path reproduces the zoo's own measurement
        assert summary["Individual"]["per_task"][task] == pytest.approx(r["finetuned_accuracy"], abs=1e-9)
        assert summary["Base"]["per_task"][task] == pytest.approx(r["base_accuracy"], abs=1e-9)
    ind = summary["Individual"]["average"]
    for label in ("TA", "TIES", "EMR", "T-Switch", "Auto-Switch", "WEMoE"):
        assert summary[label]["average"] <= ind + 0.02, label  # no merge beats the fine-tuned models by much
    # T-Switch keeps most of what fine-tuning gained, and beats Task Arithmetic on this zoo (measured: 69.6 vs 48.3)
    assert summary["T-Switch"]["average"] > summary["TA"]["average"] + 0.05
    assert summary["T-Switch"]["average"] > summary["Base"]["average"] + 0.05

    store = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=store)
    exp = client.get_experiment_by_name("real-test")
    runs = client.search_runs([exp.experiment_id])
    logged = {r.data.params.get("label"): r.data.metrics for r in runs if "label" in r.data.params}
    for label, s in summary.items():
        assert logged[label]["avg_accuracy"] == pytest.approx(s["average"]), label


@pytest.mark.slow
def test_merged_output_loads_strictly_into_the_architecture(real_run):
    merged = sorted((real_run["root"] / "merged").glob("*.safetensors"))
    assert [p.name for p in merged] == ["merged.safetensors"]
    sd, _ = read_safetensors(str(merged[0]))
    net = SileroVAD()
    net.load_state_dict({checkpoint_to_module_key(k): v for k, v in sd.items()}, strict=True)
    x = torch.randn(4, 576)
    assert torch.isfinite(net(x)).all() and torch.isfinite(net.features(x)).all()


@pytest.mark.slow
def test_the_cli_shows_no_ray_token_notice_nor_mlflow_info_lines(real_run):
    for step in ("build", "merge", "eval"):
        err = real_run["procs"][step].stderr
        assert "Token authentication" not in err, (step, err[-2000:])
        assert " INFO " not in err and "INFO mlflow" not in err, (step, err[-2000:])


# ---------------------------------------------------------------- fast: the architecture and the adapter


def test_the_transcribed_architecture_equals_the_packages_own_model():
    """Our torch module, given the weights of the package's TorchScript model, gives its outputs."""
    from silero_vad import load_silero_vad

    jit = load_silero_vad()  # the package's own model, the reference
    js = {k[len("_model."):]: v for k, v in jit.state_dict().items() if k.startswith("_model.")}
    names = {"stft_conv.weight": "stft.forward_basis_buffer", "final_conv.weight": "decoder.decoder.2.weight",
             "final_conv.bias": "decoder.decoder.2.bias"}
    names.update({f"lstm_cell.{p}": f"decoder.rnn.{p}" for p in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")})
    names.update({f"conv{i + 1}.{p}": f"encoder.{i}.reparam_conv.{p}" for i in range(4) for p in ("weight", "bias")})
    net = SileroVADAdapter(heads={}).build({ours: js[theirs] for ours, theirs in names.items()})
    torch.manual_seed(0)
    x = 0.1 * torch.randn(3, 512)
    ref = []
    for i in range(3):
        jit.reset_states()
        ref.append(float(jit(x[i : i + 1], 16000)))
    with torch.no_grad():
        got = net(torch.cat([torch.zeros(3, 64), x], dim=1))  # the package prepends 64 samples of context
    torch.testing.assert_close(got, torch.tensor(ref), rtol=1e-4, atol=1e-6)


def test_the_packaged_weights_load_strictly_and_the_adapter_reads_images_as_signals():
    sd, _ = read_safetensors(packaged_weights_path())
    ad = SileroVADAdapter(heads={})
    net = ad.build(sd)
    assert sum(v.numel() for v in sd.values()) == sum(p.numel() for p in net.parameters()) == 309633
    with pytest.raises(Exception, match="missing"):
        ad.build({k: v for k, v in sd.items() if k != "conv2.weight"})
    from PIL import Image

    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (5, 24, 24, 3), dtype=np.uint8)
    x = ad.collate([Image.fromarray(a) for a in imgs])
    assert x.shape == (5, 576)
    torch.testing.assert_close(x, signals_from_images(imgs), atol=2 / 127.5, rtol=0)  # PIL's luma rounds to uint8
    assert torch.allclose(x.mean(dim=1), torch.zeros(5), atol=1e-6)
    assert net.features(x).shape == (5, 128)


def test_wemoe_upscales_the_declared_encoder():
    from tswitch_ray.eval.wemoe_eval import find_mlp_paths
    from tswitch_ray.methods.wemoe import _first_linear_in_features

    net = SileroVAD()
    assert find_mlp_paths(net) == ["encoder"]
    assert _first_linear_in_features(net.encoder) == 129
    tokens = torch.randn(2, 4, 129)
    single = torch.stack([net.encoder(t) for t in tokens])
    torch.testing.assert_close(net.encoder(tokens), single)  # the per-example call WEMoE makes under vmap


@pytest.mark.slow
def test_rerunning_zoo_real_reuses_the_cached_build(real_run):
    manifest = real_run["root"] / "zoo" / "zoo.yaml"
    stamps = {p: p.stat().st_mtime_ns for p in (real_run["root"] / "zoo").rglob("*") if p.is_file()}
    proc = _run("zoo", "real", "--out", str(real_run["root"] / "zoo"))
    assert proc.stdout.strip().endswith(str(manifest).split("/")[-1]) and "finetune" not in proc.stderr
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
