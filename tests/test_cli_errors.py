"""Bad input through the `tswitch` CLI: non-zero exit, one message naming file/tensor and cause, nothing committed.

Each case starts from a good tiny zoo (see test_build_reconstruct), breaks one
thing, runs `tswitch build --executor local` in-process and checks that

* the exit code is 2 and the CLI exited cleanly (``SystemExit``: no traceback),
* stderr names the offending file (and tensor, where there is one) and the cause,
* no ``manifest.json`` exists anywhere under ``--out``.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

from tswitch_ray.cli import app

from test_build_reconstruct import make_state, write_zoo


def run(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def build(zoo: object, out: Path, *alpha_args: object):
    alpha_args = alpha_args or ("--alpha", "0.5")
    return run("build", "--zoo", zoo, "--out", out, "--executor", "local", "--quiet", *alpha_args)


def assert_refused(result, out: Path, *needles: str) -> str:
    err = result.stderr
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert isinstance(result.exception, SystemExit), result.exception  # a clean exit, not a crash
    assert "Traceback" not in result.output
    assert err.startswith("error:"), err
    flat = " ".join(err.split())  # the console may wrap long lines
    for needle in needles:
        assert needle in flat, f"{needle!r} not in: {flat}"
    if out.exists():
        assert not list(out.rglob("manifest.json")), "a manifest was committed"
    return flat


@pytest.fixture
def zoo(tmp_path) -> Path:
    return write_zoo(tmp_path / "zoo", make_state(seed=3), "safetensors")


def _header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write_raw(path: Path, header: dict, data: bytes) -> None:
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


def _replace_task(zoo: Path, task: str, mutate) -> Path:
    """Rewrite task ``task``'s state dict after ``mutate(sd)``; returns its file."""
    from safetensors.torch import load_file

    path = zoo.parent / f"{task}.safetensors"
    sd = load_file(str(path))
    mutate(sd)
    save_file(sd, str(path))
    return path


# --- the zoo's files -----------------------------------------------------------------

def test_missing_zoo_manifest(tmp_path):
    out = tmp_path / "out"
    r = build(tmp_path / "nope.yaml", out)
    assert_refused(r, out, str(tmp_path / "nope.yaml"), "does not exist")


def test_missing_task_checkpoint(zoo, tmp_path):
    (zoo.parent / "dtd.safetensors").unlink()
    out = tmp_path / "out"
    assert_refused(build(zoo, out), out, str(zoo.parent / "dtd.safetensors"), "does not exist", "'dtd'")


def test_truncated_safetensors(zoo, tmp_path):
    path = zoo.parent / "cars.safetensors"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 500])
    out = tmp_path / "out"
    msg = assert_refused(build(zoo, out), out, str(path), "truncated")
    assert "tensor '" in msg


def test_sharded_folder_missing_a_shard(tmp_path):
    zoo = write_zoo(tmp_path / "zoo", make_state(seed=3), "sharded")
    index = json.loads((zoo.parent / "dtd" / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (zoo.parent / "dtd" / victim).unlink()
    out = tmp_path / "out"
    assert_refused(build(zoo, out), out, str(zoo.parent / "dtd" / victim), "does not exist", "'dtd'")


def test_header_offsets_past_end_of_file(zoo, tmp_path):
    path = zoo.parent / "cars.safetensors"
    header, data = _header(path)
    b, e = header["blocks.1.mlp.bias"]["data_offsets"]
    header["blocks.1.mlp.bias"]["data_offsets"] = [b + 10_000, e + 10_000]  # right size, past the end
    _write_raw(path, header, data)
    out = tmp_path / "out"
    assert_refused(build(zoo, out), out, str(path), "'blocks.1.mlp.bias'", "has only")


def test_header_span_inconsistent_with_shape(zoo, tmp_path):
    path = zoo.parent / "dtd.safetensors"
    header, data = _header(path)
    b, e = header["embed.weight"]["data_offsets"]
    header["embed.weight"]["data_offsets"] = [b, e + 4]
    _write_raw(path, header, data)
    out = tmp_path / "out"
    assert_refused(build(zoo, out), out, str(path), "'embed.weight'", "inconsistent")


def test_garbage_header_length(zoo, tmp_path):
    path = zoo.parent / "dtd.safetensors"
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 2**40) + raw[8:])
    out = tmp_path / "out"
    assert_refused(build(zoo, out), out, str(path), "header")


def test_shape_mismatch(zoo, tmp_path):
    def grow(sd):
        sd["blocks.0.attn.weight"] = torch.zeros(24, 25)

    path = _replace_task(zoo, "dtd", grow)
    out = tmp_path / "out"
    assert_refused(build(zoo, out), out, str(path), "'blocks.0.attn.weight'", "shape mismatch", "[24, 25]", "[24, 24]")


def test_dtype_mismatch(zoo, tmp_path):
    def widen(sd):
        sd["blocks.0.attn.bias"] = sd["blocks.0.attn.bias"].float()

    path = _replace_task(zoo, "cars", widen)
    out = tmp_path / "out"
    assert_refused(build(zoo, out), out, str(path), "'blocks.0.attn.bias'", "dtype mismatch", "F32", "F16")


def test_tensor_missing_from_one_task(zoo, tmp_path):
    path = _replace_task(zoo, "cars", lambda sd: sd.pop("blocks.1.mlp.weight"))
    out = tmp_path / "out"
    assert_refused(build(zoo, out), out, str(path), "'blocks.1.mlp.weight'", "has no tensor")


NON_FINITE_WORDS = ("NaN", "non-finite", "infinite")


@pytest.mark.parametrize("bad,scope", [(float("nan"), "tensor"), (float("inf"), "tensor"), (float("-inf"), "tensor"),
                                       (float("nan"), "model")])
def test_non_finite_task_vector(zoo, tmp_path, bad, scope):
    def poison(sd):
        sd["blocks.1.mlp.bias"][3] = bad

    path = _replace_task(zoo, "dtd", poison)
    out = tmp_path / "out"
    msg = assert_refused(build(zoo, out, "--alpha", "0.5", "--scope", scope), out, str(path), "blocks.1.mlp.bias")
    assert any(w in msg for w in NON_FINITE_WORDS), msg


def test_non_finite_base_is_named(zoo, tmp_path):
    """A NaN/Inf in θ0 makes every τ non-finite: the message must name the base file."""
    from safetensors.torch import load_file

    path = zoo.parent / "base.safetensors"
    sd = load_file(str(path))
    sd["embed.weight"][0, 0] = float("inf")
    save_file(sd, str(path))
    out = tmp_path / "out"
    msg = assert_refused(build(zoo, out), out, str(path), "embed.weight")
    assert any(w in msg for w in NON_FINITE_WORDS), msg


# --- pickles -------------------------------------------------------------------------

class _Payload:
    """Unpickling this calls os.mkdir(marker): stands in for arbitrary code in a checkpoint."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickle_with_arbitrary_classes_is_refused_and_never_runs(tmp_path):
    states = make_state(seed=5)
    zoo = write_zoo(tmp_path / "zoo", states, "pt")
    marker = tmp_path / "pwned_marker"
    evil = zoo.parent / "cars.pt"
    torch.save({**states["cars"], "x": _Payload(str(marker))}, str(evil))
    out = tmp_path / "out"
    assert_refused(build(zoo, out), out, str(evil), "--trust-pickle", "arbitrary code")
    assert not marker.exists()
    # The same through the installed console script, in a fresh process: no traceback, exit 2.
    exe = Path(sys.executable).with_name("tswitch")
    proc = subprocess.run([str(exe), "build", "--zoo", str(zoo), "--out", str(out), "--executor", "local", "-q"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and str(evil) in " ".join(proc.stderr.split())
    assert not marker.exists()
    if out.exists():
        assert not list(out.rglob("manifest.json"))


def test_zoo_convert_without_trust_refuses_and_never_runs(tmp_path):
    marker = tmp_path / "pwned_marker"
    evil = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(3), "x": _Payload(str(marker))}, str(evil))
    r = run("zoo", "convert", evil, tmp_path / "out.safetensors")
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit)
    assert str(evil) in " ".join(r.stderr.split()) and "--trust-pickle" in r.stderr
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


# --- options and the manifest --------------------------------------------------------

@pytest.mark.parametrize("alpha", ["1.0", "-0.1", "1.5", "nan"])
def test_alpha_outside_unit_interval(zoo, tmp_path, alpha):
    out = tmp_path / "out"
    msg = assert_refused(build(zoo, out, "--alpha", "0.5", f"--alpha={alpha}"), out, "[0, 1)")
    assert "alpha" in msg.lower() or "α" in msg
    assert not out.exists()  # refused before anything was written


def test_duplicate_task_names(zoo, tmp_path):
    m = yaml.safe_load(zoo.read_text())
    m["tasks"].append({"name": "cars", "uri": "dtd.safetensors"})
    zoo.write_text(yaml.safe_dump(m))
    out = tmp_path / "out"
    assert_refused(build(zoo, out), out, str(zoo), "duplicate task names", "cars")


def test_zoo_manifest_unknown_key_and_bad_yaml(zoo, tmp_path):
    out = tmp_path / "out"
    zoo.write_text(zoo.read_text() + "tasks_extra: 1\n")
    assert_refused(build(zoo, out), out, str(zoo), "unknown key 'tasks_extra'")
    zoo.write_text("name: [unclosed\n")
    assert_refused(build(zoo, out), out, str(zoo), "not valid YAML")


def test_bad_scope_and_knob(zoo, tmp_path):
    out = tmp_path / "out"
    assert_refused(build(zoo, out, "--scope", "layer"), out, "scope")
    assert_refused(build(zoo, out, "--knob", "median"), out, "knob")


def test_message_with_brackets_is_printed_verbatim(tmp_path):
    """Paths with [brackets] must not be eaten by the console's markup parser."""
    folder = tmp_path / "[run1]"
    zoo = write_zoo(folder, make_state(seed=3), "safetensors")
    (folder / "cars.safetensors").unlink()
    out = tmp_path / "out"
    assert_refused(build(zoo, out), out, str(folder / "cars.safetensors"))


# --- reconstruct ---------------------------------------------------------------------

def test_reconstruct_bad_requests(zoo, tmp_path):
    arts = tmp_path / "arts"
    r = build(zoo, arts)
    assert r.exit_code == 0, r.output
    dst = tmp_path / "o.safetensors"
    for args, needles in [
        (("--task", "svhn", "--alpha", "0.5"), ("'svhn'", str(arts))),
        (("--task", "cars", "--alpha", "0.7"), ("0.7", "0.5")),
    ]:
        r = run("reconstruct", "--artifacts", arts, *args, "--out", dst)
        assert_refused(r, tmp_path / "none", *needles)
        assert not dst.exists()
    r = run("reconstruct", "--artifacts", tmp_path / "nothing", "--task", "cars", "--alpha", "0.5", "--out", dst)
    assert_refused(r, tmp_path / "none", str(tmp_path / "nothing"), "manifest.json")
    assert not dst.exists()


# --- merge outputs -------------------------------------------------------------------

def merge(zoo: object, out: Path, method: str = "ta", *extra: object):
    return run("merge", "--zoo", zoo, "--method", method, "--out", out, "--executor", "local", "--quiet", *extra)


def test_merge_to_unwritable_output(zoo, tmp_path):
    """An output under a regular file cannot be created: refused by the probe at start, not by a traceback."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / "merged"
    assert_refused(merge(zoo, out), tmp_path / "none", str(out), "cannot write merge outputs there")


def test_merge_to_an_output_of_another_method(zoo, tmp_path):
    out = tmp_path / "merged"
    assert merge(zoo, out, "ta").exit_code == 0
    committed = (out / "merged.safetensors").read_bytes()
    assert_refused(merge(zoo, out, "ties"), tmp_path / "none", str(out), "merge.json", "'ta'", "'ties'")
    assert (out / "merged.safetensors").read_bytes() == committed
    assert not (out / ".staging").exists()
    r = merge(zoo, out, "ties", "--overwrite")
    assert r.exit_code == 0, r.output
    assert json.loads((out / "merge.json").read_text())["method"] == "ties"
