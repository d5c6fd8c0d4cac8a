"""`tswitch merge` (streamed, sharded, local or on Ray) equals the in-memory reference byte for byte."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from tswitch_ray.cli import app
from tswitch_ray.distributed.merge import MergeConfig, run_merge
from tswitch_ray.methods import get_method, merge_in_memory
from tswitch_ray.zoo import load_zoo
from tswitch_ray.zoo.synth import synth_zoo

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


@pytest.fixture(scope="module")
def small_zoo(tmp_path_factory) -> str:
    return synth_zoo("vit-b-32", 3, "fp16", str(tmp_path_factory.mktemp("zoo")), seed=3, layers=2)


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
def ray_session():
    ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


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


def _assert_equal(zoo_uri: str, method: str, options: dict, out: Path) -> None:
    files = _expected_files(zoo_uri, method, out)
    ref = _reference(zoo_uri, method, options)
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
def test_local_merge_equals_in_memory(small_zoo, tmp_path, method, options):
    summary = run_merge(MergeConfig(zoo=small_zoo, method=method, out=str(tmp_path / "out"), options=options,
                                    executor="local", shard_bytes=SMALL_SHARD, show_progress=False))
    assert summary.shards > 4
    _assert_equal(small_zoo, method, options, tmp_path / "out")


@pytest.mark.parametrize("method,options", CASES, ids=_IDS)
def test_ray_merge_equals_in_memory(small_zoo, tmp_path, ray_session, method, options):
    summary = run_merge(MergeConfig(zoo=small_zoo, method=method, out=str(tmp_path / "out"), options=options,
                                    executor="ray", shard_bytes=SMALL_SHARD, show_progress=False))
    assert summary.shards > 4
    _assert_equal(small_zoo, method, options, tmp_path / "out")
    rounds = get_method(method, **options).stat_rounds
    stat_phases = [f"statistics {r + 1}/{rounds}" for r in range(rounds)]
    assert list(summary.phase_seconds) == ["plan", "start-up", *stat_phases, "merge", "shutdown", "write"]
    assert sum(summary.phase_seconds.values()) <= summary.seconds


@pytest.mark.parametrize("executor", ["local", "ray"])
@pytest.mark.parametrize("method", ["ta", "emr"])
def test_merge_copies_non_float_tensors(zoo_with_buffer, tmp_path, ray_session, executor, method):
    run_merge(MergeConfig(zoo=zoo_with_buffer, method=method, out=str(tmp_path / "o"), executor=executor,
                          shard_bytes=4096, show_progress=False))
    _assert_equal(zoo_with_buffer, method, {}, tmp_path / "o")


@pytest.mark.parametrize("method,cli_opts,options", [
    ("emr", [], {}),
    ("ties", ["-O", "k=25"], {"k": 25}),
    ("tswitch", ["-O", "alpha=0.8", "-O", "scope=model"], {"alpha": 0.8, "scope": "model"}),
])
def test_cli_merge_through_ray(small_zoo, tmp_path, ray_session, method, cli_opts, options):
    out = tmp_path / "cli"
    res = CliRunner().invoke(app, ["merge", "--zoo", small_zoo, "--method", method, "--out", str(out), "--quiet",
                                   *cli_opts])
    assert res.exit_code == 0, res.output
    _assert_equal(small_zoo, method, options, out)


def test_merge_rerun_overwrites_and_is_identical(small_zoo, tmp_path):
    out = tmp_path / "again"
    cfg = dict(zoo=small_zoo, method="emr", out=str(out), executor="local", shard_bytes=SMALL_SHARD,
               show_progress=False)
    run_merge(MergeConfig(**cfg))
    first = {p.name: p.read_bytes() for p in out.glob("*.safetensors")}
    run_merge(MergeConfig(**cfg))
    assert {p.name: p.read_bytes() for p in out.glob("*.safetensors")} == first


def test_merge_bad_option_is_config_error(small_zoo, tmp_path):
    from tswitch_ray.errors import ConfigError

    with pytest.raises(ConfigError):
        run_merge(MergeConfig(zoo=small_zoo, method="emr", out=str(tmp_path / "x"), options={"nope": 1},
                              executor="local", show_progress=False))
