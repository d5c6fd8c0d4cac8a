"""The cut rules of docs/MATH.md "Cut rules": "authors" (the default of scope tensor) against an independent
transcription of the authors' code, "exact" unchanged, and the option end to end (config, CLI, manifest,
registry, resume key).

The transcription below copies lfy-123/Binary-Task-Switch merge_vit/merge_vit.py line for line
(``process_matrix``, called by ``drop_elements_separately``, then ``binarize_matrix``) in plain torch,
torch.topk included. It knows nothing of the product: the only thing shared is the task vector's
definition, τ = θt − θ0 in float32 (docs/MATH.md "Task vectors"; the authors subtract in the
checkpoint dtype, which may round τ itself, a difference of τ, not of the cut). It runs on that τ
widened to float64 (exact), so that its knob ‖τ⊙M‖₂ / ‖M⊙S‖₂ is a reference to 1e-6 and better.

The zoos are fp16 (safetensors) and bf16 (torch.save) checkpoints with the tensors of a ViT block,
so their task vectors are full of ties (a LayerNorm weight near 1.0 moves in steps of 2^-10 in fp16,
2^-7 in bf16), plus tensors small enough that int(n·(1−α)) = 0 at some α.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from tswitch_ray.artifacts import ArtifactReader
from tswitch_ray.artifacts.integrity import manifest_digest
from tswitch_ray.artifacts.registry import Registry
from tswitch_ray.cli import app
from tswitch_ray.distributed.build import BuildConfig, run_build
from tswitch_ray.errors import ArtifactError, ConfigError
from tswitch_ray.switch.binarize import binarize, kept_stats, knob
from tswitch_ray.switch.thresholds import (
    below,
    cut_rank,
    keep_count,
    resolve_cut,
    tensor_thresholds,
)

TASKS = ("cars", "dtd", "eurosat")
# Several α with int(n·(1−α)) = 0 on the small tensors: 0.9 on a sign of 10 (int(0.9999999999999998) = 0),
# 0.6 on a sign of 2, 0.99 on every sign under 100.
ALPHAS = [0.0, 0.3, 0.5, 0.6, 0.8, 0.9, 0.99]
LAYOUT: dict[str, tuple[int, ...]] = {
    "patch_embed.weight": (48, 3, 2, 2),
    "blocks.0.norm1.weight": (48,),
    "blocks.0.norm1.bias": (48,),
    "blocks.0.attn.qkv.weight": (144, 48),
    "blocks.0.attn.qkv.bias": (144,),
    "blocks.0.mlp.fc1.weight": (96, 48),
    "cls_token": (1, 1, 48),
    "head.tiny": (5,),
    "head.pair": (3,),
    "logit_scale": (),
}


# --- the authors' code, transcribed ------------------------------------------------------------------

def authors_process_matrix(matrix: torch.Tensor, k: float) -> tuple[torch.Tensor, torch.Tensor]:
    """merge_vit.py ``process_matrix`` (its logging left out)."""
    if k > 1:
        k = k / 100
    positive_matrix = torch.where(matrix > 0, matrix, torch.zeros_like(matrix))
    negative_matrix = torch.where(matrix < 0, matrix, torch.zeros_like(matrix))

    positive_non_zero = positive_matrix[positive_matrix != 0]
    if len(positive_non_zero) > 0:
        num_elements_to_keep = int(len(positive_non_zero) * (1 - k))
        if num_elements_to_keep > 0:
            positive_threshold = torch.topk(positive_non_zero, num_elements_to_keep, largest=True).values.min()
            positive_matrix = torch.where(positive_matrix >= positive_threshold, positive_matrix,
                                          torch.zeros_like(positive_matrix))

    negative_abs_matrix = torch.abs(negative_matrix)
    negative_non_zero = negative_abs_matrix[negative_abs_matrix != 0]
    if len(negative_non_zero) > 0:
        num_elements_to_keep = int(len(negative_non_zero) * (1 - k))
        if num_elements_to_keep > 0:
            negative_threshold = torch.topk(negative_non_zero, num_elements_to_keep, largest=True).values.min()
            negative_matrix = torch.where(negative_abs_matrix >= negative_threshold, negative_matrix,
                                          torch.zeros_like(negative_matrix))
    return positive_matrix, negative_matrix


def authors_switch(difference_matrix: torch.Tensor, drop_ratio: float) -> tuple[torch.Tensor, float]:
    """``drop_elements_separately`` then ``binarize_matrix`` for one tensor: (mask, scaling factor).

    A 0-dim tensor is kept whole and never binarized by the authors; an all-zero one is skipped (knob 0 here)."""
    if difference_matrix.dim() >= 1:
        positive, negative = authors_process_matrix(difference_matrix, drop_ratio)
        differ = positive + negative
    else:
        differ = difference_matrix
    if torch.all(differ.eq(0)):
        return torch.zeros(differ.shape, dtype=torch.bool), 0.0
    binary_matrix = torch.where(differ > 0, 1.0, torch.where(differ < 0, -1.0, 0.0)).to(differ.dtype)
    scaling_factor = torch.norm(differ, p=2) / torch.norm(binary_matrix, p=2)
    return differ != 0, float(scaling_factor)


def exact_switch(tau: torch.Tensor, alpha: float) -> torch.Tensor:
    """The rule "exact" (docs/MATH.md): d = floor(α·n); kept = strictly above the d-th smallest (kthvalue)."""
    flat = tau.reshape(-1)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    for sign in (1.0, -1.0):
        side = flat * sign
        values = side[side > 0]
        d = math.floor(alpha * values.numel())
        t = torch.kthvalue(values, d).values if d > 0 else torch.zeros((), dtype=flat.dtype)
        mask |= side > t
    return mask.reshape(tau.shape)


# --- the zoos ------------------------------------------------------------------------------------------

def zoo_states(dtype: torch.dtype, seed: int = 5) -> dict[str, dict[str, torch.Tensor]]:
    """Base and fine-tuned checkpoints in ``dtype``: weights ~ N(0, 0.02), norm weights near 1, small deltas."""
    g = torch.Generator().manual_seed(seed)
    base = {}
    for name, shape in LAYOUT.items():
        w = 0.02 * torch.randn(shape, generator=g)
        if name.endswith("norm1.weight") or name == "logit_scale":
            w = w + 1.0
        base[name] = w.to(dtype)
    states = {"base": base}
    for i, task in enumerate(TASKS):
        delta_scale = 2e-3 * (i + 1)
        states[task] = {n: (t.float() + delta_scale * torch.randn(t.shape, generator=g)).to(dtype)
                        for n, t in base.items()}
    return states


def write_zoo(folder: Path, states: dict[str, dict[str, torch.Tensor]], fmt: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    uris = {}
    for who, sd in states.items():
        if fmt == "safetensors":
            save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / f"{who}.safetensors"))
            uris[who] = f"{who}.safetensors"
        else:
            torch.save(sd, str(folder / f"{who}.pt"))
            uris[who] = f"{who}.pt"
    manifest = {"name": f"cut-{fmt}", "base": uris["base"], "tasks": [{"name": t, "uri": uris[t]} for t in TASKS]}
    path = folder / "zoo.yaml"
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return path


def read_back(folder: Path, fmt: str) -> dict[str, dict[str, torch.Tensor]]:
    """The checkpoints as their own libraries read them (never through tswitch_ray)."""
    if fmt == "safetensors":
        return {w: load_file(str(folder / f"{w}.safetensors")) for w in ("base", *TASKS)}
    return {w: torch.load(str(folder / f"{w}.pt"), weights_only=True) for w in ("base", *TASKS)}


def taus(states: dict[str, dict[str, torch.Tensor]], task: str) -> dict[str, torch.Tensor]:
    """τ = θt − θ0 in float32, then widened to float64 (exactly) for the transcription."""
    return {n: (states[task][n].float() - states["base"][n].float()).double() for n in LAYOUT}


@pytest.fixture(scope="module", params=[(torch.float16, "safetensors"), (torch.bfloat16, "pt")],
                ids=["fp16-safetensors", "bf16-torch-save"])
def zoo(request, tmp_path_factory):
    dtype, fmt = request.param
    folder = tmp_path_factory.mktemp(f"zoo-{fmt}")
    path = write_zoo(folder, zoo_states(dtype), fmt)
    return path, read_back(folder, fmt)


def _build(zoo_yaml: Path, out: Path, **kw) -> ArtifactReader:
    run_build(BuildConfig(zoo=str(zoo_yaml), out=str(out), alphas=ALPHAS, executor="local", show_progress=False,
                          **kw))
    return ArtifactReader(str(out))


# --- fidelity ------------------------------------------------------------------------------------------

def test_default_build_equals_the_authors_code(zoo, tmp_path):
    """The default build (scope tensor, cut authors): 0 mask elements differ from the authors' code on every
    task, α and tensor, knobs within 1e-6 relative; the whole-sign case (int(n·(1−α)) = 0) is exercised."""
    zoo_yaml, states = zoo
    reader = _build(zoo_yaml, tmp_path / "sw")
    assert (reader.scope, reader.cut) == ("tensor", "authors")
    differing = compared = whole_sign = ties_kept = 0
    for task in TASKS:
        tau = taus(states, task)
        for alpha in ALPHAS:
            switches = {name: (mask, positive, lam) for name, mask, positive, lam in reader.iter_switches(task, alpha)}
            assert set(switches) == set(LAYOUT)
            for name, t in tau.items():
                want_mask, want_knob = authors_switch(t, alpha)
                mask, positive, lam = switches[name]
                differing += int(np.count_nonzero(mask != want_mask.numpy()))
                compared += mask.size
                assert lam == pytest.approx(want_knob, rel=1e-6, abs=0.0), (task, alpha, name)
                np.testing.assert_array_equal(positive[mask], (t > 0).numpy()[mask])
                n_pos = int((t > 0).sum())
                whole_sign += int(n_pos > 0 and alpha > 0 and int(n_pos * (1 - alpha)) == 0)
                ties_kept += int(mask.sum()) - int(exact_switch(t, alpha).sum())
    assert differing == 0 and compared > 0
    assert whole_sign >= 10  # the small tensors at the large α keep a whole sign, as the authors' code does
    assert ties_kept > 100  # many more elements than the one-per-sign of distinct values: the ties mattered


def test_exact_build_is_unchanged_and_differs_from_the_authors(zoo, tmp_path):
    """cut exact: floor(α·n) dropped, ties at the cut dropped (kthvalue reference), 0 elements differ;
    on these tie-heavy zoos it does differ from the authors' code, so the fidelity test above is not vacuous."""
    zoo_yaml, states = zoo
    reader = _build(zoo_yaml, tmp_path / "sw", cut="exact")
    assert reader.cut == "exact"
    off_authors = 0
    for task in TASKS:
        tau = taus(states, task)
        for alpha in ALPHAS:
            for name, mask, _, lam in reader.iter_switches(task, alpha):
                t = tau[name]
                want = exact_switch(t, alpha).numpy()
                np.testing.assert_array_equal(mask, want, err_msg=f"{task} {alpha} {name}")
                kept = t.abs()[torch.from_numpy(want)]
                assert lam == pytest.approx(math.sqrt(float((kept * kept).sum()) / kept.numel()) if kept.numel()
                                            else 0.0, rel=1e-12)
                off_authors += int(np.count_nonzero(mask != authors_switch(t, alpha)[0].numpy()))
    assert off_authors > 100


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 2, 3, 5, 10, 11, 37, 1000, 4099])
def test_tensor_thresholds_authors_on_tie_heavy_tensors(dtype, n):
    """The pure functions (thresholds, binarize, kept stats, knob) against the transcription, any size."""
    g = torch.Generator().manual_seed(n)
    base = (1.0 + 0.02 * torch.randn(n, generator=g)).to(dtype)
    theta = (base.float() + 3e-3 * torch.randn(n, generator=g)).to(dtype)
    tau = theta.float() - base.float()
    ths = tensor_thresholds(tau, ALPHAS, cut="authors")
    for th in ths:
        mask, _ = binarize(tau, th)
        want_mask, want_knob = authors_switch(tau.double(), th.alpha)
        assert torch.equal(mask, want_mask), (n, th)
        assert knob(kept_stats(tau, mask)) == pytest.approx(want_knob, rel=1e-12, abs=0.0)
        assert th.cut == "authors"


def test_cut_rank_keep_count_and_below():
    # K = int(n·(1−α)) in float64, as the authors' expression: n = 10, α = 0.8 keeps 1, α = 0.9 keeps all.
    assert keep_count(10, 0.8) == 1 and keep_count(10, 0.9) == 0 and keep_count(10, 0.5) == 5
    assert cut_rank(10, 0.8, "authors") == (9, 10)  # the largest value is the cut
    assert cut_rank(10, 0.9, "authors") == (0, 0)  # K = 0: the whole sign is kept
    assert cut_rank(10, 0.0, "authors") == (0, 0)  # K = n: nothing to select either
    assert cut_rank(0, 0.5, "authors") == (0, 0)
    assert cut_rank(10, 0.9, "exact") == (9, 9) and cut_rank(10, 0.8, "exact") == (8, 8)
    c = np.float32(1e-3)
    assert np.float32(below(float(c))) < c and np.nextafter(np.float32(below(float(c))), np.float32(1)) == c
    assert below(float(np.float32(1e-45))) == 0.0  # below the smallest subnormal: 0, so τ > 0 keeps it
    with pytest.raises(ConfigError, match="not one of"):
        cut_rank(10, 0.5, "ties")


def test_resolve_cut_defaults_per_scope_and_refuses_authors_for_model():
    assert resolve_cut(None, "tensor") == "authors" and resolve_cut(None, "model") == "exact"
    assert resolve_cut("exact", "tensor") == "exact"
    with pytest.raises(ConfigError, match="needs scope 'tensor'.*no model-wide cut"):
        resolve_cut("authors", "model")
    assert BuildConfig(zoo="z", out="o").cut == "authors"
    assert BuildConfig(zoo="z", out="o", scope="model").cut == "exact"
    with pytest.raises(ConfigError, match="needs scope 'tensor'"):
        BuildConfig(zoo="z", out="o", scope="model", cut="authors")


def test_merge_methods_take_the_cut():
    from tswitch_ray.methods import get_method

    assert get_method("tswitch").cut == "authors" and get_method("pdiscard").cut == "authors"
    assert get_method("tswitch", scope="model").cut == "exact"
    assert get_method("pdiscard", cut="exact").cut == "exact"
    with pytest.raises(ConfigError, match="needs scope 'tensor'"):
        get_method("tswitch", scope="model", cut="authors")


# --- the option end to end -------------------------------------------------------------------------------

def cli(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_cli_flag_manifest_registry_and_resume_key(tmp_path):
    """--cut is recorded in the manifest and the registry; a set of another cut is another artifact (refused
    without --overwrite, rebuilt with it); an identical rerun reuses the committed set."""
    zoo_yaml = write_zoo(tmp_path / "zoo", zoo_states(torch.float16), "safetensors")
    out = tmp_path / "sw"
    base = ["build", "--zoo", zoo_yaml, "--out", out, "--alpha", 0.6, "--executor", "local", "-q"]
    r = cli(*base)
    assert r.exit_code == 0, r.output
    assert "tensor, authors" in r.output
    first = json.loads((out / "manifest.json").read_text())
    assert first["cut"] == "authors"
    r = cli(*base, "--cut", "exact")
    assert r.exit_code == 2 and "error:" in r.output, r.output
    assert json.loads((out / "manifest.json").read_text()) == first  # refused before any work
    r = cli(*base, "--cut", "authors")  # the default given explicitly: the same artifact
    assert r.exit_code == 0, r.output
    assert json.loads((out / "manifest.json").read_text())["run_key"] == first["run_key"]
    r = cli(*base, "--cut", "exact", "--overwrite")
    assert r.exit_code == 0, r.output
    second = json.loads((out / "manifest.json").read_text())
    assert second["cut"] == "exact" and second["run_key"] != first["run_key"]
    rows = Registry(str(tmp_path)).query("SELECT name, scope, cut FROM artifacts").to_pylist()
    assert rows == [{"name": "sw", "scope": "tensor", "cut": "exact"}]

    r = cli(*base, "--scope", "model", "--cut", "authors")
    assert r.exit_code == 2 and "error:" in r.output and "needs scope 'tensor'" in r.output
    assert "Traceback" not in r.output
    assert "--cut" in cli("build", "--help").output


def test_manifest_without_cut_reads_as_exact(tmp_path):
    """Sets committed before the field existed: readers and the registry say "exact", nothing breaks."""
    zoo_yaml = write_zoo(tmp_path / "zoo", zoo_states(torch.bfloat16), "pt")
    out = tmp_path / "old"
    run_build(BuildConfig(zoo=str(zoo_yaml), out=str(out), alphas=[0.5], cut="exact", executor="local",
                          show_progress=False))
    path = out / "manifest.json"
    body = json.loads(path.read_text())
    del body["cut"], body["manifest_sha256"]
    body["manifest_sha256"] = manifest_digest(body)
    path.write_text(json.dumps(body))
    reader = ArtifactReader(str(out))
    assert reader.cut == "exact"
    assert sum(int(m.sum()) for _, m, _, _ in reader.iter_switches("cars", 0.5)) > 0
    assert Registry(str(tmp_path)).query("SELECT cut FROM artifacts").to_pylist() == [{"cut": "exact"}]


def test_manifest_with_authors_cut_and_model_scope_is_refused(tmp_path):
    zoo_yaml = write_zoo(tmp_path / "zoo", zoo_states(torch.float16), "safetensors")
    out = tmp_path / "sw"
    run_build(BuildConfig(zoo=str(zoo_yaml), out=str(out), alphas=[0.5], scope="model", executor="local",
                          show_progress=False))
    path = out / "manifest.json"
    body = json.loads(path.read_text())
    assert body["cut"] == "exact"
    body["cut"] = "authors"
    del body["manifest_sha256"]
    body["manifest_sha256"] = manifest_digest(body)
    path.write_text(json.dumps(body))
    with pytest.raises(ArtifactError, match="field 'cut' is 'authors' but field 'scope' is 'model'"):
        ArtifactReader(str(out))
