"""`tswitch build` then `tswitch reconstruct` through the real CLI, checked against plain NumPy.

The reference below knows nothing of the product: it recomputes the math of
docs/MATH.md ("Task vectors", "Thresholds (P-Discard cut)", "Switches and
knobs", "Reconstruction") from the tensors this test wrote (task vector in fp32; the
cut "authors" of scope tensor, the K = int(n·(1−α)) largest of each sign and the
ties with the K-th, all of a sign when K = 0, or the cut "exact", d = floor(α·n)
with the d-th smallest value and a strict comparison; rms/mean knob over the tensor or the whole task vector,
θ0 + λ·M⊙S in fp32, cast back to θ0's dtype) and compares every reconstructed
tensor to 1e-6 relative. Zoos are tiny and builds use ``--executor local``
(the Ray path is checked byte for byte against it in test_distributed_build).
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

from tswitch_ray.cli import app
from tswitch_ray.zoo import save_sharded

ALPHAS = (0.0, 0.5, 0.9)
TASKS = ("cars", "dtd")

# name -> (shape, dtype); mixed dtypes, a scalar, ties and exact zeros, one non-float buffer.
LAYOUT: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
    "embed.weight": ((40, 24), torch.float32),
    "blocks.0.attn.weight": ((24, 24), torch.float32),
    "blocks.0.attn.bias": ((24,), torch.float16),
    "blocks.1.mlp.weight": ((48, 24), torch.bfloat16),
    "blocks.1.mlp.bias": ((48,), torch.float32),
    "head.scale": ((), torch.float32),
    "blocks.2.gate": ((0,), torch.float32),  # a zero-element tensor: empty switches, nothing to rebuild
    "position_ids": ((1, 16), torch.int64),
}


def cli(*args: object):
    """Invoke the `tswitch` typer app in-process; a bug (non-user error) raises here."""
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


# --- zoo making -------------------------------------------------------------------

def make_state(seed: int) -> dict[str, dict[str, torch.Tensor]]:
    """Base and task state dicts. Task vectors are heavy-tailed, with exact zeros and many ties."""
    g = torch.Generator().manual_seed(seed)
    base: dict[str, torch.Tensor] = {}
    for name, (shape, dtype) in LAYOUT.items():
        if dtype.is_floating_point:
            base[name] = (0.02 * torch.randn(shape, generator=g)).to(dtype)
        else:
            base[name] = torch.arange(math.prod(shape), dtype=dtype).reshape(shape)
    states = {"base": base}
    for i, task in enumerate(TASKS):
        sd = {}
        for name, t in base.items():
            if not t.is_floating_point():
                sd[name] = t.clone()
                continue
            tau = torch.randn(t.shape, generator=g) / torch.rand(t.shape, generator=g).clamp_min(0.05)
            tau = tau * 1e-3 * (i + 1)
            if name == "blocks.0.attn.weight":
                tau = torch.round(tau / 1e-3) * 1e-3  # many ties at every threshold
            if name == "embed.weight":
                tau[torch.rand(t.shape, generator=g) < 0.3] = 0.0  # exact zeros: never kept
            sd[name] = (t.float() + tau).to(t.dtype)
        states[task] = sd
    return states


def write_zoo(folder: Path, states: dict[str, dict[str, torch.Tensor]], fmt: str) -> Path:
    """Write base + tasks as single .safetensors, sharded HF folders or .pt state dicts; returns zoo.yaml."""
    folder.mkdir(parents=True, exist_ok=True)
    uris = {}
    for who, sd in states.items():
        if fmt == "safetensors":
            save_file(sd, str(folder / f"{who}.safetensors"))
            uris[who] = f"{who}.safetensors"
        elif fmt == "sharded":
            save_sharded(sd, str(folder / who), max_shard_bytes=3000)  # several shards + index
            assert (folder / who / "model.safetensors.index.json").exists()
            uris[who] = who
        elif fmt == "pt":
            torch.save(sd, str(folder / f"{who}.pt"))
            uris[who] = f"{who}.pt"
        else:
            raise AssertionError(fmt)
    manifest = {"name": f"tiny-{fmt}", "base": uris["base"], "tasks": [{"name": t, "uri": uris[t]} for t in TASKS]}
    path = folder / "zoo.yaml"
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return path


# --- the independent reference ------------------------------------------------------

def _f32(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.float32).numpy()


def _threshold(magnitudes: np.ndarray, alpha: float, cut: str) -> tuple[np.float32, bool]:
    """(t, inclusive): a magnitude m of the sign is kept when m > t, or m >= t if inclusive.

    "exact": d = floor(α·n); 0 if d = 0, else the d-th smallest (1-based). "authors": K = int(n·(1−α))
    largest and their ties, i.e. m >= the K-th largest; all of the sign when K = 0."""
    n = magnitudes.size
    if cut == "authors":
        k = int(n * (1 - alpha))
        return (np.float32(0.0), False) if k == 0 else (np.sort(magnitudes)[n - k], True)
    d = math.floor(alpha * n)
    return (np.float32(0.0) if d == 0 else np.sort(magnitudes)[d - 1]), False


def _keep(m: np.ndarray, th: tuple[np.float32, bool]) -> np.ndarray:
    return (m >= th[0]) & (m > 0) if th[1] else m > th[0]


def reference(states, task: str, alpha: float, scope: str, knob: str, cut: str | None = None
              ) -> tuple[dict[str, torch.Tensor], dict]:
    """θ0 + λ·M⊙S for every tensor, plus per-group knobs, in plain NumPy (cut: the scope's default if None)."""
    cut = cut or ("authors" if scope == "tensor" else "exact")
    base, theta = states["base"], states[task]
    names = [n for n, t in base.items() if t.is_floating_point()]
    tau = {n: _f32(theta[n]) - _f32(base[n]) for n in names}
    groups = [[n] for n in names] if scope == "tensor" else [names]
    out: dict[str, torch.Tensor] = {n: base[n].clone() for n in base}
    knobs = {}
    for group in groups:
        flat = np.concatenate([tau[n].reshape(-1) for n in group])
        t_pos = _threshold(flat[flat > 0], alpha, cut)
        t_neg = _threshold(-flat[flat < 0], alpha, cut)
        masks = {n: _keep(tau[n], t_pos) | _keep(-tau[n], t_neg) for n in group}
        kept = np.concatenate([np.abs(tau[n][masks[n]]).astype(np.float64) for n in group])
        if kept.size == 0:
            lam = 0.0
        elif knob == "rms":
            lam = math.sqrt(float(np.sum(kept * kept)) / kept.size)
        else:
            lam = float(np.sum(kept)) / kept.size
        knobs[tuple(group)] = lam
        lam32 = np.float32(lam)
        for n in group:
            delta = np.where(masks[n], np.where(tau[n] > 0, lam32, -lam32), np.float32(0.0)).astype(np.float32)
            rebuilt = np.asarray(_f32(base[n]) + delta, dtype=np.float32)
            out[n] = torch.from_numpy(rebuilt).to(base[n].dtype)  # rounding to the storage dtype only
    return out, knobs


def assert_matches(path: Path, ref: dict[str, torch.Tensor]) -> None:
    got = load_file(str(path))  # the safetensors package's own reader, not ours
    assert set(got) == set(ref)
    for name, want in ref.items():
        have = got[name]
        assert have.dtype == want.dtype and have.shape == want.shape, name
        if want.is_floating_point():
            np.testing.assert_allclose(_f32(have), _f32(want), rtol=1e-6, atol=0, err_msg=name)
        else:
            assert torch.equal(have, want), name


def build_args(zoo: object, out: object, scope: str, knob: str, *extra: object) -> list[object]:
    args: list[object] = ["build", "--zoo", zoo, "--out", out, "--scope", scope, "--knob", knob,
                          "--executor", "local", "--quiet"]
    for a in ALPHAS:
        args += ["--alpha", a]
    return args + list(extra)


# --- round trips ------------------------------------------------------------------------

@pytest.mark.parametrize(
    "fmt,scope,knob,cut",
    [("safetensors", "tensor", "rms", None), ("sharded", "model", "rms", None), ("pt", "tensor", "mean", None),
     ("pt", "model", "mean", None), ("safetensors", "tensor", "rms", "exact")],
)
def test_build_then_reconstruct_matches_numpy(tmp_path, fmt, scope, knob, cut):
    states = make_state(seed=7)
    zoo = write_zoo(tmp_path / "zoo", states, fmt)
    out = tmp_path / "switches"
    r = cli(*build_args(zoo, out, scope, knob, *(["--cut", cut] if cut else [])))
    assert r.exit_code == 0, r.output
    assert "phases" in r.output and "encode" in r.output  # the run summary's per-phase wall times
    manifest = json.loads((out / "manifest.json").read_text())
    cut = cut or ("authors" if scope == "tensor" else "exact")
    assert manifest["scope"] == scope and manifest["knob_mode"] == knob and manifest["cut"] == cut
    assert manifest["alphas"] == list(ALPHAS) and manifest["tasks"] == list(TASKS)
    assert "position_ids" not in manifest["tensors"]  # integers have no task vector
    for task in TASKS:
        for alpha in ALPHAS:
            dst = tmp_path / f"{task}-{alpha}.safetensors"
            r = cli("reconstruct", "--artifacts", out, "--task", task, "--alpha", alpha, "--out", dst)
            assert r.exit_code == 0, r.output
            ref, knobs = reference(states, task, alpha, scope, knob, cut)
            assert_matches(dst, ref)
            if scope == "model":
                (lam,) = knobs.values()
                entry = [k for k in manifest["knobs"] if k["task"] == task and k["alpha"] == alpha]
                assert len(entry) == 1 and entry[0]["knob"] == pytest.approx(lam, rel=1e-12)


def test_round_trip_on_s3(tmp_path, s3_bucket):
    """Zoo, artifacts and one output on the local S3 server (moto); mixed checkpoint formats."""
    import s3fs

    bucket, opts = s3_bucket
    endpoint = opts["client_kwargs"]["endpoint_url"]
    states = make_state(seed=11)
    local = tmp_path / "zoo"
    local.mkdir()
    save_sharded(states["base"], str(local / "base"), max_shard_bytes=3000)
    save_file(states["cars"], str(local / "cars.safetensors"))
    torch.save(states["dtd"], str(local / "dtd.pt"))
    (local / "zoo.yaml").write_text(yaml.safe_dump(
        {"name": "s3-zoo", "base": "base", "tasks": [{"name": "cars", "uri": "cars.safetensors"},
                                                     {"name": "dtd", "uri": "./dtd.pt"}]}))
    fs = s3fs.S3FileSystem(**opts)
    fs.put(str(local) + "/", bucket.removeprefix("s3://") + "/zoo/", recursive=True)
    zoo, out = f"{bucket}/zoo/zoo.yaml", f"{bucket}/switches"
    s3 = ["--s3-endpoint", endpoint, "-S", "key=testing", "-S", "secret=testing"]

    r = cli(*build_args(zoo, out, "model", "rms", *s3))
    assert r.exit_code == 0, r.output
    fs.invalidate_cache()
    assert fs.exists(f"{out}/manifest.json")
    for task, dst in (("cars", str(tmp_path / "cars.safetensors")), ("dtd", f"{bucket}/rebuilt/dtd.safetensors")):
        r = cli("reconstruct", "--artifacts", out, "--task", task, "--alpha", 0.5, "--out", dst, *s3)
        assert r.exit_code == 0, r.output
        if dst.startswith("s3://"):
            fs.invalidate_cache()
            fs.get(dst, str(tmp_path / "fetched.safetensors"))
            dst = str(tmp_path / "fetched.safetensors")
        assert_matches(Path(dst), reference(states, task, 0.5, "model", "rms")[0])


def test_round_trip_s3_zoo_to_local_artifacts(tmp_path, s3_bucket):
    """s3:// storage options must not leak into local artifact and output paths."""
    import s3fs

    bucket, opts = s3_bucket
    states = make_state(seed=12)
    local = write_zoo(tmp_path / "zoo", states, "safetensors").parent
    fs = s3fs.S3FileSystem(**opts)
    fs.put(str(local) + "/", bucket.removeprefix("s3://") + "/z/", recursive=True)
    s3 = ["--s3-endpoint", opts["client_kwargs"]["endpoint_url"], "-S", "key=testing", "-S", "secret=testing"]
    out = tmp_path / "switches"
    r = cli(*build_args(f"{bucket}/z/zoo.yaml", out, "tensor", "rms", *s3))
    assert r.exit_code == 0, r.output
    dst = tmp_path / "dtd.safetensors"
    r = cli("reconstruct", "--artifacts", out, "--task", "dtd", "--alpha", 0.9, "--out", dst, *s3)
    assert r.exit_code == 0, r.output
    assert_matches(dst, reference(states, "dtd", 0.9, "tensor", "rms")[0])


# --- a task checkpoint replaced at the same URI (new fine-tune arrives) -------------------

def test_rebuild_after_task_checkpoint_replaced_uses_new_weights(tmp_path):
    states = make_state(seed=21)
    zoo = write_zoo(tmp_path / "zoo", states, "safetensors")
    out = tmp_path / "switches"
    assert cli(*build_args(zoo, out, "tensor", "rms")).exit_code == 0
    states["cars"] = make_state(seed=22)["cars"]  # a new fine-tune of 'cars' at the same URI
    save_file(states["cars"], str(zoo.parent / "cars.safetensors"))
    assert cli(*build_args(zoo, out, "tensor", "rms", "--overwrite")).exit_code == 0
    dst = tmp_path / "cars.safetensors"
    assert cli("reconstruct", "--artifacts", out, "--task", "cars", "--alpha", 0.5, "--out", dst).exit_code == 0
    assert_matches(dst, reference(states, "cars", 0.5, "tensor", "rms")[0])


def test_second_build_in_one_process_reads_the_current_files(tmp_path):
    states = make_state(seed=31)
    zoo = write_zoo(tmp_path / "zoo", states, "safetensors")
    assert cli(*build_args(zoo, tmp_path / "first", "tensor", "rms")).exit_code == 0
    states["cars"] = make_state(seed=32)["cars"]
    save_file(states["cars"], str(zoo.parent / "cars.safetensors"), metadata={"note": "x" * 1000})  # longer header
    r = cli(*build_args(zoo, tmp_path / "second", "tensor", "rms"))
    assert r.exit_code == 0, r.output
    dst = tmp_path / "cars.safetensors"
    assert cli("reconstruct", "--artifacts", tmp_path / "second", "--task", "cars", "--alpha", 0.9,
               "--out", dst).exit_code == 0
    assert_matches(dst, reference(states, "cars", 0.9, "tensor", "rms")[0])
