"""`tswitch merge` (streamed, sharded, local or on Ray) equals the in-memory reference byte for byte."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from tswitch_ray.cli import app
from tswitch_ray.distributed.merge import MergeConfig, run_merge
from tswitch_ray.methods import get_method, merge_in_memory
from tswitch_ray.zoo import load_zoo

SMALL_SHARD = 256 * 1024  # many shards on a 2-layer zoo

CASES = [
    ("ta", {}),
    ("ties", {}),
    ("ties", {"k": 30, "merge": "sum"}),
    ("emr", {}),
    ("emr", {"lambda_mode": "element_sum"}),
    ("tswitch", {}),
    ("tswitch", {"scope": "model", "alpha": 0.7}),
]
_IDS = [f"{m}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'default'}" for m, o in CASES]


def _vit_like_zoo(root: Path, width: int = 96, blocks: int = 6, n_tasks: int = 3, seed: int = 3) -> str:
    """A zoo with open_clip's vision-tower names and shapes at a small width: fp16, one fp32 tensor, 4-D conv, 1-D.

    Each residual block (~200 KB) is one shard of SMALL_SHARD, so a merge runs
    over many shards; the model has as few tensors as a 2-layer ViT-B/32 (the
    per-tensor costs) but 1/50 of its values, so each merge takes a second.
    """
    g = torch.Generator().manual_seed(seed)
    w = width
    shapes = {"visual.conv1.weight": (w, 3, 8, 8), "visual.class_embedding": (w,),
              "visual.positional_embedding": (17, w)}
    for i in range(blocks):
        b = f"visual.transformer.resblocks.{i}"
        shapes |= {f"{b}.ln_1.weight": (w,), f"{b}.attn.in_proj_weight": (3 * w, w), f"{b}.attn.in_proj_bias": (3 * w,),
                   f"{b}.mlp.c_fc.weight": (4 * w, w), f"{b}.mlp.c_proj.weight": (w, 4 * w)}
    shapes["visual.proj"] = (w, 32)
    fp32 = {"visual.proj"}
    base = {n: (torch.randn(s, generator=g) * w**-0.5).to(torch.float32 if n in fp32 else torch.float16)
            for n, s in shapes.items()}
    save_file(base, str(root / "base.safetensors"))
    tasks = []
    for t in range(n_tasks):
        sd = {n: (v.float() + 0.02 * torch.randn(v.shape, generator=g)).to(v.dtype) for n, v in base.items()}
        save_file(sd, str(root / f"task_{t + 1:02d}.safetensors"))
        tasks.append({"name": f"task_{t + 1:02d}", "uri": f"task_{t + 1:02d}.safetensors"})
    (root / "zoo.yaml").write_text(yaml.safe_dump({"name": "vit-like", "base": "base.safetensors", "tasks": tasks}))
    return str(root / "zoo.yaml")


@pytest.fixture(scope="module")
def small_zoo(tmp_path_factory) -> str:
    return _vit_like_zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="module")
def zoo_with_buffer(tmp_path_factory) -> str:
    """A zoo holding an integer buffer, which is not merged but copied from the base."""
    root = tmp_path_factory.mktemp("zoo_buf")
    g = torch.Generator().manual_seed(0)
    base = {
        "a.0.weight": torch.randn(64, 48, generator=g).to(torch.bfloat16),
        "a.0.position_ids": torch.arange(17, dtype=torch.int64),
        "a.1.bias": torch.randn(300, generator=g),
    }
    save_file(base, str(root / "base.safetensors"))
    tasks = []
    for t in range(4):
        sd = {n: (v + 0.01 * torch.randn(v.shape, generator=g)).to(v.dtype) if v.is_floating_point() else v.clone()
              for n, v in base.items()}
        save_file(sd, str(root / f"t{t}.safetensors"))
        tasks.append({"name": f"t{t}", "uri": f"t{t}.safetensors"})
    (root / "zoo.yaml").write_text(yaml.safe_dump({"name": "buf", "base": "base.safetensors", "tasks": tasks}))
    return str(root / "zoo.yaml")


@pytest.fixture(scope="module")
def references():
    """``references(zoo_uri, method, options)``: :func:`_reference`, computed once per case for the whole module.

    The local, Ray and CLI merges of a case are all compared with the same
    in-memory result; nothing mutates it.
    """
    cache: dict[tuple, list[dict[str, torch.Tensor]]] = {}

    def get(zoo_uri: str, method: str, options: dict) -> list[dict[str, torch.Tensor]]:
        key = (zoo_uri, method, tuple(sorted(options.items())))
        if key not in cache:
            cache[key] = _reference(zoo_uri, method, options)
        return cache[key]

    return get


def _reference(zoo_uri: str, method: str, options: dict) -> list[dict[str, torch.Tensor]]:
    """merge_in_memory over the floating-point tensors; other tensors are the base's."""
    zoo = load_zoo(zoo_uri)
    infos = zoo.tensor_infos()
    floats = [n for n, i in infos.items() if i.dtype in ("F16", "BF16", "F32", "F64")]
    base = {n: zoo.base.read(n) for n in floats}
    tasks = [{n: zoo.tasks[t].read(n) for n in floats} for t in zoo.task_names]
    merged = merge_in_memory(get_method(method, **options), base, tasks)
    outs = merged if isinstance(merged, list) else [merged]
    full = []
    for sd in outs:
        d = {n: (sd[n] if n in sd else zoo.base.read(n)) for n in infos}
        full.append(d)
    return full


def _expected_files(zoo_uri: str, method: str, out: Path) -> list[Path]:
    if get_method(method).per_task:
        return [out / f"{t}.safetensors" for t in load_zoo(zoo_uri).task_names]
    return [out / "merged.safetensors"]


def _assert_equal(references, zoo_uri: str, method: str, options: dict, out: Path) -> None:
    files = _expected_files(zoo_uri, method, out)
    ref = references(zoo_uri, method, options)
    assert len(files) == len(ref)
    order = list(load_zoo(zoo_uri).tensor_infos())
    for path, expected in zip(files, ref):
        got = load_file(str(path))
        assert list(got) == order or set(got) == set(order)
        for name in order:
            assert got[name].dtype == expected[name].dtype, name
            assert got[name].shape == expected[name].shape, name
            assert torch.equal(got[name], expected[name]), f"{path.name}:{name}"
    assert not (out / ".staging").exists() or not any((out / ".staging").rglob("*.safetensors"))


@pytest.mark.parametrize("method,options", CASES, ids=_IDS)
def test_local_merge_equals_in_memory(small_zoo, tmp_path, references, method, options):
    summary = run_merge(MergeConfig(zoo=small_zoo, method=method, out=str(tmp_path / "out"), options=options,
                                    executor="local", shard_bytes=SMALL_SHARD, show_progress=False))
    assert summary.shards > 4
    _assert_equal(references, small_zoo, method, options, tmp_path / "out")


@pytest.mark.parametrize("method,options", CASES, ids=_IDS)
def test_ray_merge_equals_in_memory(small_zoo, tmp_path, references, ray_local, method, options):
    summary = run_merge(MergeConfig(zoo=small_zoo, method=method, out=str(tmp_path / "out"), options=options,
                                    executor="ray", shard_bytes=SMALL_SHARD, show_progress=False))
    assert summary.shards > 4
    _assert_equal(references, small_zoo, method, options, tmp_path / "out")
    rounds = get_method(method, **options).stat_rounds
    stat_phases = [f"statistics {r + 1}/{rounds}" for r in range(rounds)]
    assert list(summary.phase_seconds) == ["plan", "start-up", *stat_phases, "merge", "shutdown", "write"]
    assert sum(summary.phase_seconds.values()) <= summary.seconds


@pytest.mark.parametrize("executor", ["local", "ray"])
@pytest.mark.parametrize("method", ["ta", "emr"])
def test_merge_copies_non_float_tensors(zoo_with_buffer, tmp_path, references, ray_local, executor, method):
    run_merge(MergeConfig(zoo=zoo_with_buffer, method=method, out=str(tmp_path / "o"), executor=executor,
                          shard_bytes=4096, show_progress=False))
    _assert_equal(references, zoo_with_buffer, method, {}, tmp_path / "o")


@pytest.mark.parametrize("method,cli_opts,options", [
    ("emr", [], {}),
    ("ties", ["-O", "k=25"], {"k": 25}),
    ("tswitch", ["-O", "alpha=0.8", "-O", "scope=model"], {"alpha": 0.8, "scope": "model"}),
])
def test_cli_merge_through_ray(small_zoo, tmp_path, references, ray_local, method, cli_opts, options):
    out = tmp_path / "cli"
    res = CliRunner().invoke(app, ["merge", "--zoo", small_zoo, "--method", method, "--out", str(out), "--quiet",
                                   *cli_opts])
    assert res.exit_code == 0, res.output
    _assert_equal(references, small_zoo, method, options, out)


def test_merge_rerun_is_up_to_date_and_overwrite_remakes_it_identically(small_zoo, tmp_path):
    out = tmp_path / "again"
    cfg = dict(zoo=small_zoo, method="emr", out=str(out), executor="local", shard_bytes=SMALL_SHARD,
               show_progress=False)
    run_merge(MergeConfig(**cfg))
    first = {p.name: p.read_bytes() for p in out.glob("*.safetensors")}
    marker = (out / "merge.json").read_bytes()
    assert run_merge(MergeConfig(**cfg)).up_to_date  # same tasks and checkpoints: nothing to do
    assert (out / "merge.json").read_bytes() == marker
    again = run_merge(MergeConfig(**cfg, overwrite=True))
    assert not again.up_to_date
    assert {p.name: p.read_bytes() for p in out.glob("*.safetensors")} == first


def test_merge_bad_option_is_config_error(small_zoo, tmp_path):
    from tswitch_ray.errors import ConfigError

    with pytest.raises(ConfigError):
        run_merge(MergeConfig(zoo=small_zoo, method="emr", out=str(tmp_path / "x"), options={"nope": 1},
                              executor="local", show_progress=False))
